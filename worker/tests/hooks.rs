//! The lifecycle hooks, heard through the whole pipeline: a worker with real servers and a
//! real interpreter runs one message of each kind, and a hook records what it hears.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use common::{NatsServer, RedisServer};
use dbtask_protocol::{task_subject, TaskError, HEADER_MSG_ID};
use dbtask_worker::events::{Hook, Hooks, TaskRef};
use dbtask_worker::python::{PythonConfig, PythonRuntime};
use dbtask_worker::Config;

const TASKS: &str = r#"
from dbtask import task


@task(name="ok")
def ok(x):
    return x


@task(name="bad")
def bad():
    raise ValueError("bad")


@task(name="flaky", max_retries=1, retry_delay=0, autoretry_for=(OSError,))
def flaky():
    raise OSError("down")
"#;

/// Every event heard, as `(task id, event)`.
#[derive(Default)]
struct Heard(Mutex<Vec<(String, &'static str)>>);

impl Heard {
    fn push(&self, task: TaskRef<'_>, event: &'static str) {
        self.0.lock().unwrap().push((task.id.to_owned(), event));
    }

    /// The events of task `id`, sorted: a retry's next attempt may start before the RETRY
    /// record of the one before is stored (it is published first).
    fn of(&self, id: &str) -> Vec<&'static str> {
        let heard = self.0.lock().unwrap();
        let mut events: Vec<_> = heard
            .iter()
            .filter(|(i, _)| i == id)
            .map(|(_, e)| *e)
            .collect();
        events.sort_unstable();
        events
    }
}

impl Hook for Heard {
    fn received(&self, task: TaskRef<'_>) {
        self.push(task, "received");
    }
    fn started(&self, task: TaskRef<'_>) {
        self.push(task, "started");
    }
    fn succeeded(&self, task: TaskRef<'_>, _runtime_secs: f64) {
        self.push(task, "succeeded");
    }
    fn failed(&self, task: TaskRef<'_>, _error: &TaskError) {
        self.push(task, "failed");
    }
    fn retried(&self, task: TaskRef<'_>, _error: &TaskError, _delay_secs: f64) {
        self.push(task, "retried");
    }
    fn revoked(&self, task: TaskRef<'_>, _error: &TaskError) {
        self.push(task, "revoked");
    }
    fn rejected(&self, task: TaskRef<'_>, _error: &TaskError) {
        self.push(task, "rejected");
    }
}

fn python() -> PythonRuntime {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hooks");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dbtask_hook_tasks.py"), TASKS).unwrap();
    let config = PythonConfig {
        python: Some(root.join(".venv/bin/python")),
        apps: vec!["dbtask_hook_tasks".into()],
        threads: 2,
        ..PythonConfig::default()
    };
    PythonRuntime::start_with_sys_path(&config, &[root.join("client-py/python"), dir])
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_lifecycle_event_reaches_the_hook() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let python = python();
    let config = Config {
        nats_url: nats.url(),
        redis_url: redis.url(),
        apps: vec!["dbtask_hook_tasks".into()],
        queues: vec!["default".into()],
        ..Config::default()
    };
    let heard = Arc::new(Heard::default());
    let hooks = Hooks::new(heard.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(dbtask_worker::run_with_hooks(
                config,
                python,
                hooks,
                async {
                    let _ = stopped.await;
                },
            ))
            .unwrap();
    });

    let messages = [
        ("t-ok", r#"{"id":"t-ok","task":"ok","args":[1]}"#),
        ("t-bad", r#"{"id":"t-bad","task":"bad"}"#),
        ("t-flaky", r#"{"id":"t-flaky","task":"flaky"}"#),
        ("t-unknown", r#"{"id":"t-unknown","task":"nope"}"#),
        (
            "t-expired",
            r#"{"id":"t-expired","task":"ok","args":[1],"expires":1.0}"#,
        ),
    ];
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let client = async_nats::connect(nats.url()).await.unwrap();
            let js = async_nats::jetstream::new(client);
            for (id, body) in messages {
                // The worker creates the stream: until it has, publishing finds nobody.
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let mut headers = HeaderMap::new();
                    headers.insert(HEADER_MSG_ID, id);
                    let sent = js
                        .publish_with_headers(task_subject("default"), headers, body.into())
                        .await;
                    if let Ok(ack) = sent {
                        if ack.await.is_ok() {
                            break;
                        }
                    }
                    assert!(Instant::now() < deadline, "the worker made no stream");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });

    let expected: [(&str, &[&str]); 5] = [
        // Sorted by name.
        ("t-ok", &["received", "started", "succeeded"]),
        ("t-bad", &["failed", "received", "started"]),
        (
            "t-flaky",
            &[
                "failed", "received", "received", "retried", "started", "started",
            ],
        ),
        ("t-unknown", &["received", "rejected"]),
        ("t-expired", &["received", "revoked"]),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    while expected.iter().any(|(id, want)| heard.of(id) != *want) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = stop.send(());
    worker.join().unwrap();
    for (id, want) in expected {
        assert_eq!(heard.of(id), want, "events of {id}");
    }
}

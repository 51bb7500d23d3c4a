//! What a worker answers to `dbtask inspect` / `dbtask control` (requests arrive through the
//! NATS service of [`Broker::control_service`](crate::broker::Broker::control_service)), and
//! its own events with `--events`: `online`, a `heartbeat` every `heartbeat_interval`, and
//! `offline` once it has stopped.
//!
//! Rate limits set with `dbtask control rate-limit` are kept in Redis
//! ([`RATE_OVERRIDES_KEY`](dbtask_protocol::RATE_OVERRIDES_KEY)) by every worker that hears
//! them, so a worker started later reads them at start, and are applied here at once; the
//! limiter's budget in Redis is the task's own, shared by the whole cluster as before.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use async_nats::service::Request;
use dbtask_protocol::{Rate, DEFAULT_PRIORITY, MAX_PRIORITY};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use super::Shared;
use crate::activity::Activity;
use crate::broker::{Broker, EventSink, Requests};
use crate::config::Config;
use crate::event_stream::{loadavg, worker_subject, WorkerEvent};
use crate::events::Hooks;
use crate::store::Store;

/// A rate limit override: `"0"` lifts the task's limit, anything else is a rate (`"10/s"`).
pub(super) fn parse_override(text: &str) -> Result<Option<Rate>, String> {
    if text.trim() == "0" {
        return Ok(None);
    }
    text.parse::<Rate>().map(Some).map_err(|e| e.to_string())
}

/// A task's rate limit set with `dbtask control rate-limit`: as given, and parsed.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Override {
    pub text: String,
    /// `None`: no limit.
    pub rate: Option<Rate>,
}

/// The overrides kept in Redis; unreadable ones are skipped with a warning.
pub(super) fn read_overrides(stored: HashMap<String, String>) -> HashMap<String, Override> {
    stored
        .into_iter()
        .filter_map(|(task, text)| match parse_override(&text) {
            Ok(rate) => Some((task, Override { text, rate })),
            Err(e) => {
                warn!(task, error = %e, "ignoring a stored rate limit override");
                None
            }
        })
        .collect()
}

/// The body of a request: which worker it is for (all if absent), and the command's arguments.
#[derive(Debug, Default, Deserialize)]
struct Body {
    #[serde(default)]
    worker: Option<String>,
    #[serde(default)]
    task: Option<String>,
    #[serde(default)]
    rate: Option<String>,
}

/// Answers requests until the stream ends (the service stopped) or the task is aborted.
pub(super) async fn serve_requests(shared: Rc<Shared>, mut requests: Requests) {
    while let Some((command, request)) = requests.next().await {
        let body: Body = if request.message.payload.is_empty() {
            Body::default()
        } else {
            match serde_json::from_slice(&request.message.payload) {
                Ok(body) => body,
                Err(e) => {
                    let error =
                        format!("the request body is not the JSON of a dbtask command: {e}");
                    respond(&request, json!({"worker": shared.worker, "error": error})).await;
                    continue;
                }
            }
        };
        if body.worker.as_ref().is_some_and(|w| *w != shared.worker) {
            continue;
        }
        let answer = answer(&shared, command, &body).await;
        respond(&request, answer).await;
        if command == "shutdown" {
            info!(worker = %shared.worker, "shutdown requested by `dbtask control shutdown`");
            shared.stop.notify_one();
        }
    }
}

async fn respond(request: &Request, answer: Value) {
    let bytes = serde_json::to_vec(&answer).unwrap_or_default();
    if let Err(e) = request.respond(Ok(bytes.into())).await {
        debug!(error = %e, "cannot answer a control request");
    }
}

async fn answer(shared: &Shared, command: &str, body: &Body) -> Value {
    let worker = shared.worker.as_str();
    match command {
        "ping" => json!({"worker": worker, "ok": "pong"}),
        "stats" => stats(shared),
        "active" | "reserved" => {
            let tasks = shared
                .activity
                .as_ref()
                .map(|a| a.held(command == "active"))
                .unwrap_or_default();
            json!({"worker": worker, "tasks": tasks})
        }
        "registered" => {
            let mut tasks: Vec<&str> = shared.python.tasks().keys().map(String::as_str).collect();
            tasks.sort_unstable();
            json!({"worker": worker, "tasks": tasks})
        }
        "queues" => queues(shared).await,
        "shutdown" => json!({"worker": worker, "ok": true}),
        "rate_limit" => rate_limit(shared, body).await,
        other => json!({"worker": worker, "error": format!("unknown command {other:?}")}),
    }
}

fn stats(shared: &Shared) -> Value {
    let config = &shared.config;
    let (running, prefetched) = load(shared);
    let overrides: HashMap<String, String> = shared
        .rate_overrides
        .borrow()
        .iter()
        .map(|(task, o)| (task.clone(), o.text.clone()))
        .collect();
    json!({
        "worker": shared.worker,
        "hostname": hostname(&shared.worker),
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime": shared.started.elapsed().as_secs_f64(),
        "pool": config.pool,
        "concurrency": config.concurrency,
        "prefetch": config.prefetch,
        "queues": config.queues,
        "running": running,
        "prefetched": prefetched,
        "processed": shared.activity.as_ref().map(|a| a.processed()).unwrap_or_default(),
        "rss_bytes": crate::memory::rss_kib() * 1024,
        "loadavg": loadavg(),
        "events": config.events,
        "rate_limit_overrides": overrides,
    })
}

/// Tasks running and tasks waiting for a slot in this worker.
fn load(shared: &Shared) -> (usize, usize) {
    match &shared.activity {
        Some(activity) => activity.load(),
        None => {
            let running = shared.config.concurrency - shared.slots.available_permits();
            (running, shared.waiting_for_slots())
        }
    }
}

fn hostname(worker: &str) -> &str {
    worker.rsplit_once(':').map_or(worker, |(host, _)| host)
}

/// Each consumed queue's pending messages per priority level, from JetStream.
async fn queues(shared: &Shared) -> Value {
    let levels: Vec<u8> = if shared.config.priorities {
        (0..=MAX_PRIORITY).rev().collect()
    } else {
        vec![DEFAULT_PRIORITY]
    };
    let mut out = Vec::with_capacity(shared.config.queues.len());
    for queue in &shared.config.queues {
        let mut per_level = Vec::new();
        let (mut pending, mut errors) = (0, Vec::new());
        for &priority in &levels {
            match shared.broker.level_pending(queue, priority).await {
                Ok(Some(p)) => {
                    pending += p.pending;
                    per_level.push(json!({"priority": priority, "pending": p.pending, "ack_pending": p.ack_pending}));
                }
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        let mut entry = json!({"queue": queue, "pending": pending, "levels": per_level});
        if !errors.is_empty() {
            entry["errors"] = json!(errors);
        }
        out.push(entry);
    }
    json!({"worker": shared.worker, "queues": out})
}

async fn rate_limit(shared: &Shared, body: &Body) -> Value {
    let worker = shared.worker.as_str();
    let (Some(task), Some(text)) = (&body.task, &body.rate) else {
        return json!({"worker": worker, "error": "rate_limit needs a task and a rate"});
    };
    let rate = match parse_override(text) {
        Ok(rate) => rate,
        Err(e) => return json!({"worker": worker, "error": e}),
    };
    if !shared.python.tasks().contains_key(task.as_str()) {
        return json!({"worker": worker, "error": format!("task {task} is not registered on this worker")});
    }
    // Kept first, so that a worker started from now on applies it too.
    if let Err(e) = shared.store.set_rate_override(task, text.trim()).await {
        return json!({"worker": worker, "error": format!("cannot keep the rate limit in Redis: {e}")});
    }
    let text = text.trim().to_owned();
    shared.rate_overrides.borrow_mut().insert(
        task.clone(),
        Override {
            text: text.clone(),
            rate,
        },
    );
    info!(task = %task, rate = %text, "rate limit changed by `dbtask control rate-limit`");
    json!({"worker": worker, "ok": true, "task": task, "rate": text})
}

/// This worker's event of `kind` (`online`, `heartbeat`, `offline`), as JSON.
pub(super) fn worker_event(shared: &Shared, kind: &'static str) -> Vec<u8> {
    let (running, prefetched) = load(shared);
    let event = WorkerEvent {
        event: kind,
        timestamp: dbtask_protocol::now_unix(),
        worker: &shared.worker,
        hostname: hostname(&shared.worker),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION"),
        queues: &shared.config.queues,
        concurrency: shared.config.concurrency,
        heartbeat_interval: shared.config.heartbeat_interval,
        running,
        prefetched,
        processed: shared
            .activity
            .as_ref()
            .map(|a| a.processed())
            .unwrap_or_default(),
        loadavg: loadavg(),
        rss_bytes: crate::memory::rss_kib() * 1024,
    };
    serde_json::to_vec(&event).unwrap_or_default()
}

/// `online` now, then a `heartbeat` every `heartbeat_interval` until aborted.
pub(super) async fn heartbeats(shared: Rc<Shared>, sink: EventSink) {
    sink.send(
        &worker_subject("online"),
        worker_event(&shared, "worker.online"),
    );
    let subject = worker_subject("heartbeat");
    let every = Duration::from_secs_f64(shared.config.heartbeat_interval);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sink.send(&subject, worker_event(&shared, "worker.heartbeat"));
    }
}

/// Inspect, control and events: what the worker sets up for them before it serves.
pub(super) struct Monitoring {
    pub activity: Option<Activity>,
    pub overrides: HashMap<String, Override>,
    /// The NATS service answering `dbtask inspect` / `dbtask control`, and its requests.
    pub control: Option<(async_nats::service::Service, crate::broker::Requests)>,
    /// `--events`: the event queue and the task publishing it.
    pub events: Option<(EventSink, tokio::task::JoinHandle<()>)>,
}

/// Adds the activity counts and the event stream to `hooks` as the config asks, reads the rate
/// limit overrides and registers the control service. Inspect and control are best effort: a
/// failure is logged and the worker serves without them.
pub(super) async fn monitoring(
    config: &Config,
    broker: &Broker,
    store: &Store,
    worker: &str,
    mut hooks: Hooks,
) -> (Hooks, Monitoring) {
    let activity = (config.control || config.events).then(Activity::default);
    if let Some(activity) = &activity {
        hooks = hooks.with(Arc::new(activity.clone()));
    }
    let events = config.events.then(|| {
        let (sink, publish) = broker.event_sink();
        (sink, tokio::spawn(publish))
    });
    if let Some((sink, _)) = &events {
        let stream = crate::event_stream::EventStream::new(
            sink.clone(),
            worker.to_owned(),
            activity.clone(),
        );
        hooks = hooks.with(Arc::new(stream));
    }
    let overrides = match store.rate_overrides().await {
        Ok(stored) => read_overrides(stored),
        Err(e) => {
            warn!(error = %e, "cannot read the rate limit overrides from Redis; using the tasks' own limits");
            HashMap::new()
        }
    };
    let control = if config.control {
        let metadata = HashMap::from([
            ("worker".to_owned(), worker.to_owned()),
            ("queues".to_owned(), config.queues.join(",")),
        ]);
        match broker.control_service(worker, metadata).await {
            Ok(service) => Some(service),
            Err(e) => {
                warn!(error = %e, "cannot register the control service on NATS: this worker will not answer dbtask inspect / control");
                None
            }
        }
    } else {
        None
    };
    let monitoring = Monitoring {
        activity,
        overrides,
        control,
        events,
    };
    (hooks, monitoring)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_is_a_rate_or_zero_for_none() {
        assert_eq!(parse_override("0"), Ok(None));
        assert_eq!(
            parse_override("10/s"),
            Ok(Some(Rate {
                count: 10,
                period_secs: 1.0
            }))
        );
        assert!(parse_override("ten/s")
            .unwrap_err()
            .contains("invalid rate_limit"));
        let stored = HashMap::from([
            ("a".to_owned(), "5/m".to_owned()),
            ("b".to_owned(), "bad".to_owned()),
        ]);
        let read = read_overrides(stored);
        assert_eq!(read.len(), 1);
        assert_eq!(read["a"].rate.unwrap().count, 5);
    }

    #[test]
    fn the_hostname_is_the_worker_id_without_its_pid() {
        assert_eq!(hostname("box.example:42"), "box.example");
    }
}

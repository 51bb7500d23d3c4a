//! `--events`: the [`Hook`] that turns each task's lifecycle into one JSON event on
//! `dbtask.events.task.<kind>`, and the worker's own events (`online`, `heartbeat` with its
//! load, `offline`) on `dbtask.events.worker.<kind>`. The JSON is made on the worker's thread
//! (a few hundred bytes) and queued for the publishing task ([`EventSink`]).

use async_nats::Subject;
use dbtask_protocol::{now_unix, task_event_subject, worker_event_subject, TaskError};
use serde::Serialize;

use crate::activity::{Activity, Processed};
use crate::broker::EventSink;
use crate::events::{Hook, TaskRef};

/// Error messages longer than this are cut in events (the record keeps the whole one).
const MAX_MESSAGE_CHARS: usize = 1000;

/// One task event, as published.
#[derive(Debug, Serialize)]
pub struct TaskEvent<'a> {
    /// `task.<kind>`: what happened.
    pub event: &'static str,
    /// Unix seconds.
    pub timestamp: f64,
    pub id: &'a str,
    pub task: &'a str,
    pub queue: &'a str,
    pub worker: &'a str,
    pub attempt: u32,
    /// Seconds the task ran (succeeded, and failed / retried / revoked when it ran here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    /// Retried: seconds until the next attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in: Option<f64>,
    /// Dead-lettered: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// Received, in a workflow: the step that published this task, and the workflow's first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_id: Option<&'a str>,
}

/// One worker event, as published.
#[derive(Debug, Serialize)]
pub struct WorkerEvent<'a> {
    /// `worker.<kind>`.
    pub event: &'static str,
    pub timestamp: f64,
    pub worker: &'a str,
    pub hostname: &'a str,
    pub pid: u32,
    pub version: &'static str,
    pub queues: &'a [String],
    pub concurrency: usize,
    /// Seconds between heartbeats: a worker silent for a few of them is gone.
    pub heartbeat_interval: f64,
    /// Tasks running, and waiting in this worker for a slot.
    pub running: usize,
    pub prefetched: usize,
    /// Tasks ended since start, by state.
    pub processed: Processed,
    /// The machine's load averages over 1, 5 and 15 minutes.
    pub loadavg: [f64; 3],
    /// Resident memory of the worker process, in bytes.
    pub rss_bytes: u64,
}

const KINDS: [(&str, &str); 8] = [
    ("received", "task.received"),
    ("started", "task.started"),
    ("succeeded", "task.succeeded"),
    ("failed", "task.failed"),
    ("retried", "task.retried"),
    ("revoked", "task.revoked"),
    ("rejected", "task.rejected"),
    ("dead_lettered", "task.dead_lettered"),
];

/// Publishes task events; hooked in with `Hooks::with` when `--events` is on.
pub struct EventStream {
    sink: EventSink,
    worker: String,
    /// Where a task's runtime is found for the events whose hook does not carry it.
    activity: Option<Activity>,
    subjects: Vec<Subject>,
}

impl EventStream {
    pub fn new(sink: EventSink, worker: String, activity: Option<Activity>) -> EventStream {
        let subjects = KINDS
            .iter()
            .map(|(kind, _)| Subject::from(task_event_subject(kind)))
            .collect();
        EventStream {
            sink,
            worker,
            activity,
            subjects,
        }
    }

    fn runtime_of(&self, id: &str) -> Option<f64> {
        self.activity.as_ref()?.runtime_of(id)
    }

    fn send<'a>(&'a self, kind: usize, task: TaskRef<'a>, fill: impl FnOnce(&mut TaskEvent<'a>)) {
        let mut event = TaskEvent {
            event: KINDS[kind].1,
            timestamp: now_unix(),
            id: task.id,
            task: task.task,
            queue: task.queue,
            worker: &self.worker,
            attempt: task.attempt,
            runtime: None,
            error_type: None,
            error: None,
            retry_in: None,
            reason: None,
            parent_id: task.parent_id,
            root_id: task.root_id,
        };
        fill(&mut event);
        match serde_json::to_vec(&event) {
            Ok(json) => self.sink.send(&self.subjects[kind], json),
            Err(e) => tracing::debug!(error = %e, "cannot encode an event"),
        }
    }

    fn send_error<'a>(
        &'a self,
        kind: usize,
        task: TaskRef<'a>,
        error: &'a TaskError,
        retry_in: Option<f64>,
    ) {
        let runtime = self.runtime_of(task.id);
        self.send(kind, task, |e| {
            e.runtime = runtime;
            e.error_type = Some(&error.exc_type);
            e.error = Some(cut(&error.message, MAX_MESSAGE_CHARS));
            e.retry_in = retry_in;
        });
    }
}

/// `text` cut to at most `max` characters.
fn cut(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

impl Hook for EventStream {
    fn received(&self, task: TaskRef<'_>) {
        self.send(0, task, |_| {});
    }
    fn started(&self, task: TaskRef<'_>) {
        self.send(1, task, |_| {});
    }
    fn succeeded(&self, task: TaskRef<'_>, runtime_secs: f64) {
        self.send(2, task, |e| e.runtime = Some(runtime_secs));
    }
    fn failed(&self, task: TaskRef<'_>, error: &TaskError) {
        self.send_error(3, task, error, None);
    }
    fn retried(&self, task: TaskRef<'_>, error: &TaskError, delay_secs: f64) {
        self.send_error(4, task, error, Some(delay_secs));
    }
    fn revoked(&self, task: TaskRef<'_>, error: &TaskError) {
        self.send_error(5, task, error, None);
    }
    fn rejected(&self, task: TaskRef<'_>, error: &TaskError) {
        self.send_error(6, task, error, None);
    }
    fn dead_lettered(&self, task: TaskRef<'_>, reason: &str) {
        self.send(7, task, |e| e.reason = Some(reason));
    }
}

/// The subject of a worker event of `kind` (`online`, `heartbeat`, `offline`).
pub fn worker_subject(kind: &str) -> Subject {
    Subject::from(worker_event_subject(kind))
}

/// The machine's load averages, zeros if unknown.
pub fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = [0.0; 3];
    for (slot, field) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = field.parse().unwrap_or(0.0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_event_names_the_task_worker_and_error_type() {
        let error = TaskError::new("ValueError", "x".repeat(2000));
        let event = TaskEvent {
            event: "task.failed",
            timestamp: 1.5,
            id: "t1",
            task: "app.add",
            queue: "default",
            worker: "host:1",
            attempt: 1,
            runtime: Some(0.25),
            error_type: Some(&error.exc_type),
            error: Some(cut(&error.message, MAX_MESSAGE_CHARS)),
            retry_in: None,
            reason: None,
            parent_id: None,
            root_id: None,
        };
        let json: serde_json::Value = serde_json::to_value(&event).unwrap();
        assert_eq!(json["event"], "task.failed");
        assert_eq!(json["error_type"], "ValueError");
        assert_eq!(json["worker"], "host:1");
        assert_eq!(json["error"].as_str().unwrap().len(), MAX_MESSAGE_CHARS);
        assert!(json.get("retry_in").is_none(), "absent fields are left out");
    }

    #[test]
    fn subjects_follow_the_protocol_names() {
        assert_eq!(
            worker_subject("online").as_str(),
            "dbtask.events.worker.online"
        );
        assert_eq!(task_event_subject(KINDS[3].0), "dbtask.events.task.failed");
        assert!(loadavg().iter().all(|x| *x >= 0.0));
    }
}

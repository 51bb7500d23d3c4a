//! What Redis holds for a task: its state, its error, its result record, and the error types
//! the worker records when no Python ran.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;

use crate::{is_zero, ProtocolError};

/// A present `result` is `Some` even when it is JSON `null` (a task that returned `None`);
/// only an absent field is `None`.
fn some_raw<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// The states a task goes through, as Celery users know them. PENDING is never stored: it is
/// what a task id without a record reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskState {
    Pending,
    Received,
    Started,
    Retry,
    Success,
    Failure,
    Revoked,
    /// A state of the task's own (`update_state(state="PROGRESS", meta=...)`): never ready.
    /// Only read, never written as such: the worker writes the task's own name for it.
    #[serde(other)]
    Custom,
}

impl TaskState {
    /// A ready state is final: `get()` returns or raises, nothing will overwrite it.
    pub fn is_ready(self) -> bool {
        matches!(
            self,
            TaskState::Success | TaskState::Failure | TaskState::Revoked
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::Received => "RECEIVED",
            TaskState::Started => "STARTED",
            TaskState::Retry => "RETRY",
            TaskState::Success => "SUCCESS",
            TaskState::Failure => "FAILURE",
            TaskState::Revoked => "REVOKED",
            TaskState::Custom => "CUSTOM",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An exception as it crosses processes: the Python type's qualified name (`ValueError`,
/// `myapp.errors.PaymentDeclined`), its message (`str(exc)`) and the formatted traceback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskError {
    #[serde(rename = "type")]
    pub exc_type: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
}

impl TaskError {
    pub fn new(exc_type: impl Into<String>, message: impl Into<String>) -> Self {
        TaskError {
            exc_type: exc_type.into(),
            message: message.into(),
            traceback: None,
        }
    }
}

/// Exception type names the worker itself records when it refuses a message (no Python ran).
pub mod error_types {
    /// The message body is not a valid task message.
    pub const MALFORMED: &str = "dbtask.MalformedMessage";
    /// No imported module registered the task name.
    pub const UNKNOWN_TASK: &str = "dbtask.UnknownTask";
    /// The arguments do not fit the function's signature.
    pub const BAD_ARGUMENTS: &str = "dbtask.InvalidArguments";
    /// The task's return value is not JSON-serializable.
    pub const UNSERIALIZABLE_RESULT: &str = "dbtask.UnserializableResult";
    /// The message or the result exceeds the configured size limit.
    pub const TOO_LARGE: &str = "dbtask.TooLarge";
    /// The task was delivered after its `expires` time: not run (state REVOKED).
    pub const EXPIRED: &str = "dbtask.Expired";
    /// An explicit `Retry` found no retry left and carried no exception of its own.
    pub const MAX_RETRIES_EXCEEDED: &str = "dbtask.MaxRetriesExceeded";
    /// The task ran past its hard time limit (`time_limit`) and was abandoned.
    pub const TIME_LIMIT: &str = "dbtask.TimeLimitExceeded";
    /// The task was revoked (`dbtask.revoke`) before or while it ran.
    pub const REVOKED: &str = "dbtask.TaskRevoked";
    /// The pool process running the task died (a crash, `os._exit`, the OOM killer): the
    /// task did not finish (Celery's `WorkerLostError`).
    pub const WORKER_LOST: &str = "dbtask.WorkerLost";
    /// A periodic tick that did not run: overtaken by the next one, or the previous one was
    /// still running (`skip_if_running`); state REVOKED.
    pub const SKIPPED: &str = "dbtask.Skipped";
}

/// What Redis holds for a task at `dbtask:result:{<id>}`, and what the worker publishes on
/// `dbtask:done:{<id>}`. `result` is set on SUCCESS (JSON `null` for a task returning `None`),
/// `error` on FAILURE (and RETRY: the last error).
#[derive(Debug, Serialize, Deserialize)]
pub struct ResultRecord {
    pub id: String,
    pub state: TaskState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "some_raw"
    )]
    pub result: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// Deliveries of this task so far (1 on the first run).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// Retries so far (the message's `retries`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
    /// `hostname:pid` of the worker that wrote the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_received: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_started: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_done: Option<f64>,
    /// The task's arguments, kept when the worker runs with `result_extended`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kwargs: Option<Box<RawValue>>,
    /// When a RETRY record's next attempt is due (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<f64>,
}

impl ResultRecord {
    /// A record with only the id and state set.
    pub fn new(id: impl Into<String>, state: TaskState) -> Self {
        ResultRecord {
            id: id.into(),
            state,
            task: None,
            result: None,
            error: None,
            attempts: 0,
            retries: 0,
            worker: None,
            queue: None,
            date_received: None,
            date_started: None,
            date_done: None,
            args: None,
            kwargs: None,
            eta: None,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Room for a typical record: serializing into an empty Vec would grow it several times.
        let mut out = Vec::with_capacity(256);
        self.encode_into(&mut out)
            .expect("a ResultRecord always serializes");
        out
    }

    /// Writes the record's JSON into `out` (a command buffer, a socket).
    pub fn encode_into(&self, out: impl std::io::Write) -> std::io::Result<()> {
        serde_json::to_writer(out, self).map_err(std::io::Error::other)
    }

    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        serde_json::from_slice(body).map_err(|e| ProtocolError::Malformed(e.to_string()))
    }
}

/// Error type of the FAILURE record of a dead-lettered task.
pub const DEAD_LETTERED: &str = "dbtask.DeadLettered";

#[cfg(test)]
mod tests {
    use crate::*;
    use serde_json::value::RawValue;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn result_record_round_trips() {
        let mut rec = ResultRecord::new("id-1", TaskState::Failure);
        rec.task = Some("boom".into());
        rec.error = Some(TaskError {
            exc_type: "ValueError".into(),
            message: "bad".into(),
            traceback: Some("Traceback (most recent call last):\n...".into()),
        });
        rec.attempts = 1;
        rec.date_done = Some(5.5);
        let wire = rec.encode();
        let text = std::str::from_utf8(&wire).unwrap();
        assert!(text.contains(r#""state":"FAILURE""#), "{text}");
        assert!(text.contains(r#""type":"ValueError""#), "{text}");
        let back = ResultRecord::decode(&wire).unwrap();
        assert_eq!(back.state, TaskState::Failure);
        assert_eq!(back.error, rec.error);
        assert_eq!(back.attempts, 1);

        let mut ok = ResultRecord::new("id-2", TaskState::Success);
        ok.result = Some(raw("null"));
        let back = ResultRecord::decode(&ok.encode()).unwrap();
        assert_eq!(
            back.result.unwrap().get(),
            "null",
            "a None result stays distinguishable"
        );
    }

    #[test]
    fn states_serialize_as_celery_names() {
        for (state, name) in [
            (TaskState::Pending, "PENDING"),
            (TaskState::Received, "RECEIVED"),
            (TaskState::Started, "STARTED"),
            (TaskState::Retry, "RETRY"),
            (TaskState::Success, "SUCCESS"),
            (TaskState::Failure, "FAILURE"),
            (TaskState::Revoked, "REVOKED"),
        ] {
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{name}\"")
            );
            assert_eq!(state.to_string(), name);
        }
        assert!(TaskState::Success.is_ready() && TaskState::Revoked.is_ready());
        assert!(!TaskState::Started.is_ready() && !TaskState::Retry.is_ready());
    }
}

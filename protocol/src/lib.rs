//! The dbtask wire protocol, shared by the worker and the Python client.
//!
//! Everything that crosses a process boundary is defined here and nowhere else: the JSON task
//! message published to JetStream, the JSON result record stored in Redis, the subject, stream,
//! consumer, header and key names. No tokio, no pyo3: plain data and names.
//!
//! Arguments and results stay raw JSON ([`RawValue`]) on both sides so that they are decoded
//! once, straight into Python objects, never into an intermediate `serde_json::Value`.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;

pub mod canvas;
pub use canvas::{ChordRef, Signature};
mod redact;
pub use redact::redact_url;

/// Version of the message format; a worker rejects messages with a newer major version.
pub const PROTOCOL_VERSION: u32 = 1;

/// The JetStream stream that holds every queued task (WorkQueue retention).
pub const TASK_STREAM: &str = "DBTASK_TASKS";
/// Subjects of [`TASK_STREAM`]: `dbtask.tasks.<queue>`.
pub const TASK_SUBJECT_PREFIX: &str = "dbtask.tasks";
/// Wildcard covering every task subject, used when the stream is created.
pub const TASK_SUBJECT_WILDCARD: &str = "dbtask.tasks.>";

/// Subjects holding tasks that wait for their `eta` (countdown, retries):
/// `dbtask.sched.<queue>.<task id>`, one NATS message schedule each (`Nats-Schedule: @at ...`),
/// in the same stream; at the time, the server publishes the body to `dbtask.tasks.<queue>`.
pub const SCHEDULE_SUBJECT_PREFIX: &str = "dbtask.sched";
/// Wildcard covering every schedule subject, added to the task stream.
pub const SCHEDULE_SUBJECT_WILDCARD: &str = "dbtask.sched.>";
/// Header of a message schedule (ADR-51): `@at <RFC 3339 UTC time>`.
pub const HEADER_SCHEDULE: &str = "Nats-Schedule";
/// Header naming the subject a message schedule publishes to.
pub const HEADER_SCHEDULE_TARGET: &str = "Nats-Schedule-Target";

/// Header carrying the task id: JetStream drops a second publish of the same id inside the
/// stream's duplicate window, so a client that retries a publish never enqueues a task twice.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// Header carrying the task name, so that a worker can name the task in its logs and its
/// FAILURE record even when the body does not decode.
pub const HEADER_TASK: &str = "Dbtask-Task";
/// Header carrying the task id (duplicate of the body's `id`, for the same reason).
pub const HEADER_TASK_ID: &str = "Dbtask-Id";

/// Redis key prefix of result records: `dbtask:result:<task id>` holds a JSON [`ResultRecord`].
pub const RESULT_KEY_PREFIX: &str = "dbtask:result:";
/// Redis pub/sub channel prefix: the worker publishes the record JSON to
/// `dbtask:done:<task id>` right after storing a final (ready) state.
pub const DONE_CHANNEL_PREFIX: &str = "dbtask:done:";

/// Redis sorted set of revoked task ids, each scored by the Unix time its revocation expires.
/// Clients add to it (pruning expired members); workers load it at start.
pub const REVOKED_SET_KEY: &str = "dbtask:revoked";
/// Redis pub/sub channel announcing each revocation live, as a JSON [`RevokeNotice`].
pub const REVOKE_CHANNEL: &str = "dbtask:revoke";

/// What a client publishes on [`REVOKE_CHANNEL`] after adding the id to [`REVOKED_SET_KEY`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevokeNotice {
    pub id: String,
    /// Stop the task if it is running (cancel an `async def`, raise in a sync one).
    #[serde(default)]
    pub terminate: bool,
    /// Unix time after which the revocation is forgotten.
    pub expires: f64,
}

/// Longest accepted queue name.
pub const MAX_QUEUE_NAME_LEN: usize = 64;
/// Longest accepted task name.
pub const MAX_TASK_NAME_LEN: usize = 200;
/// Longest accepted task id.
pub const MAX_TASK_ID_LEN: usize = 128;

/// The JetStream subject a queue's tasks are published to.
pub fn task_subject(queue: &str) -> String {
    format!("{TASK_SUBJECT_PREFIX}.{queue}")
}

/// The subject holding a task that waits for its `eta` (a message schedule).
pub fn schedule_subject(queue: &str, task_id: &str) -> String {
    format!("{SCHEDULE_SUBJECT_PREFIX}.{queue}.{task_id}")
}

/// The `Nats-Schedule` header value running a message at Unix time `eta`:
/// `@at 2026-01-02T03:04:05.678Z` (RFC 3339, UTC, millisecond precision).
pub fn schedule_at(eta: f64) -> String {
    let ms = (eta.max(0.0) * 1000.0).round() as i64;
    let (secs, ms) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "@at {year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The durable pull consumer every worker of a queue shares.
pub fn consumer_name(queue: &str) -> String {
    format!("dbtask-{queue}")
}

/// Redis key of a task's result record.
pub fn result_key(task_id: &str) -> String {
    format!("{RESULT_KEY_PREFIX}{task_id}")
}

/// Redis pub/sub channel announcing that a task reached a ready state.
pub fn done_channel(task_id: &str) -> String {
    format!("{DONE_CHANNEL_PREFIX}{task_id}")
}

/// Why a name, id or message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid queue name {0:?}: use 1 to 64 characters among A-Z a-z 0-9 _ -")]
    InvalidQueue(String),
    #[error("invalid task name {0:?}: use 1 to 200 printable characters without spaces")]
    InvalidTaskName(String),
    #[error("invalid task id {0:?}: use 1 to 128 characters among A-Z a-z 0-9 _ - . :")]
    InvalidTaskId(String),
    #[error("message is not a dbtask task message: {0}")]
    Malformed(String),
    #[error("message has protocol version {0}, this worker understands up to {PROTOCOL_VERSION}: upgrade the worker")]
    UnsupportedVersion(u32),
}

/// Queue names become NATS subject tokens and consumer names, so only a safe alphabet passes.
pub fn validate_queue(queue: &str) -> Result<(), ProtocolError> {
    let ok = !queue.is_empty()
        && queue.len() <= MAX_QUEUE_NAME_LEN
        && queue
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::InvalidQueue(queue.to_owned()))
    }
}

/// Task names are Python-style dotted names; anything printable without white space passes.
pub fn validate_task_name(name: &str) -> Result<(), ProtocolError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TASK_NAME_LEN
        && name.chars().all(|c| !c.is_whitespace() && !c.is_control());
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::InvalidTaskName(name.to_owned()))
    }
}

/// Task ids are Redis key and NATS header material: a safe alphabet only.
pub fn validate_task_id(id: &str) -> Result<(), ProtocolError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_TASK_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::InvalidTaskId(id.to_owned()))
    }
}

fn empty_args() -> Box<RawValue> {
    RawValue::from_string("[]".to_owned()).expect("literal JSON")
}

fn empty_kwargs() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).expect("literal JSON")
}

fn default_version() -> u32 {
    PROTOCOL_VERSION
}

/// A present `result` is `Some` even when it is JSON `null` (a task that returned `None`);
/// only an absent field is `None`.
fn some_raw<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The subject of a task message and, for a delayed one, its `Nats-Schedule` header value and
/// `Nats-Schedule-Target` subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub subject: String,
    pub schedule: Option<(String, String)>,
}

impl Route {
    /// The schedule headers to add to the message, if any.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.schedule.iter().flat_map(|(at, target)| {
            [
                (HEADER_SCHEDULE, at.as_str()),
                (HEADER_SCHEDULE_TARGET, target.as_str()),
            ]
        })
    }
}

/// One task to run: the body of a JetStream message on `dbtask.tasks.<queue>`.
///
/// Times are Unix seconds (UTC) as floats. Unknown fields are ignored, so a newer client can add
/// optional fields without breaking older workers.
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskMessage {
    /// Format version ([`PROTOCOL_VERSION`]).
    #[serde(default = "default_version")]
    pub v: u32,
    /// Task id (a UUID unless the caller chose one); also the result key and `Nats-Msg-Id`.
    pub id: String,
    /// Registered task name.
    pub task: String,
    /// Positional arguments: a JSON array.
    #[serde(default = "empty_args")]
    pub args: Box<RawValue>,
    /// Keyword arguments: a JSON object.
    #[serde(default = "empty_kwargs")]
    pub kwargs: Box<RawValue>,
    /// Queue the message was published to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Run no earlier than this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<f64>,
    /// Do not run after this time (the task becomes REVOKED).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<f64>,
    /// How many times this task was retried before this message (0 on the first publish).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
    /// Priority level 0..=9 (9 first); `None` is [`DEFAULT_PRIORITY`]. Decides the subject
    /// (see [`TaskMessage::route`]), and rides along so that retries keep their level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// When the client published the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<f64>,
    /// Workflow: the chain steps still to run after this task ([`canvas`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<Signature>,
    /// Workflow: the chord this task completes a member of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chord: Option<ChordRef>,
    /// Workflow: callbacks published with the result on success.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub link: Vec<Signature>,
    /// Workflow: callbacks published with `(task id, error)` on failure.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub link_error: Vec<Signature>,
}

impl TaskMessage {
    /// Decodes and validates a message body. The error says what is wrong in words a person
    /// reading the FAILURE record can act on.
    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        let msg: TaskMessage =
            serde_json::from_slice(body).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
        if msg.v > PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion(msg.v));
        }
        validate_task_id(&msg.id)?;
        validate_task_name(&msg.task)?;
        if !msg.args.get().trim_start().starts_with('[') {
            return Err(ProtocolError::Malformed(
                "`args` must be a JSON array".into(),
            ));
        }
        if !msg.kwargs.get().trim_start().starts_with('{') {
            return Err(ProtocolError::Malformed(
                "`kwargs` must be a JSON object".into(),
            ));
        }
        if msg.priority.is_some_and(|p| p > MAX_PRIORITY) {
            return Err(ProtocolError::Malformed(format!(
                "`priority` must be 0 to {MAX_PRIORITY}"
            )));
        }
        Ok(msg)
    }

    /// Where to publish this message for `queue` at time `now`: the subject of its priority
    /// level, or, while its `eta` is ahead, a message schedule that the server publishes to
    /// that subject at the eta. The one routing rule for the client, retries and workflows.
    pub fn route(&self, queue: &str, now: f64) -> Route {
        let target = priority_subject(queue, self.priority.unwrap_or(DEFAULT_PRIORITY));
        match self.eta {
            Some(at) if at > now => Route {
                subject: schedule_subject(queue, &self.id),
                schedule: Some((schedule_at(at), target)),
            },
            _ => Route {
                subject: target,
                schedule: None,
            },
        }
    }

    /// Encodes the message as its wire JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a TaskMessage always serializes")
    }
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
}

/// What Redis holds for a task at `dbtask:result:<id>`, and what the worker publishes on
/// `dbtask:done:<id>`. `result` is set on SUCCESS (JSON `null` for a task returning `None`),
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

/// Current time as Unix seconds.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------
// Rate limits, priorities and dead letters (issue 3, items 6, 7, 9).

/// Redis key prefix of a task's cluster-wide rate limiter: `dbtask:rate:<task name>` holds the
/// theoretical arrival time (microseconds) of the next allowed start (GCRA).
pub const RATE_KEY_PREFIX: &str = "dbtask:rate:";

/// Redis key of a task's rate limiter.
pub fn rate_key(task: &str) -> String {
    format!("{RATE_KEY_PREFIX}{task}")
}

/// A task's rate limit: at most `count` starts per `period_secs`, across all workers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub count: u64,
    pub period_secs: f64,
}

impl Rate {
    /// Parses `"100/s"`, `"10/m"`, `"1000/h"` (also `sec`, `min`, `hour`, and a bare number,
    /// which means per second as in Celery).
    pub fn parse(text: &str) -> Result<Rate, String> {
        let bad = || {
            format!(
                "invalid rate_limit {text:?}: use \"<count>/s\", \"<count>/m\" or \"<count>/h\" with a whole count of at least 1, e.g. \"100/s\""
            )
        };
        let (count, unit) = match text.trim().split_once('/') {
            Some((c, u)) => (c.trim(), u.trim()),
            None => (text.trim(), "s"),
        };
        let count: u64 = count.parse().map_err(|_| bad())?;
        let period_secs = match unit {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(bad());
        }
        Ok(Rate { count, period_secs })
    }

    /// Time between two starts, in microseconds.
    pub fn interval_micros(&self) -> u64 {
        ((self.period_secs * 1e6) / self.count as f64)
            .round()
            .max(1.0) as u64
    }
}

/// Highest priority (`apply_async(priority=9)` runs first).
pub const MAX_PRIORITY: u8 = 9;
/// The priority of a task sent without one; such tasks keep the plain subject
/// `dbtask.tasks.<queue>` and the plain consumer `dbtask-<queue>`.
pub const DEFAULT_PRIORITY: u8 = 5;

/// The subject of a queue's tasks at `priority`: the default level is the plain task subject,
/// the others `dbtask.tasks.<queue>.p<N>` (a token more, so no consumer filter overlaps).
pub fn priority_subject(queue: &str, priority: u8) -> String {
    if priority == DEFAULT_PRIORITY {
        task_subject(queue)
    } else {
        format!("{TASK_SUBJECT_PREFIX}.{queue}.p{priority}")
    }
}

/// The durable consumer of a queue's priority level (the plain one for the default level).
pub fn priority_consumer_name(queue: &str, priority: u8) -> String {
    if priority == DEFAULT_PRIORITY {
        consumer_name(queue)
    } else {
        format!("dbtask-{queue}-p{priority}")
    }
}

/// The priority a task subject stands for, `None` if it is not a task subject.
pub fn subject_priority(subject: &str) -> Option<u8> {
    let rest = subject
        .strip_prefix(TASK_SUBJECT_PREFIX)?
        .strip_prefix('.')?;
    match rest.split_once('.') {
        None => Some(DEFAULT_PRIORITY),
        Some((_, level)) => {
            let n: u8 = level.strip_prefix('p')?.parse().ok()?;
            (n <= MAX_PRIORITY && n != DEFAULT_PRIORITY).then_some(n)
        }
    }
}

/// The dead-letter stream (limits retention): messages that exhausted their deliveries.
pub const DEAD_STREAM: &str = "DBTASK_DEAD";
/// Subjects of [`DEAD_STREAM`]: `dbtask.dead.<queue>`.
pub const DEAD_SUBJECT_PREFIX: &str = "dbtask.dead";
/// Wildcard covering every dead-letter subject.
pub const DEAD_SUBJECT_WILDCARD: &str = "dbtask.dead.>";

/// The subject a queue's dead letters are published to.
pub fn dead_subject(queue: &str) -> String {
    format!("{DEAD_SUBJECT_PREFIX}.{queue}")
}

/// Headers a dead letter carries besides the original ones.
pub mod dead_headers {
    /// Why the message was dead-lettered.
    pub const REASON: &str = "Dbtask-Dead-Reason";
    /// The subject the message was originally published to (where a replay sends it).
    pub const SUBJECT: &str = "Dbtask-Dead-Subject";
    /// Its sequence in the task stream.
    pub const STREAM_SEQ: &str = "Dbtask-Dead-Stream-Seq";
    /// How many times it was delivered.
    pub const DELIVERIES: &str = "Dbtask-Dead-Deliveries";
    /// When it was dead-lettered (Unix seconds).
    pub const AT: &str = "Dbtask-Dead-At";
    /// The worker that dead-lettered it.
    pub const WORKER: &str = "Dbtask-Dead-Worker";
}

/// Error type of the FAILURE record of a dead-lettered task.
pub const DEAD_LETTERED: &str = "dbtask.DeadLettered";

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn task_message_round_trips_with_raw_arguments_untouched() {
        let msg = TaskMessage {
            v: PROTOCOL_VERSION,
            id: "0b1c-42".into(),
            task: "myapp.tasks.add".into(),
            args: raw(r#"[1, 2.5, "x", null, [1, {"a": 1}]]"#),
            kwargs: raw(r#"{"flag": true}"#),
            queue: Some("math".into()),
            eta: Some(1_700_000_000.25),
            expires: None,
            retries: 2,
            priority: Some(7),
            sent_at: Some(1_700_000_000.0),
            chain: Vec::new(),
            chord: None,
            link: Vec::new(),
            link_error: Vec::new(),
        };
        let back = TaskMessage::decode(&msg.encode()).unwrap();
        assert_eq!(back.id, "0b1c-42");
        assert_eq!(back.task, "myapp.tasks.add");
        assert_eq!(back.args.get(), r#"[1, 2.5, "x", null, [1, {"a": 1}]]"#);
        assert_eq!(back.kwargs.get(), r#"{"flag": true}"#);
        assert_eq!(back.queue.as_deref(), Some("math"));
        assert_eq!(back.eta, Some(1_700_000_000.25));
        assert_eq!(back.expires, None);
        assert_eq!(back.retries, 2);
    }

    #[test]
    fn revoke_notice_round_trips_and_terminate_defaults_to_false() {
        let notice = RevokeNotice {
            id: "t-1".into(),
            terminate: true,
            expires: 1_700_000_000.5,
        };
        let back: RevokeNotice =
            serde_json::from_slice(&serde_json::to_vec(&notice).unwrap()).unwrap();
        assert_eq!(back, notice);
        let minimal: RevokeNotice =
            serde_json::from_str(r#"{"id": "t-2", "expires": 1.0}"#).unwrap();
        assert!(!minimal.terminate);
    }

    #[test]
    fn minimal_message_gets_defaults() {
        let msg = TaskMessage::decode(br#"{"id": "a1", "task": "add"}"#).unwrap();
        assert_eq!(msg.v, PROTOCOL_VERSION);
        assert_eq!(msg.args.get(), "[]");
        assert_eq!(msg.kwargs.get(), "{}");
        assert_eq!(msg.retries, 0);
        // Optional fields are left out on the wire rather than sent as nulls.
        let wire = String::from_utf8(msg.encode()).unwrap();
        assert!(!wire.contains("eta"), "{wire}");
        assert!(!wire.contains("retries"), "{wire}");
    }

    #[test]
    fn malformed_messages_are_refused_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not a dbtask task message"),
            (br#"{"task": "add"}"#, "missing field `id`"),
            (
                br#"{"id": "a", "task": "add", "args": {"x": 1}}"#,
                "must be a JSON array",
            ),
            (
                br#"{"id": "a", "task": "add", "kwargs": [1]}"#,
                "must be a JSON object",
            ),
            (br#"{"id": "a b", "task": "add"}"#, "invalid task id"),
            (br#"{"id": "a", "task": ""}"#, "invalid task name"),
            (
                br#"{"v": 99, "id": "a", "task": "add"}"#,
                "protocol version 99",
            ),
        ];
        for (body, expected) in cases {
            let err = TaskMessage::decode(body).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{:?}: {err}",
                String::from_utf8_lossy(body)
            );
        }
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

    #[test]
    fn schedule_header_is_rfc3339_utc() {
        assert_eq!(schedule_at(0.0), "@at 1970-01-01T00:00:00.000Z");
        assert_eq!(
            schedule_at(1_700_000_000.25),
            "@at 2023-11-14T22:13:20.250Z"
        );
        assert_eq!(schedule_at(951_825_600.0), "@at 2000-02-29T12:00:00.000Z");
        assert_eq!(schedule_subject("q", "a.b"), "dbtask.sched.q.a.b");
    }

    #[test]
    fn names_and_validation() {
        assert_eq!(task_subject("math"), "dbtask.tasks.math");
        assert_eq!(consumer_name("math"), "dbtask-math");
        assert_eq!(result_key("x"), "dbtask:result:x");
        assert_eq!(done_channel("x"), "dbtask:done:x");
        assert!(validate_queue("default").is_ok());
        assert!(validate_queue("high_prio-2").is_ok());
        for bad in ["", "a.b", "a*", "a>", "a b", &"q".repeat(65)] {
            assert!(validate_queue(bad).is_err(), "{bad:?}");
        }
        assert!(validate_task_name("myapp.tasks.add").is_ok());
        assert!(validate_task_name("add me").is_err());
        assert!(validate_task_id("3f2a-11:x.y_z").is_ok());
        assert!(validate_task_id("a/b").is_err());
    }

    #[test]
    fn rates_parse_or_explain() {
        assert_eq!(
            Rate::parse("100/s").unwrap(),
            Rate {
                count: 100,
                period_secs: 1.0
            }
        );
        assert_eq!(Rate::parse("10/m").unwrap().period_secs, 60.0);
        assert_eq!(Rate::parse("1000/h").unwrap().interval_micros(), 3_600_000);
        assert_eq!(Rate::parse("5").unwrap().interval_micros(), 200_000);
        for bad in ["", "0/s", "x/s", "10/d", "-1/s", "1.5/s"] {
            assert!(
                Rate::parse(bad).unwrap_err().contains("invalid rate_limit"),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_message_routes_to_its_level_or_to_a_schedule_targeting_it() {
        let mut msg = TaskMessage::decode(br#"{"id": "t1", "task": "add"}"#).unwrap();
        assert_eq!(
            msg.route("q", 10.0),
            Route {
                subject: "dbtask.tasks.q".into(),
                schedule: None
            }
        );
        msg.priority = Some(9);
        assert_eq!(msg.route("q", 10.0).subject, "dbtask.tasks.q.p9");
        msg.eta = Some(5.0); // in the past: straight to the level
        assert_eq!(msg.route("q", 10.0).subject, "dbtask.tasks.q.p9");
        msg.eta = Some(20.0);
        let route = msg.route("q", 10.0);
        assert_eq!(route.subject, "dbtask.sched.q.t1");
        let headers: Vec<_> = route.headers().collect();
        assert_eq!(
            headers,
            [
                (HEADER_SCHEDULE, "@at 1970-01-01T00:00:20.000Z"),
                (HEADER_SCHEDULE_TARGET, "dbtask.tasks.q.p9")
            ]
        );
        // The level rides along in the body, so a retry keeps it.
        assert_eq!(
            TaskMessage::decode(&msg.encode()).unwrap().priority,
            Some(9)
        );
        assert!(TaskMessage::decode(br#"{"id": "t", "task": "a", "priority": 10}"#).is_err());
    }

    #[test]
    fn priority_subjects_do_not_overlap() {
        assert_eq!(priority_subject("q", DEFAULT_PRIORITY), "dbtask.tasks.q");
        assert_eq!(priority_subject("q", 9), "dbtask.tasks.q.p9");
        assert_eq!(priority_consumer_name("q", 0), "dbtask-q-p0");
        for p in 0..=MAX_PRIORITY {
            assert_eq!(subject_priority(&priority_subject("q", p)), Some(p));
        }
        assert_eq!(subject_priority("dbtask.tasks.q.p5"), None);
        assert_eq!(subject_priority("dbtask.dead.q"), None);
    }
}

//! What a client publishes: the task message (and where it goes), and a revocation notice.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::canvas::{ChordRef, Signature};
use crate::{
    is_zero, priority_subject, schedule_at, schedule_subject, validate_task_id, validate_task_name,
    ProtocolError, DEFAULT_PRIORITY, HEADER_SCHEDULE, HEADER_SCHEDULE_TARGET, MAX_PRIORITY,
    PROTOCOL_VERSION,
};

/// How deep the arguments of a task may nest, counting the `args` array (or `kwargs` object)
/// itself: the client refuses deeper values when it encodes them, the worker records a deeper
/// message as malformed before Python decodes it.
pub const MAX_JSON_DEPTH: usize = 100;

/// The deepest nesting of arrays and objects in JSON text (strings skipped); one pass, no
/// allocation.
pub fn json_depth(json: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in json.as_bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
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
    /// Workflow: the task whose outcome published this one (the previous step of a chain,
    /// the member that completed a chord, the task of a link); a task's `request.parent_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// Workflow: the first task of the workflow this one belongs to (`None`: this task is its
    /// own root); a task's `request.root_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_id: Option<String>,
    /// `apply_async(ignore_result=...)`: whether to store no record on success, overriding the
    /// task's `ignore_result` option; `None`: the task's option.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_result: Option<bool>,
}

/// Seconds before its eta that the server releases a task waiting on a message schedule. The
/// server's schedule timer fires up to about 250 ms after the time it is given; released early,
/// a task is held by the worker that receives it and starts within a millisecond or two of its
/// eta, never before.
pub const SCHEDULE_LEAD: f64 = 0.3;

impl TaskMessage {
    /// A first attempt of `task` with these arguments and nothing else: no queue, eta,
    /// expiry, priority, workflow or parent. Callers set what they have with struct update
    /// syntax (`TaskMessage { queue: ..., ..TaskMessage::new(...) }`).
    pub fn new(id: String, task: String, args: Box<RawValue>, kwargs: Box<RawValue>) -> Self {
        TaskMessage {
            v: PROTOCOL_VERSION,
            id,
            task,
            args,
            kwargs,
            queue: None,
            eta: None,
            expires: None,
            retries: 0,
            priority: None,
            sent_at: None,
            chain: Vec::new(),
            chord: None,
            link: Vec::new(),
            link_error: Vec::new(),
            parent_id: None,
            root_id: None,
            ignore_result: None,
        }
    }

    /// Decodes and validates a message body. The error says what is wrong in words a person
    /// reading the FAILURE record can act on.
    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        let msg: TaskMessage = serde_json::from_slice(body).map_err(ProtocolError::Json)?;
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
        for (name, value) in [("args", &msg.args), ("kwargs", &msg.kwargs)] {
            if json_depth(value.get()) > MAX_JSON_DEPTH {
                return Err(ProtocolError::Malformed(format!(
                    "`{name}` nest deeper than {MAX_JSON_DEPTH} levels"
                )));
            }
        }
        if msg.priority.is_some_and(|p| p > MAX_PRIORITY) {
            return Err(ProtocolError::Malformed(format!(
                "`priority` must be 0 to {MAX_PRIORITY}"
            )));
        }
        Ok(msg)
    }

    /// Where to publish this message for `queue` at time `now`: the subject of its priority
    /// level, or, while its `eta` is more than [`SCHEDULE_LEAD`] ahead, a message schedule
    /// that the server publishes to that subject [`SCHEDULE_LEAD`] before the eta. The worker
    /// holds a task that arrives before its eta until then. The one routing rule for the
    /// client, retries and workflows.
    pub fn route(&self, queue: &str, now: f64) -> Route {
        let target = priority_subject(queue, self.priority.unwrap_or(DEFAULT_PRIORITY));
        match self.eta {
            Some(at) if at - SCHEDULE_LEAD > now => Route {
                subject: schedule_subject(queue, &self.id),
                schedule: Some((schedule_at(at - SCHEDULE_LEAD), target)),
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

#[cfg(test)]
mod tests {
    use crate::*;
    use serde_json::value::RawValue;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn arguments_nested_deeper_than_the_limit_are_malformed() {
        assert_eq!(json_depth(r#"[1, "[[[\"[", {"a": [2]}]"#), 3);
        let nested = |levels: usize| "[".repeat(levels) + &"]".repeat(levels);
        let body = |args: &str| format!(r#"{{"id": "t1", "task": "add", "args": {args}}}"#);
        TaskMessage::decode(body(&nested(MAX_JSON_DEPTH)).as_bytes()).unwrap();
        for levels in [MAX_JSON_DEPTH + 1, 100_000] {
            let err = TaskMessage::decode(body(&nested(levels)).as_bytes()).unwrap_err();
            assert!(
                matches!(&err, ProtocolError::Malformed(m) if m.contains("`args` nest deeper than 100 levels")),
                "{err}"
            );
        }
        let deep_kwargs = format!(
            r#"{{"id": "t1", "task": "add", "kwargs": {{"a": {}}}}}"#,
            nested(MAX_JSON_DEPTH)
        );
        assert!(TaskMessage::decode(deep_kwargs.as_bytes()).is_err());
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
            parent_id: None,
            root_id: None,
            ignore_result: None,
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
        msg.eta = Some(10.2); // within the lead: straight to the level, the worker holds it
        assert_eq!(msg.route("q", 10.0).subject, "dbtask.tasks.q.p9");
        msg.eta = Some(20.0);
        let route = msg.route("q", 10.0);
        assert_eq!(route.subject, "dbtask.sched.q.t1");
        let headers: Vec<_> = route.headers().collect();
        assert_eq!(
            headers,
            [
                (HEADER_SCHEDULE, "@at 1970-01-01T00:00:19.700Z"),
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
}

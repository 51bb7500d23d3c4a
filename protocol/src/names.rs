//! Names: the JetStream streams, subjects and consumers, the Redis keys and channels, and the
//! formats of the `Nats-Msg-Id`s that are not a task id. Plain functions of a queue, a task id
//! or a task name; nothing here does I/O.

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

/// Redis key prefix of result records: `dbtask:result:{<task id>}` holds a JSON
/// [`ResultRecord`](crate::ResultRecord). The braces are a Redis Cluster hash tag: a task's
/// record and its notification channel hash to the same slot, so one pipeline stores both.
pub const RESULT_KEY_PREFIX: &str = "dbtask:result:{";
/// Redis pub/sub channel prefix: the worker publishes the record JSON to
/// `dbtask:done:{<task id>}` right after storing a final (ready) state.
pub const DONE_CHANNEL_PREFIX: &str = "dbtask:done:{";
/// What closes the task id's hash tag in [`result_key`] and [`done_channel`].
pub const TASK_TAG_END: &str = "}";

/// Redis sorted set of revoked task ids, each scored by the Unix time its revocation expires.
/// Clients add to it (pruning expired members); workers load it at start. Its hash tag is the
/// channel's: the client adds and announces in one MULTI, which Redis Cluster keeps to a slot.
pub const REVOKED_SET_KEY: &str = "dbtask:{revoke}:ids";
/// Redis pub/sub channel announcing each revocation live, as a JSON [`RevokeNotice`](crate::RevokeNotice).
pub const REVOKE_CHANNEL: &str = "dbtask:{revoke}";

/// The JetStream subject a queue's tasks are published to.
pub fn task_subject(queue: &str) -> String {
    format!("{TASK_SUBJECT_PREFIX}.{queue}")
}

/// The subject holding a task that waits for its `eta` (a message schedule).
pub fn schedule_subject(queue: &str, task_id: &str) -> String {
    format!("{SCHEDULE_SUBJECT_PREFIX}.{queue}.{task_id}")
}

/// The durable pull consumer every worker of a queue shares.
pub fn consumer_name(queue: &str) -> String {
    format!("dbtask-{queue}")
}

/// Redis key of a task's result record.
pub fn result_key(task_id: &str) -> String {
    format!("{RESULT_KEY_PREFIX}{task_id}{TASK_TAG_END}")
}

/// Redis pub/sub channel announcing that a task reached a ready state.
pub fn done_channel(task_id: &str) -> String {
    format!("{DONE_CHANNEL_PREFIX}{task_id}{TASK_TAG_END}")
}

/// The task id a [`done_channel`] is about, `None` for another channel.
pub fn done_channel_task(channel: &str) -> Option<&str> {
    channel
        .strip_prefix(DONE_CHANNEL_PREFIX)?
        .strip_suffix(TASK_TAG_END)
}

/// Redis key prefix of a task's cluster-wide rate limiter: `dbtask:rate:<task name>` holds the
/// theoretical arrival time (microseconds) of the next allowed start (GCRA).
pub const RATE_KEY_PREFIX: &str = "dbtask:rate:";

/// Redis key of a task's rate limiter.
pub fn rate_key(task: &str) -> String {
    format!("{RATE_KEY_PREFIX}{task}")
}

/// Redis key prefix of a task message's lost deliveries, by its sequence in the task stream:
/// `dbtask:deliveries:<seq>` is a hash with `idle` (deliveries lost while the message waited
/// without running: a crash of its worker, a shutdown; not charged against `max_deliver`),
/// `lost` (deliveries whose run the worker's death cut short) and `cause` (how the last of
/// those workers died). Written by the worker that finds a dead worker's journal.
pub const DELIVERIES_KEY_PREFIX: &str = "dbtask:deliveries:";

/// Redis key of the lost deliveries of the task message at `stream_seq`.
pub fn deliveries_key(stream_seq: u64) -> String {
    format!("{DELIVERIES_KEY_PREFIX}{stream_seq}")
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

/// The `Nats-Msg-Id` of a task's retry number `retries`: a worker that crashes after
/// publishing the retry and before its ack publishes it again, and JetStream drops the copy.
pub fn retry_msg_id(task_id: &str, retries: u32) -> String {
    format!("{task_id}:retry:{retries}")
}

/// The `Nats-Msg-Id` of a task delivered before its eta and scheduled again: one per delivered
/// message (`stream_seq`), so a crash between that publish and the ack schedules it once.
pub fn eta_msg_id(task_id: &str, stream_seq: u64) -> String {
    format!("{task_id}:eta:{stream_seq}")
}

/// The `Nats-Msg-Id` of a dead letter: one per message of the task stream, so a second
/// dead-lettering of the same message (a crash before the ack) is dropped.
pub fn dead_msg_id(queue: &str, stream_seq: u64) -> String {
    format!("dead.{queue}.{stream_seq}")
}

/// The `Nats-Msg-Id` of a replayed dead letter: fresh (`now` is Unix seconds), because the
/// task's own id may still be in the task stream's duplicate window.
pub fn replay_msg_id(dead_seq: u64, now: f64) -> String {
    format!("replay.{}.{dead_seq}.{now}", crate::DEAD_STREAM)
}

/// Core NATS subjects of the lifecycle events a worker started with `--events` publishes (not
/// stored in any stream): `dbtask.events.task.<kind>` and `dbtask.events.worker.<kind>`.
pub const EVENTS_SUBJECT_PREFIX: &str = "dbtask.events";
/// Wildcard covering every event subject (`dbtask events` subscribes to it).
pub const EVENTS_SUBJECT_WILDCARD: &str = "dbtask.events.>";
/// Kinds of task events: received, started, succeeded, failed, retried, revoked, rejected,
/// dead_lettered.
pub const TASK_EVENT_KINDS: [&str; 8] = [
    "received",
    "started",
    "succeeded",
    "failed",
    "retried",
    "revoked",
    "rejected",
    "dead_lettered",
];
/// Kinds of worker events: online, heartbeat, offline.
pub const WORKER_EVENT_KINDS: [&str; 3] = ["online", "heartbeat", "offline"];

/// The subject of a task event of `kind` (one of [`TASK_EVENT_KINDS`]).
pub fn task_event_subject(kind: &str) -> String {
    format!("{EVENTS_SUBJECT_PREFIX}.task.{kind}")
}

/// The subject of a worker event of `kind` (one of [`WORKER_EVENT_KINDS`]).
pub fn worker_event_subject(kind: &str) -> String {
    format!("{EVENTS_SUBJECT_PREFIX}.worker.{kind}")
}

/// Subjects of the inspect and control requests every worker answers (scatter-gather: each
/// worker replies, the caller collects replies until its timeout): `dbtask.control.<command>`.
/// They are the endpoints of the NATS service [`CONTROL_SERVICE`] (ADR-32), so that
/// `nats micro ls` lists the workers too.
pub const CONTROL_SUBJECT_PREFIX: &str = "dbtask.control";
/// The NATS service name every worker registers under.
pub const CONTROL_SERVICE: &str = "dbtask-worker";
/// The commands: `ping`, `stats`, `active`, `reserved`, `registered`, `queues` (inspect) and
/// `shutdown`, `rate_limit` (control).
pub const CONTROL_COMMANDS: [&str; 8] = [
    "ping",
    "stats",
    "active",
    "reserved",
    "registered",
    "queues",
    "shutdown",
    "rate_limit",
];

/// The subject of an inspect or control `command` (one of [`CONTROL_COMMANDS`]).
pub fn control_subject(command: &str) -> String {
    format!("{CONTROL_SUBJECT_PREFIX}.{command}")
}

/// Redis hash of the rate limits set with `dbtask control rate-limit`: task name -> rate text
/// (`"10/s"`, or `"0"` for no limit). Every worker reads it at start and applies a change
/// announced on [`control_subject`]`("rate_limit")`; the override wins over `@task(rate_limit=...)`.
pub const RATE_OVERRIDES_KEY: &str = "dbtask:rate_limits";

#[cfg(test)]
mod tests {
    use crate::*;

    #[test]
    fn names_and_validation() {
        assert_eq!(task_subject("math"), "dbtask.tasks.math");
        assert_eq!(consumer_name("math"), "dbtask-math");
        assert_eq!(result_key("x"), "dbtask:result:{x}");
        assert_eq!(done_channel("x"), "dbtask:done:{x}");
        assert_eq!(done_channel_task(&done_channel("a:b")), Some("a:b"));
        assert_eq!(done_channel_task("dbtask:revoke"), None);
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

    #[test]
    fn msg_ids_are_distinct_per_purpose() {
        assert_eq!(retry_msg_id("t1", 3), "t1:retry:3");
        assert_eq!(dead_msg_id("q", 42), "dead.q.42");
        assert_eq!(replay_msg_id(7, 1.5), "replay.DBTASK_DEAD.7.1.5");
    }
}

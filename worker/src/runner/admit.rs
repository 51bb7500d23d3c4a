//! Admission: whether a delivered message runs here and now. In order: its size, its decoding
//! (once: the decoded message travels with the delivery from here on), its slot (or its
//! hand-over to the Python threads), finished work redelivered, revocation, an eta not reached
//! yet, expiry, an unknown task, the rate limit. It ends in "run this job" or "settled with
//! this record" (or leaves as it is: handed back, rescheduled). The decisions that need no
//! server are the pure functions [`read`], [`hands_over`] and [`check`].

use std::time::Duration;

use async_nats::jetstream::Message;
use dbtask_protocol::{
    error_types, now_unix, validate_task_id, TaskError, TaskMessage, TaskState, HEADER_TASK,
    HEADER_TASK_ID,
};
use serde::Deserialize;
use tracing::{debug, warn};

use super::handler::{Context, Slot, Ticket};
use super::settle::{How, Settled, REVOKED_BEFORE_START};
use super::tick::TickAdmission;
use super::Disposition;
use super::{reached, Phase, Shared};
use crate::canvas::Flow;
use crate::events::TaskRef;
use crate::python::TaskInfo;

/// A message that waits this long in the prefetch for a slot gets a RECEIVED record. Not at
/// once: on a busy worker every message waits a few milliseconds, and a record for each would
/// double the Redis writes for a state nobody would see.
pub(super) const RECEIVED_AFTER: Duration = Duration::from_millis(100);

/// A message admitted to run.
pub(super) struct Admitted<'a> {
    pub task: TaskMessage,
    pub info: &'a TaskInfo,
    /// `None`: handed over to the Python threads, which take its slot when they start it.
    pub slot: Option<Slot<'a>>,
    pub flow: Option<Flow>,
}

// Returned once per message and taken apart at once: boxing the big variant would cost an
// allocation per task.
#[allow(clippy::large_enum_variant)]
pub(super) enum Admission<'a> {
    Run(Admitted<'a>),
    /// Not run: this record settles it (then the workflow's next steps, then the ack).
    Settled(Settled, Option<Flow>),
    /// Leaves as it is (handed back, or rescheduled for its eta).
    Leave(Disposition),
    /// Unreadable, and no task id to record it under: for the dead-letter stream, with why.
    Unrecordable(String),
}

/// Admits the message `msg` of `ctx`. `ticket` stops counting it as waiting for a slot once
/// it has one (or is handed over).
pub(super) async fn admit<'a>(
    ctx: &Context<'a>,
    ticket: &mut Ticket,
    msg: &Message,
) -> Admission<'a> {
    let shared = ctx.shared;
    let task = match read(&msg.message.payload, shared.config.max_message_bytes) {
        Ok(task) => task,
        Err(error) => return unreadable(ctx, msg, error),
    };
    // A periodic tick gets its id from its schedule and time here (see `tick.rs`).
    let task = match super::tick::Tick::of(msg) {
        None => task,
        Some(tick) => match Box::pin(super::tick::admit(ctx, tick, task)).await {
            TickAdmission::Run(task) => task,
            TickAdmission::Settled(settled) => return Admission::Settled(settled, None),
            TickAdmission::Leave(disposition) => return Admission::Leave(disposition),
        },
    };
    if !hold_until_eta(shared, &task).await {
        return Admission::Leave(Disposition::HandBack);
    }

    // A sync task with nothing to do between getting its slot and running (no STARTED record,
    // no rate limit, no expiry to check) is handed to the Python threads without waiting for
    // its slot: the thread that takes it takes the slot (see `python::Handover`). The others
    // wait for their slot here; at shutdown, a message that has not started goes back at once,
    // and one still waiting after RECEIVED_AFTER is recorded RECEIVED meanwhile.
    let info = shared.python.tasks().get(task.task.as_str());
    ctx.results.set(
        info.map(|i| i.results)
            .unwrap_or_default()
            .for_message(&task),
    );
    if let Some(activity) = &shared.activity {
        let _ = ctx
            .tracked
            .set(activity.track(ctx.task_ref(&task.id, &task.task)));
    }
    let slot = if hands_over(info, shared.config.track_started, &task)
        && !shared.has_rate_override(&task.task)
    {
        None
    } else {
        let Some(permit) = wait_for_slot(ctx, &task).await else {
            return Admission::Leave(Disposition::HandBack);
        };
        // Held while the task runs; the run lets it go as soon as the task function returns,
        // so that storing the outcome and acking (round trips) never keep another task from
        // running.
        ticket.stop_waiting();
        Some(Slot::new(shared, permit))
    };

    let flow = Flow::of(&task);
    let (id, name) = (task.id.as_str(), task.task.as_str());
    debug!(
        task_id = id,
        task = name,
        attempt = ctx.attempt,
        queue = ctx.queue,
        "task received"
    );
    shared.hooks.received(TaskRef {
        parent_id: task.parent_id.as_deref(),
        root_id: task.root_id.as_deref(),
        ..ctx.task_ref(id, name)
    });

    // A redelivery may follow a crash between storing the outcome and acking it; a first
    // delivery may follow a NATS outage that lost the ack.
    let published_ms = || {
        let published = msg.info().ok()?.published;
        i64::try_from(published.unix_timestamp_nanos() / 1_000_000).ok()
    };
    if ctx.attempt > 1 || shared.broker.maybe_handled_before_outage(published_ms) {
        let store = &shared.store;
        let existing = Box::pin(store.retrying("read a task's record", || store.get(id))).await;
        if let Some(done) = existing.filter(|r| r.state.is_ready()) {
            // The crash may have come before the workflow's next steps were published.
            let settled = Settled {
                record: done,
                how: How::AlreadyFinished,
            };
            return Admission::Settled(settled, flow);
        }
    }

    let revoked = shared.revocations.is_revoked(id);
    let info = match check(&task, now_unix(), revoked, info, &shared.config.apps) {
        Check::Run(info) => info,
        Check::NotYet(eta) => {
            // A publish straight to the queue, or a clock ahead of the server's: back into a
            // message schedule, never run early.
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
            let msg_id = dbtask_protocol::eta_msg_id(id, seq);
            return Admission::Leave(Box::pin(reschedule(ctx, &task, eta, &msg_id)).await);
        }
        Check::Refuse(state, error) => {
            let how = if state == TaskState::Revoked {
                How::Revoked
            } else {
                How::Rejected
            };
            let record = ctx.origin.ended(id, Some(name), state, task.retries, error);
            return Admission::Settled(Settled { record, how }, flow);
        }
    };
    if let Some(rate) = shared.rate_limit_of(name, info.rate_limit) {
        if !Box::pin(super::rate::wait_turn(shared, id, name, rate)).await {
            return Admission::Leave(Disposition::HandBack);
        }
    }
    if shared.phase() != Phase::Running {
        return Admission::Leave(Disposition::HandBack);
    }
    // A handed-over task counts as waiting for a slot from here through the Python threads'
    // queue (`Shared::waiting_for_slots`).
    ticket.stop_waiting();
    Admission::Run(Admitted {
        task,
        info,
        slot,
        flow,
    })
}

/// The message in `payload`, decoded once; the error to record if it is too large or does not
/// decode.
pub(super) fn read(payload: &[u8], max_message_bytes: usize) -> Result<TaskMessage, TaskError> {
    if payload.len() > max_message_bytes {
        return Err(TaskError::new(
            error_types::TOO_LARGE,
            format!(
                "the task message is {} bytes, more than max_message_bytes ({max_message_bytes}): pass large data by reference",
                payload.len(),
            ),
        ));
    }
    TaskMessage::decode(payload).map_err(|e| TaskError::new(error_types::MALFORMED, e.to_string()))
}

/// A task released at most this long before its eta is held until then; one further ahead
/// goes back to a message schedule. More than the lead the server is given
/// ([`dbtask_protocol::SCHEDULE_LEAD`]), less than a pause anyone would mind at shutdown.
const HOLD_BEFORE_ETA: f64 = 1.0;

/// Holds a task that arrived shortly before its eta (the server releases scheduled tasks a
/// little early, since its timer fires late) until the eta, without a slot: it starts within a
/// millisecond or two of its eta, never before. False when the worker began to stop meanwhile
/// (the message goes back).
async fn hold_until_eta(shared: &Shared, task: &TaskMessage) -> bool {
    let Some(eta) = task.eta else { return true };
    let wait = eta - now_unix();
    if !(wait > 0.0 && wait <= HOLD_BEFORE_ETA) {
        return true;
    }
    let mut phase = shared.phase.subscribe();
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs_f64(wait)) => true,
        _ = reached(&mut phase, Phase::Draining) => false,
    }
}

/// Whether `task` goes to the Python threads before its slot is free: a registered task whose
/// executor takes its slot itself, with nothing to do between its slot and its start (no
/// STARTED record, no rate limit, no expiry to check).
pub(super) fn hands_over(
    info: Option<&TaskInfo>,
    track_started_default: bool,
    task: &TaskMessage,
) -> bool {
    info.is_some_and(|t| {
        t.executor.takes_handover()
            && !t.track_started.unwrap_or(track_started_default)
            && t.rate_limit.is_none()
    }) && task.expires.is_none()
}

/// What a decoded message's fields, its revocation and the registry say at `now`.
#[derive(Debug)]
pub(super) enum Check<'a> {
    Run(&'a TaskInfo),
    /// Delivered before its eta: schedule it again for then.
    NotYet(f64),
    /// Never runs: record this state (REVOKED, FAILURE) with this error.
    Refuse(TaskState, TaskError),
}

pub(super) fn check<'a>(
    task: &TaskMessage,
    now: f64,
    revoked: bool,
    info: Option<&'a TaskInfo>,
    apps: &[String],
) -> Check<'a> {
    if revoked {
        return Check::Refuse(
            TaskState::Revoked,
            TaskError::new(error_types::REVOKED, REVOKED_BEFORE_START),
        );
    }
    if let Some(eta) = task.eta.filter(|eta| *eta > now) {
        return Check::NotYet(eta);
    }
    if task.expires.is_some_and(|at| at < now) {
        return Check::Refuse(
            TaskState::Revoked,
            TaskError::new(
                error_types::EXPIRED,
                "expired: the task was delivered after its expires time and did not run",
            ),
        );
    }
    match info {
        Some(info) => Check::Run(info),
        None => Check::Refuse(
            TaskState::Failure,
            TaskError::new(
                error_types::UNKNOWN_TASK,
                format!(
                    "no task named {:?} is registered in this worker (modules imported: {}); is its module passed with -A?",
                    task.task,
                    apps.join(", ")
                ),
            ),
        ),
    }
}

/// Waits for a slot; `None` once the worker is stopping. A message still waiting after
/// [`RECEIVED_AFTER`] is recorded RECEIVED meanwhile.
async fn wait_for_slot(
    ctx: &Context<'_>,
    task: &TaskMessage,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let shared = ctx.shared;
    if let Ok(permit) = shared.slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    let mut phase = shared.phase.subscribe();
    let acquire = shared.slots.clone().acquire_owned();
    tokio::pin!(acquire);
    let mut marked = false;
    loop {
        tokio::select! {
            biased;
            _ = reached(&mut phase, Phase::Draining) => return None,
            permit = &mut acquire => return Some(permit.expect("the slot semaphore is never closed")),
            _ = tokio::time::sleep(RECEIVED_AFTER), if !marked => {
                marked = true;
                mark_received(ctx, (&task.id, &task.task, task.retries));
            }
        }
    }
}

/// A task that has waited [`RECEIVED_AFTER`] in this worker for a free slot (prefetched) is
/// RECEIVED meanwhile.
/// Only on its first delivery: a redelivery may find a final state that must not be
/// overwritten. The write is queued behind nothing and awaited by nobody, so the wait costs no
/// round trip; records of one task reach the writer in order, so it never hides a later state.
pub(super) fn mark_received(ctx: &Context<'_>, (id, task, retries): (&str, &str, u32)) {
    let origin = &ctx.origin;
    if origin.attempt == 1 && ctx.results.get().keeps(TaskState::Received) {
        let record = origin.record(id, Some(task), TaskState::Received, retries);
        ctx.shared.writer.enqueue(&record);
    }
}

/// Publishes the task again as a message schedule for `eta`, then acks this delivery.
async fn reschedule(ctx: &Context<'_>, task: &TaskMessage, eta: f64, msg_id: &str) -> Disposition {
    // Keeps the trace context it came with (OpenTelemetry on).
    let trace = crate::python::otel::enabled()
        .then(|| dbtask_protocol::nats::trace_of(ctx.message.message.headers.as_ref()))
        .flatten();
    match ctx
        .shared
        .broker
        .publish_task(ctx.queue, task, msg_id, trace.as_ref())
        .await
    {
        Ok(()) => {
            debug!(task_id = %task.id, task = %task.task, queue = ctx.queue, eta, "task delivered before its eta: scheduled again");
            Disposition::Ack
        }
        Err(e) => {
            warn!(task_id = %task.id, task = %task.task, queue = ctx.queue, error = %e, "cannot schedule a task delivered before its eta; NATS will deliver it again");
            Disposition::HandBack
        }
    }
}

/// A message that cannot be decoded (or is too large): a FAILURE record if any valid task id
/// can be found for it, else it is for the dead-letter stream.
fn unreadable<'a>(ctx: &Context<'a>, msg: &Message, error: TaskError) -> Admission<'a> {
    let (id, task) = identify_message(msg);
    let Some(id) = id else {
        return Admission::Unrecordable(error.message);
    };
    let record = ctx
        .origin
        .ended(id, task.as_deref(), TaskState::Failure, 0, error);
    let settled = Settled {
        record,
        how: How::Rejected,
    };
    Admission::Settled(settled, None)
}

/// The task id and name of a message that did not decode: the `Dbtask-Id` / `Dbtask-Task`
/// headers, else the body's `id` / `task` fields if the body is JSON at all. Ids that are not
/// valid task ids are ignored (they would make bad Redis keys).
/// [`identify`] for a delivered message: its body and its `Dbtask-*` headers.
pub(super) fn identify_message(msg: &Message) -> (Option<String>, Option<String>) {
    let header = |name: &str| {
        msg.message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    identify(
        &msg.message.payload,
        header(HEADER_TASK_ID),
        header(HEADER_TASK),
    )
}

pub(super) fn identify(
    body: &[u8],
    header_id: Option<String>,
    header_task: Option<String>,
) -> (Option<String>, Option<String>) {
    #[derive(Deserialize)]
    struct Loose {
        #[serde(default)]
        id: Option<serde_json::Value>,
        #[serde(default)]
        task: Option<serde_json::Value>,
    }
    let loose = serde_json::from_slice::<Loose>(body).ok();
    let from_body = |pick: fn(&Loose) -> &Option<serde_json::Value>| {
        loose
            .as_ref()
            .and_then(|l| pick(l).as_ref())
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let id = header_id
        .filter(|id| validate_task_id(id).is_ok())
        .or_else(|| from_body(|l| &l.id).filter(|id| validate_task_id(id).is_ok()));
    let task = header_task.or_else(|| from_body(|l| &l.task));
    (id, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::Executor;

    #[test]
    fn ids_of_unreadable_messages() {
        let s = |v: &str| Some(v.to_owned());
        // Headers first.
        assert_eq!(identify(b"garbage", s("h1"), s("t")), (s("h1"), s("t")));
        // Then the body, even when it is not a valid task message.
        assert_eq!(
            identify(br#"{"id": "b1", "args": 5}"#, None, None),
            (s("b1"), None)
        );
        assert_eq!(
            identify(br#"{"id": "b1", "task": "x"}"#, None, None),
            (s("b1"), s("x"))
        );
        // Invalid ids are no keys.
        assert_eq!(
            identify(br#"{"id": "a b"}"#, s("bad/id"), None),
            (None, None)
        );
        assert_eq!(identify(br#"{"id": 5}"#, None, None), (None, None));
        assert_eq!(identify(b"\xff\xfe", None, None), (None, None));
    }

    const BODY: &[u8] = br#"{"id": "t1", "task": "add", "args": [1, 2]}"#;

    fn message() -> TaskMessage {
        read(BODY, 1024).unwrap()
    }

    fn info(executor: Executor) -> TaskInfo {
        TaskInfo {
            name: "add".into(),
            executor,
            queue: "default".into(),
            track_started: None,
            retry: Default::default(),
            time_limit: None,
            soft_time_limit: None,
            rate_limit: None,
            results: Default::default(),
        }
    }

    #[test]
    fn a_message_is_read_once_or_refused_with_why() {
        let task = message();
        assert_eq!((task.id.as_str(), task.args.get()), ("t1", "[1, 2]"));
        let big = read(BODY, 10).unwrap_err();
        assert_eq!(big.exc_type, error_types::TOO_LARGE);
        assert!(big.message.contains("max_message_bytes (10)"), "{big:?}");
        let bad = read(br#"{"task": "add"}"#, 1024).unwrap_err();
        assert_eq!(bad.exc_type, error_types::MALFORMED);
    }

    #[test]
    fn only_plain_sync_tasks_are_handed_over() {
        let sync = info(Executor::Threads);
        let task = message();
        assert!(hands_over(Some(&sync), false, &task));
        assert!(!hands_over(None, false, &task), "unknown: refused first");
        assert!(!hands_over(Some(&info(Executor::AsyncLoop)), false, &task));
        assert!(!hands_over(Some(&sync), true, &task), "STARTED to write");
        let quiet = TaskInfo {
            track_started: Some(false),
            ..sync.clone()
        };
        assert!(hands_over(Some(&quiet), true, &task), "its own option wins");
        let limited = TaskInfo {
            rate_limit: Some(dbtask_protocol::Rate {
                count: 1,
                period_secs: 1.0,
            }),
            ..sync.clone()
        };
        assert!(!hands_over(Some(&limited), false, &task));
        let expiring = TaskMessage {
            expires: Some(1.0),
            ..message()
        };
        assert!(!hands_over(Some(&sync), false, &expiring));
    }

    #[test]
    fn checks_before_running() {
        let known = info(Executor::Threads);
        let apps = ["tasks".to_owned()];
        let now = 100.0;
        let task = message();
        assert!(matches!(
            check(&task, now, false, Some(&known), &apps),
            Check::Run(_)
        ));
        let refused =
            |task: &TaskMessage, revoked, info| match check(task, now, revoked, info, &apps) {
                Check::Refuse(state, error) => (state, error.exc_type),
                other => panic!("{other:?}"),
            };
        assert_eq!(
            refused(&task, true, Some(&known)),
            (TaskState::Revoked, error_types::REVOKED.to_owned())
        );
        assert_eq!(
            refused(&task, false, None),
            (TaskState::Failure, error_types::UNKNOWN_TASK.to_owned())
        );
        let early = TaskMessage {
            eta: Some(now + 5.0),
            ..message()
        };
        assert!(matches!(
            check(&early, now, false, Some(&known), &apps),
            Check::NotYet(eta) if eta == now + 5.0
        ));
        // Revoked wins over an eta; an eta reached runs.
        assert_eq!(refused(&early, true, Some(&known)).0, TaskState::Revoked);
        let due = TaskMessage {
            eta: Some(now),
            ..message()
        };
        assert!(matches!(
            check(&due, now, false, Some(&known), &apps),
            Check::Run(_)
        ));
        let expired = TaskMessage {
            expires: Some(now - 1.0),
            ..message()
        };
        assert_eq!(
            refused(&expired, false, Some(&known)),
            (TaskState::Revoked, error_types::EXPIRED.to_owned())
        );
        // Expired wins over an unknown name: nothing would have run it anyway.
        assert_eq!(refused(&expired, false, None).0, TaskState::Revoked);
    }
}

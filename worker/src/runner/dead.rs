//! Dead letters: a message on its last allowed delivery is never run; it goes to the
//! dead-letter stream with the reason and its original headers and body, the task's record
//! becomes FAILURE, and the message is acked. So a task that kills its worker every time
//! (`os._exit`, a segfault, the OOM killer) or a message nobody can finish runs at most
//! `max_deliver - 1` times and never loops. A message that does not decode and names no task
//! id goes there too instead of being dropped.
//!
//! Only charged deliveries count: those lost while the message waited in a worker that died or
//! stopped, without running, are not (the crash journal tells, see [`crate::journal`]), so a
//! task that crashes its worker never dead-letters the innocent tasks it held. A task that was
//! running each time its worker died is recorded as `dbtask.WorkerLost`, with how the worker
//! died; one handed back for other reasons as `dbtask.DeadLettered`.

use async_nats::jetstream::Message;
use async_nats::HeaderMap;
use dbtask_protocol::{
    dead_headers, dead_msg_id, error_types, now_unix, TaskError, TaskState, DEAD_LETTERED,
    DEAD_STREAM,
};
use tracing::{error, info, warn};

use super::admit::identify_message;
use super::{Disposition, Shared};
use crate::events::TaskRef;
use crate::record::Origin;
use crate::store::History;

/// `Some(deliveries)` when a message delivered `delivered` times may be on its last allowed
/// delivery (if none of them was lost while it waited: see [`exhausted`]).
pub(super) fn last_delivery(delivered: i64, max_deliver: i64) -> Option<i64> {
    (max_deliver > 1 && delivered >= max_deliver).then_some(delivered)
}

/// A message that used up its deliveries.
pub(super) struct Exhausted {
    pub deliveries: i64,
    pub history: History,
}

/// Whether the message at `seq`, delivered `delivered` times (at least `max_deliver`), is on
/// its last allowed delivery once the deliveries lost without running are set aside (one
/// Redis read, only on such a delivery).
pub(super) async fn exhausted(shared: &Shared, delivered: i64, seq: u64) -> Option<Exhausted> {
    let store = &shared.store;
    let history = store
        .retrying("read a message's lost deliveries", || {
            store.delivery_history(seq)
        })
        .await;
    (history.charged(delivered) >= shared.config.max_deliver).then_some(Exhausted {
        deliveries: delivered,
        history,
    })
}

/// A message that cannot be decoded and names no task id (nothing to record a FAILURE
/// under): into the dead-letter stream rather than dropped. `Term` if even that fails.
pub(super) async fn dead_letter_unreadable(
    shared: &Shared,
    queue: &str,
    msg: &Message,
    why: &str,
) -> Disposition {
    let reason = format!("unreadable message without a task id: {why}");
    let said =
        "a message without a task id: nothing to record its failure under; dead-lettering it";
    dead_letter_unrecorded(shared, queue, msg, &reason, said).await
}

/// A message without a valid signature, with `--message-key`: into the dead-letter stream,
/// unrun, and no record written under the task id it claims (a forged message must not
/// overwrite a real task's result).
pub(super) async fn dead_letter_unsigned(
    shared: &Shared,
    queue: &str,
    msg: &Message,
    why: &str,
) -> Disposition {
    let said = "a message without a valid signature: dead-lettering it unrun, recording nothing";
    dead_letter_unrecorded(shared, queue, msg, why, said).await
}

/// Dead-letters `msg` for `reason` without touching any task record, logging `said`.
async fn dead_letter_unrecorded(
    shared: &Shared,
    queue: &str,
    msg: &Message,
    reason: &str,
    said: &'static str,
) -> Disposition {
    let deliveries = msg.info().map(|i| i.delivered).unwrap_or(1);
    let head = &msg.message.payload[..msg.message.payload.len().min(120)];
    let (task_id, task) = identify_message(msg);
    error!(
        subject = %msg.subject,
        queue,
        attempt = deliveries,
        task_id = task_id.as_deref().unwrap_or("?"),
        task = task.as_deref().unwrap_or("?"),
        error = %reason,
        body_start = %String::from_utf8_lossy(head),
        "{said}"
    );
    match publish(shared, queue, msg, reason, deliveries).await {
        Some(dead_seq) => {
            shared
                .hooks
                .dead_lettered(task_ref("?", None, queue, deliveries), reason);
            error!(
                queue,
                dead_letter_sequence = dead_seq,
                "message dead-lettered unrecorded: inspect it with `dbtask dead show {dead_seq}`"
            );
            Disposition::Ack
        }
        None => Disposition::Term,
    }
}

fn task_ref<'a>(
    id: &'a str,
    task: Option<&'a str>,
    queue: &'a str,
    deliveries: i64,
) -> TaskRef<'a> {
    TaskRef {
        id,
        task: task.unwrap_or("?"),
        queue,
        attempt: deliveries.clamp(0, u32::MAX as i64) as u32,
        parent_id: None,
        root_id: None,
    }
}

/// Publishes `msg` to the dead-letter stream with `reason`; its sequence there, `None` (logged)
/// if NATS did not store it.
async fn publish(
    shared: &Shared,
    queue: &str,
    msg: &Message,
    reason: &str,
    deliveries: i64,
) -> Option<u64> {
    let stream_seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    // The original headers, minus NATS' own (message id, schedules, expectations), which
    // would mean something else in the dead-letter stream.
    let mut headers = HeaderMap::new();
    if let Some(original) = msg.message.headers.as_ref() {
        for (name, values) in original.iter() {
            if AsRef::<str>::as_ref(name).starts_with("Nats-") {
                continue;
            }
            for value in values {
                headers.append(name.clone(), value.clone());
            }
        }
    }
    headers.insert(dead_headers::REASON, reason);
    headers.insert(dead_headers::SUBJECT, msg.subject.as_str());
    headers.insert(dead_headers::STREAM_SEQ, stream_seq.to_string());
    headers.insert(dead_headers::DELIVERIES, deliveries.to_string());
    headers.insert(dead_headers::AT, format!("{:.6}", now_unix()));
    headers.insert(dead_headers::WORKER, shared.worker.as_str());
    let msg_id = dead_msg_id(queue, stream_seq);
    let dead_seq = match shared
        .broker
        .publish_dead(queue, &msg_id, headers, msg.message.payload.clone())
        .await
    {
        Ok(seq) => seq,
        Err(e) => {
            error!(
                queue,
                stream_sequence = stream_seq,
                error = %e,
                reason,
                "cannot dead-letter a message: it stays in the task stream undelivered (find it with `nats stream get DBTASK_TASKS {stream_seq}`)"
            );
            return None;
        }
    };
    Some(dead_seq)
}

/// Moves the message to the dead-letter stream and records the task as FAILURE.
pub(super) async fn dead_letter(
    shared: &Shared,
    queue: &str,
    msg: &Message,
    exhausted: Exhausted,
) -> Disposition {
    let max_deliver = shared.config.max_deliver;
    let Exhausted {
        deliveries,
        history,
    } = exhausted;
    let (task_id, task) = identify_message(msg);

    // A task that finished but whose ack got lost every time is not a dead letter.
    if let Some(id) = task_id.as_deref() {
        let store = &shared.store;
        let existing = store
            .retrying("read a task's record", || store.get(id))
            .await;
        if let Some(done) = existing.filter(|r| r.state.is_ready()) {
            info!(task_id = id, queue, state = %done.state, "task already finished: acking its last delivery without dead-lettering it");
            return Disposition::Ack;
        }
    }

    let charged = history.charged(deliveries);
    let (error_type, reason) = match (&history.cause, history.lost) {
        (Some(cause), lost) if lost > 0 => (
            error_types::WORKER_LOST,
            format!(
                "the worker died while running it, {lost} time(s) in {deliveries} deliveries ({charged} charged, max_deliver={max_deliver}); last: {cause}. Not run again: a task that crashes its process (os._exit, a segfault, the OOM killer) only costs a child process with --pool processes"
            ),
        ),
        _ => (
            DEAD_LETTERED,
            format!(
                "delivered {deliveries} times ({charged} charged, max_deliver={max_deliver}) without finishing: the worker running it died, was killed or stopped each time (a task that crashes its process, e.g. os._exit, a segfault or the OOM killer?)"
            ),
        ),
    };
    let Some(dead_seq) = publish(shared, queue, msg, &reason, deliveries).await else {
        return Disposition::HandBack;
    };
    error!(
        queue,
        task_id = task_id.as_deref().unwrap_or("?"),
        task = task.as_deref().unwrap_or("?"),
        deliveries,
        dead_letter_sequence = dead_seq,
        "task dead-lettered: inspect it with `dbtask dead show {dead_seq}`, rerun it with `dbtask dead replay {dead_seq}`"
    );

    shared.hooks.dead_lettered(
        task_ref(
            task_id.as_deref().unwrap_or("?"),
            task.as_deref(),
            queue,
            deliveries,
        ),
        &reason,
    );
    let Some(id) = task_id else {
        return Disposition::Ack;
    };
    let origin = Origin {
        worker: Some(&shared.worker),
        queue: Some(queue),
        attempt: deliveries.clamp(0, u32::MAX as i64) as u32,
        received: None,
    };
    let record = origin.ended(
        id,
        task.as_deref(),
        TaskState::Failure,
        0,
        TaskError::new(
            error_type,
            format!("{reason}; the message is in stream {DEAD_STREAM} at sequence {dead_seq}: `dbtask dead show {dead_seq}` shows it, `dbtask dead replay {dead_seq}` runs it again"),
        ),
    );
    match shared.writer.write(&record).await {
        Ok(()) => Disposition::Ack,
        Err(_) => {
            // Stopping: the dead letter is stored (deduplicated if this delivery comes back).
            warn!(
                queue,
                "stopping before the dead-lettered task's FAILURE record was stored"
            );
            Disposition::Ack
        }
    }
}

//! One message, from delivery to ack: decode, wait for a slot (or hand a sync task to the
//! Python threads, which take its slot when they start it), skip what already succeeded,
//! refuse what cannot run (with a FAILURE record), run the task, store the outcome, then ack.
//!
//! Every path ends in exactly one [`Disposition`]; the message is acked only once its outcome
//! is in Redis, and in-progress acks keep NATS from redelivering it while it is held here.

use std::rc::Rc;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use dbtask_protocol::{
    error_types, now_unix, validate_task_id, ResultRecord, TaskError, TaskMessage, TaskState,
    HEADER_TASK, HEADER_TASK_ID,
};
use serde::Deserialize;
use tracing::{debug, error, info, warn};

use super::{reached, Phase, Shared};
use crate::canvas::{Canvas, Flow};
use crate::limits::{self, Ended, Limits};
use crate::python::{Burst, CallOutcome, Dispatch, Handover, Job, TaskInfo};
use crate::record::Origin;
use crate::retry::Decision;

/// How a message leaves this worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Disposition {
    /// The outcome is stored: done.
    Ack,
    /// Not run (or not finished) here: NATS delivers it again, to this worker or another.
    HandBack,
    /// Cannot ever run and cannot be recorded (no task id): drop it.
    Term,
}

/// A handler's claim on the worker: counts it in flight (and waiting for a slot) until dropped.
pub(super) struct Ticket {
    shared: Rc<Shared>,
    waiting: bool,
}

impl Ticket {
    pub(super) fn new(shared: Rc<Shared>) -> Ticket {
        shared.in_flight.set(shared.in_flight.get() + 1);
        shared.waiting.set(shared.waiting.get() + 1);
        Ticket {
            shared,
            waiting: true,
        }
    }

    fn stop_waiting(&mut self) {
        if self.waiting {
            self.waiting = false;
            self.shared.waiting.set(self.shared.waiting.get() - 1);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.stop_waiting();
        let shared = &self.shared;
        let left = shared.in_flight.get() - 1;
        shared.in_flight.set(left);
        if left == 0 {
            shared.idle.notify_waiters();
        }
        // A handler that never ran (a dead letter, a hand-back) frees its promised place, and
        // near the in-flight bound any handler's end may let the pull loop go on.
        shared.wake_pull_loops();
    }
}

/// A running task's slot; releasing it wakes the pull loops when they have work to do.
struct Slot<'a> {
    shared: &'a Shared,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.shared.wake_pull_loops();
    }
}

/// Handles one message to its end, sending in-progress acks meanwhile.
pub(super) async fn handle(mut ticket: Ticket, queue: Rc<str>, msg: Message) {
    let shared = ticket.shared.clone();
    let mut phase = shared.phase.subscribe();
    // A third of ack_wait leaves two chances for a progress ack to arrive in time.
    let every = shared.config.ack_wait() / 3;
    // Parsed once here (from the reply subject): how many times NATS delivered the message.
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    if let Some(deliveries) = super::dead::last_delivery(delivered, shared.config.max_deliver) {
        let disposition =
            Box::pin(super::dead::dead_letter(&shared, &queue, &msg, deliveries)).await;
        finish(&msg, disposition, &queue).await;
        // It never took a slot: dropping the ticket frees its promised one.
        drop(ticket);
        return;
    }
    let disposition = tokio::select! {
        biased;
        _ = reached(&mut phase, Phase::Abandon) => Disposition::HandBack,
        d = process(&shared, &mut ticket, &queue, &msg, delivered) => d,
        _ = keep_alive(&msg, every) => unreachable!("keep_alive never returns"),
    };
    if disposition == Disposition::HandBack {
        warn_if_last_delivery(&msg, shared.config.max_deliver, &queue);
        // At shutdown, nak only once the pull loops have left their open pull requests:
        // NATS would otherwise redeliver the message into one of them, where nobody reads.
        if shared.phase() >= Phase::Draining {
            reached(&mut phase, Phase::Released).await;
        }
    }
    finish(&msg, disposition, &queue).await;
    drop(ticket);
}

/// Gives a message back to NATS for immediate redelivery.
pub(super) async fn hand_back(msg: &Message, queue: &str) {
    finish(msg, Disposition::HandBack, queue).await;
}

/// A message handed back on its last allowed delivery is never delivered again: say so loudly,
/// with its stream sequence so that an operator can find it (`nats stream get`).
fn warn_if_last_delivery(msg: &Message, max_deliver: i64, queue: &str) {
    let Ok(info) = msg.info() else { return };
    if max_deliver > 0 && info.delivered >= max_deliver {
        error!(
            queue,
            stream_sequence = info.stream_sequence,
            attempt = info.delivered,
            max_deliver,
            "handing back a task on its last delivery: NATS will not deliver it again (raise max_deliver?)"
        );
    }
}

async fn finish(msg: &Message, disposition: Disposition, queue: &str) {
    let kind = match disposition {
        Disposition::Ack => AckKind::Ack,
        Disposition::HandBack => AckKind::Nak(None),
        Disposition::Term => AckKind::Term,
    };
    // Fire-and-forget on the connection: a lost ack only means a redelivery, which finds the
    // stored outcome and is acked without running again.
    if let Err(e) = msg.ack_with(kind).await {
        warn!(queue, subject = %msg.subject, ack = ?kind, error = %e, "cannot ack a message; NATS will redeliver it");
    }
}

async fn keep_alive(msg: &Message, every: Duration) {
    // A timer held in this future, not an `Interval` (which boxes its timer): one allocation
    // less per message.
    let tick = tokio::time::sleep(every);
    tokio::pin!(tick);
    loop {
        tick.as_mut().await;
        if let Err(e) = msg.ack_with(AckKind::Progress).await {
            debug!(subject = %msg.subject, error = %e, "cannot send an in-progress ack");
        }
        tick.as_mut().reset(tokio::time::Instant::now() + every);
    }
}

/// What every step of a message's handling shares.
struct Context<'a> {
    shared: &'a Shared,
    queue: &'a str,
    attempt: u32,
    /// The fields of every record written for this message.
    origin: Origin<'a>,
}

impl Context<'_> {
    /// Stores `record`; `HandBack` if the worker stops before Redis has it.
    async fn store(&self, record: &ResultRecord) -> Disposition {
        match self.shared.writer.write(record).await {
            Ok(()) => Disposition::Ack,
            Err(_) => Disposition::HandBack,
        }
    }

    /// A FAILURE record for a message the worker refuses to run; returned once stored.
    async fn refuse(
        &self,
        id: &str,
        task: Option<&str>,
        error: TaskError,
        retries: u32,
    ) -> (Disposition, ResultRecord) {
        warn!(task_id = id, task = task.unwrap_or("?"), attempt = self.attempt, queue = self.queue, error_type = %error.exc_type, error = %error.message, "task refused");
        let record = self
            .origin
            .ended(id, task, TaskState::Failure, retries, error);
        (self.store(&record).await, record)
    }

    /// A REVOKED record: the task was revoked before it started, or terminated.
    /// Stores a REVOKED record; returns it too, so that a workflow waiting on this task moves on.
    async fn revoked(
        &self,
        id: &str,
        task: &str,
        retries: u32,
        why: &str,
    ) -> (Disposition, ResultRecord) {
        info!(
            task_id = id,
            task,
            attempt = self.attempt,
            queue = self.queue,
            reason = why,
            "task revoked"
        );
        let record = self.origin.ended(
            id,
            Some(task),
            TaskState::Revoked,
            retries,
            TaskError::new(error_types::REVOKED, why),
        );
        (self.store(&record).await, record)
    }
}

const REVOKED_BEFORE_START: &str = "the task was revoked before it started";

/// A message that waits this long in the prefetch for a slot gets a RECEIVED record. Not at
/// once: on a busy worker every message waits a few milliseconds, and a record for each would
/// double the Redis writes for a state nobody would see.
const RECEIVED_AFTER: Duration = Duration::from_millis(100);

async fn process(
    shared: &Shared,
    ticket: &mut Ticket,
    queue: &str,
    msg: &Message,
    delivered: i64,
) -> Disposition {
    let received = now_unix();
    let attempt = delivered.clamp(1, u32::MAX as i64) as u32;
    let ctx = Context {
        shared,
        queue,
        attempt,
        origin: Origin::delivery(&shared.worker, queue, attempt, received),
    };
    let payload: &[u8] = &msg.message.payload;
    let header = |name: &str| {
        msg.message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };

    if payload.len() > shared.config.max_message_bytes {
        let why = format!(
            "the task message is {} bytes, more than max_message_bytes ({}): pass large data by reference",
            payload.len(),
            shared.config.max_message_bytes
        );
        return Box::pin(refuse_unreadable(
            &ctx,
            msg,
            error_types::TOO_LARGE,
            why,
            header(HEADER_TASK_ID),
            header(HEADER_TASK),
        ))
        .await;
    }
    let task = match TaskMessage::decode(payload) {
        Ok(task) => task,
        Err(e) => {
            return Box::pin(refuse_unreadable(
                &ctx,
                msg,
                error_types::MALFORMED,
                e.to_string(),
                header(HEADER_TASK_ID),
                header(HEADER_TASK),
            ))
            .await;
        }
    };

    // A sync task with nothing to do between getting its slot and running (no STARTED record,
    // no rate limit, no expiry to check) is handed to the Python threads without waiting for
    // its slot: the thread that takes it takes the slot (see `python::Handover`). The others
    // wait for their slot here; at shutdown, a message that has not started goes back at once,
    // and one still waiting after RECEIVED_AFTER is recorded RECEIVED meanwhile.
    let info = shared.python.tasks().get(task.task.as_str());
    let handed_over = info.is_some_and(|t| {
        t.executor.takes_handover() && !tracks_started(shared, t) && t.rate_limit.is_none()
    }) && task.expires.is_none();
    let slot = if handed_over {
        None
    } else {
        let Some(permit) = wait_for_slot(shared, &ctx.origin, &task).await else {
            return Disposition::HandBack;
        };
        // Held while the task runs; `execute` lets it go as soon as the task function returns,
        // so that storing the outcome and acking (round trips) never keep another task from
        // running.
        ticket.stop_waiting();
        Some(Slot {
            shared,
            permit: Some(permit),
        })
    };

    let flow = Flow::of(&task);
    let id = task.id.as_str();
    let name = task.task.as_str();
    debug!(
        task_id = id,
        task = name,
        attempt = ctx.attempt,
        queue,
        "task received"
    );

    // A redelivery may follow a crash between storing the outcome and acking it.
    if ctx.attempt > 1 {
        let store = &shared.store;
        let existing = Box::pin(store.retrying("read a task's record", || store.get(id))).await;
        if let Some(done) = existing.filter(|r| r.state.is_ready()) {
            info!(task_id = id, task = name, attempt = ctx.attempt, queue, state = %done.state, "task already finished: acking the redelivery without running it");
            // The crash may have come before the workflow's next steps were published.
            return workflow(&ctx, flow, &done, Disposition::Ack).await;
        }
    }

    if shared.revocations.is_revoked(id) {
        let (stored, record) = ctx
            .revoked(id, name, task.retries, REVOKED_BEFORE_START)
            .await;
        return workflow(&ctx, flow, &record, stored).await;
    }

    // Not its time yet (a publish straight to the queue, or a clock ahead of the server's):
    // back into a message schedule, never run early.
    if let Some(eta) = task.eta.filter(|eta| *eta > now_unix()) {
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        return Box::pin(reschedule(&ctx, &task, eta, &format!("{id}:eta:{seq}"))).await;
    }
    if let Some(expires) = task.expires.filter(|at| *at < now_unix()) {
        info!(
            task_id = id,
            task = name,
            queue,
            expires,
            "task expired before it ran: recording REVOKED"
        );
        let record = ctx.origin.ended(
            id,
            Some(name),
            TaskState::Revoked,
            task.retries,
            TaskError::new(
                error_types::EXPIRED,
                "expired: the task was delivered after its expires time and did not run",
            ),
        );
        let stored = ctx.store(&record).await;
        return workflow(&ctx, flow, &record, stored).await;
    }

    let Some(info) = info else {
        let why = format!(
            "no task named {name:?} is registered in this worker (modules imported: {}); is its module passed with -A?",
            shared.config.apps.join(", ")
        );
        let (stored, record) = ctx
            .refuse(
                id,
                Some(name),
                TaskError::new(error_types::UNKNOWN_TASK, why),
                task.retries,
            )
            .await;
        return workflow(&ctx, flow, &record, stored).await;
    };
    if let Some(rate) = info.rate_limit {
        if !Box::pin(super::rate::wait_turn(shared, id, name, rate)).await {
            return Disposition::HandBack;
        }
    }
    if shared.phase() != Phase::Running {
        return Disposition::HandBack;
    }
    // A handed-over task counts as waiting for a slot from here through the Python threads'
    // queue (`Shared::waiting_for_slots`).
    ticket.stop_waiting();
    // Boxed: a message waiting in the prefetch then holds a small future, not one sized for
    // running the task (a few KB each, times the prefetch).
    let (stored, record) = Box::pin(execute(&ctx, task, info, slot)).await;
    match record {
        Some(record) => workflow(&ctx, flow, &record, stored).await,
        None => stored,
    }
}

/// Whether a STARTED record is written before the task runs: its own option, else the worker's.
fn tracks_started(shared: &Shared, info: &TaskInfo) -> bool {
    info.track_started.unwrap_or(shared.config.track_started)
}

/// Waits for a slot; `None` once the worker is stopping. A message still waiting after
/// [`RECEIVED_AFTER`] is recorded RECEIVED meanwhile.
async fn wait_for_slot(
    shared: &Shared,
    origin: &Origin<'_>,
    task: &TaskMessage,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
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
                mark_received(shared, origin, (&task.id, &task.task, task.retries));
            }
        }
    }
}

/// Publishes the task again as a message schedule for `eta`, then acks this delivery.
async fn reschedule(ctx: &Context<'_>, task: &TaskMessage, eta: f64, msg_id: &str) -> Disposition {
    let js = ctx.shared.broker.jetstream();
    match crate::retry::publish_at(js, ctx.queue, task, msg_id).await {
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

/// After a final outcome is stored: the workflow's next steps (a no-op for a plain task).
async fn workflow(
    ctx: &Context<'_>,
    flow: Option<Flow>,
    record: &ResultRecord,
    stored: Disposition,
) -> Disposition {
    let Some(flow) = flow.filter(|_| stored == Disposition::Ack) else {
        return stored;
    };
    let shared = ctx.shared;
    let canvas = Canvas {
        broker: &shared.broker,
        store: &shared.store,
        writer: &shared.writer,
        result_ttl: shared.config.result_ttl,
        max_message_bytes: shared.config.max_message_bytes,
    };
    match Box::pin(canvas.after(&flow, record)).await {
        Ok(()) => Disposition::Ack,
        Err(e) => {
            warn!(task_id = %record.id, queue = ctx.queue, error = %e, "workflow step not done: handing the message back to redo it");
            Disposition::HandBack
        }
    }
}

/// A task asked for a retry: schedule the next attempt (a new message for the same id, stored
/// by JetStream first), then record RETRY; with no retry left, FAILURE with the last error.
async fn retry(
    ctx: &Context<'_>,
    record: &mut ResultRecord,
    next: Option<TaskMessage>,
    policy: &crate::retry::RetryPolicy,
    request: crate::retry::Request,
) -> Result<(), Disposition> {
    let (id, name) = (record.id.clone(), record.task.clone().unwrap_or_default());
    let (retries, delay, max, error) = match crate::retry::decide(policy, record.retries, request) {
        Decision::Exhausted { max_retries, error } => {
            warn!(task_id = %id, task = %name, retries = record.retries, max_retries, error_type = %error.exc_type, error = %error.message, "task failed: no retry left");
            record.state = TaskState::Failure;
            record.error = Some(error);
            return Ok(());
        }
        Decision::Again {
            retries,
            delay,
            max_retries,
            error,
        } => (retries, delay, max_retries, error),
    };
    let Some(mut next) = next else {
        // Arguments come back with every outcome the task itself produced: cannot happen.
        record.state = TaskState::Failure;
        record.error = Some(error);
        return Ok(());
    };
    let eta = now_unix() + delay;
    next.retries = retries;
    next.eta = (delay > 0.0).then_some(eta);
    let msg_id = format!("{id}:retry:{}", next.retries);
    if let Err(e) =
        crate::retry::publish_at(ctx.shared.broker.jetstream(), ctx.queue, &next, &msg_id).await
    {
        warn!(task_id = %id, task = %name, error = %e, "cannot publish the retry of a task; NATS will deliver the failed attempt again");
        return Err(Disposition::HandBack);
    }
    info!(task_id = %id, task = %name, retry = next.retries, max_retries = max, delay_secs = delay, error_type = %error.exc_type, error = %error.message, "task will be retried");
    record.state = TaskState::Retry;
    record.error = Some(error);
    record.eta = Some(eta);
    record.date_done = None;
    Ok(())
}

/// Runs a decoded, registered task in `slot` and stores its outcome (returned once stored).
/// The slot is released once the task function has returned, before the outcome is stored.
/// Without a slot, the task is handed over to the Python threads (see [`process`]), and until
/// one starts it, it is RECEIVED after [`RECEIVED_AFTER`] and handed back at shutdown.
async fn execute(
    ctx: &Context<'_>,
    task: TaskMessage,
    info: &TaskInfo,
    slot: Option<Slot<'_>>,
) -> (Disposition, Option<ResultRecord>) {
    let (shared, queue) = (ctx.shared, ctx.queue);
    let id = task.id.as_str();
    let name = task.task.as_str();
    let mut started = now_unix();
    if tracks_started(shared, info) {
        let mut record = ctx
            .origin
            .record(id, Some(name), TaskState::Started, task.retries);
        record.date_started = Some(started);
        if ctx.store(&record).await != Disposition::Ack {
            return (Disposition::HandBack, None);
        }
    }

    // `result_extended`: the record keeps the arguments (copied only when asked for).
    let extended = shared
        .config
        .result_extended
        .then(|| (task.args.clone(), task.kwargs.clone()));
    let job = Job {
        task_id: task.id.clone(),
        task: task.task.clone(),
        args: task.args,
        kwargs: task.kwargs,
        attempt: ctx.attempt,
        retries: task.retries,
    };
    let limits = Limits::of(Some(info), &shared.config);
    // Other handlers alive: their jobs are likely being queued in the same turn (a drain).
    let burst = if shared.in_flight.get() > 1 {
        Burst::WithOthers
    } else {
        Burst::Alone
    };
    let handover = slot.is_none().then(|| Handover::new(shared.slots.clone()));
    let call = limits::call(
        &shared.python,
        &shared.revocations,
        job,
        name,
        id,
        limits,
        Dispatch {
            burst,
            handover: handover.clone(),
        },
    );
    let ended = match &handover {
        None => call.await,
        Some(handover) => {
            tokio::pin!(call);
            let mut phase = shared.phase.subscribe();
            let received = tokio::time::sleep(RECEIVED_AFTER);
            tokio::pin!(received);
            let (mut marked, mut draining) = (false, false);
            loop {
                tokio::select! {
                    biased;
                    ended = &mut call => break ended,
                    _ = reached(&mut phase, Phase::Draining), if !draining => {
                        draining = true;
                        if handover.state.cancel() {
                            return (Disposition::HandBack, None);
                        }
                    }
                    _ = &mut received, if !marked => {
                        marked = true;
                        if handover.state.started_at().is_none() {
                            mark_received(shared, &ctx.origin, (id, name, task.retries));
                        }
                    }
                }
            }
        }
    };
    // The slot is free: with a handover its thread gave it back already.
    match slot {
        Some(slot) => drop(slot),
        None => shared.wake_pull_loops(),
    }
    // Handed over, the task started when a thread took it, not when it was queued.
    if let Some(at) = handover.and_then(|h| h.state.started_at()) {
        started = now_unix() - at.elapsed().as_secs_f64();
    }
    let mut arguments = None;
    let outcome = match ended {
        Ended::Done(returned) => {
            arguments = returned.arguments;
            returned.outcome
        }
        Ended::TimedOut(err) => CallOutcome::Failure(err),
        Ended::Revoked { started } => {
            let why = if started {
                "the task was revoked with terminate=True while it ran"
            } else {
                REVOKED_BEFORE_START
            };
            let (stored, record) = ctx.revoked(id, name, task.retries, why).await;
            return (stored, Some(record));
        }
    };
    let done = now_unix();
    let mut record = ctx
        .origin
        .record(id, Some(name), TaskState::Success, task.retries);
    record.date_started = Some(started);
    record.date_done = Some(done);
    if let Some((args, kwargs)) = extended {
        record.args = Some(args);
        record.kwargs = Some(kwargs);
    }
    let runtime_ms = ((done - started) * 1000.0).max(0.0);
    match outcome {
        CallOutcome::Success(result) if result.get().len() > shared.config.max_result_bytes => {
            let why = format!(
                "the result is {} bytes of JSON, more than max_result_bytes ({}): return a smaller value, or store it elsewhere and return a reference",
                result.get().len(),
                shared.config.max_result_bytes
            );
            warn!(task_id = id, task = name, attempt = ctx.attempt, queue, error_type = error_types::TOO_LARGE, error = %why, "task failed");
            record.state = TaskState::Failure;
            record.error = Some(TaskError::new(error_types::TOO_LARGE, why));
        }
        CallOutcome::Success(result) => {
            debug!(
                task_id = id,
                task = name,
                attempt = ctx.attempt,
                queue,
                runtime_ms,
                "task succeeded"
            );
            record.result = Some(result);
        }
        CallOutcome::Failure(err) => {
            warn!(task_id = id, task = name, attempt = ctx.attempt, queue, runtime_ms, error_type = %err.exc_type, error = %err.message, "task failed");
            record.state = TaskState::Failure;
            record.error = Some(err);
        }
        CallOutcome::Retry(request) => {
            // The message, whole again with the arguments the executor handed back.
            let next = arguments.map(|a| TaskMessage {
                args: a.args,
                kwargs: a.kwargs,
                ..task
            });
            if let Err(d) = Box::pin(retry(ctx, &mut record, next, &info.retry, request)).await {
                return (d, None);
            }
        }
    }
    (ctx.store(&record).await, Some(record))
}

/// A task that has waited [`RECEIVED_AFTER`] in this worker for a free slot (prefetched) is
/// RECEIVED meanwhile.
/// Only on its first delivery: a redelivery may find a final state that must not be
/// overwritten. The write is queued behind nothing and awaited by nobody, so the wait costs no
/// round trip; records of one task reach the writer in order, so it never hides a later state.
fn mark_received(shared: &Shared, origin: &Origin<'_>, (id, task, retries): (&str, &str, u32)) {
    if origin.attempt == 1 {
        let record = origin.record(id, Some(task), TaskState::Received, retries);
        shared.writer.enqueue(&record);
    }
}

/// A message that cannot be decoded (or is too large): a FAILURE record if any valid task id
/// can be found for it, else it is logged and terminated.
async fn refuse_unreadable(
    ctx: &Context<'_>,
    msg: &Message,
    exc_type: &str,
    why: String,
    header_id: Option<String>,
    header_task: Option<String>,
) -> Disposition {
    let (id, task) = identify(&msg.message.payload, header_id, header_task);
    match id {
        Some(id) => {
            ctx.refuse(&id, task.as_deref(), TaskError::new(exc_type, why), 0)
                .await
                .0
        }
        None => {
            let head = &msg.message.payload[..msg.message.payload.len().min(120)];
            error!(
                subject = %msg.subject,
                queue = ctx.queue,
                attempt = ctx.attempt,
                error_type = exc_type,
                error = %why,
                body_start = %String::from_utf8_lossy(head),
                "a message without a task id: nothing to record its failure under; dead-lettering it"
            );
            super::dead::dead_letter_unreadable(ctx.shared, ctx.queue, msg, &why).await
        }
    }
}

/// The task id and name of a message that did not decode: the `Dbtask-Id` / `Dbtask-Task`
/// headers, else the body's `id` / `task` fields if the body is JSON at all. Ids that are not
/// valid task ids are ignored (they would make bad Redis keys).
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
    use super::identify;

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
}

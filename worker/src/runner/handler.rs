//! One message, from delivery to ack, read top to bottom in [`process`]: admit it (decoded
//! once; refused, revoked, expired, already finished or not yet due, it is settled by a record
//! without running), run it, settle how the call ended into a record and maybe a next attempt,
//! then the follow-ups (publish the retry, store the record, the workflow's next steps), and
//! finally the one ack.
//!
//! Every path ends in exactly one [`Disposition`]; the message is acked only once its outcome
//! is in Redis, and in-progress acks keep NATS from redelivering it while it is held here.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use dbtask_protocol::nats::trace_of;
use dbtask_protocol::{now_unix, ResultRecord, TaskMessage, TaskState, Trace};
use tracing::{debug, error, info, warn};

use super::admit::{admit, Admission, Admitted};
use super::execute::execute;
use super::settle::{settle, How, Policy, Settled};
use super::{reached, Disposition, Phase, Shared};
use crate::canvas::{Canvas, Flow};
use crate::events::TaskRef;
use crate::journal::{Mark, State};
use crate::python::{Job, RequestInfo};
use crate::record::Origin;
use crate::results::ResultOptions;

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

    pub(super) fn stop_waiting(&mut self) {
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
pub(super) struct Slot<'a> {
    shared: &'a Shared,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl<'a> Slot<'a> {
    pub(super) fn new(shared: &'a Shared, permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        Slot {
            shared,
            permit: Some(permit),
        }
    }
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
    // Parsed once here (from the reply subject): how many times NATS delivered the message,
    // and where it is in the stream.
    let (delivered, seq) = msg
        .info()
        .map_or((1, 0), |i| (i.delivered, i.stream_sequence));
    // In the crash journal from now until acked or handed back.
    let held = shared.journal.hold(seq);
    // With --message-key, nothing is done with a message before its signature is checked.
    if let Some(key) = shared.broker.message_key() {
        let headers = msg.message.headers.as_ref();
        if let Err(why) = key.verify(headers, &msg.subject, &msg.message.payload) {
            let disposition = Box::pin(super::dead::dead_letter_unsigned(
                &shared, &queue, &msg, why,
            ))
            .await;
            finish(&msg, disposition, &queue).await;
            return;
        }
    }
    if super::dead::last_delivery(delivered, shared.config.max_deliver).is_some() {
        if let Some(exhausted) = Box::pin(super::dead::exhausted(&shared, delivered, seq)).await {
            let disposition =
                Box::pin(super::dead::dead_letter(&shared, &queue, &msg, exhausted)).await;
            finish(&msg, disposition, &queue).await;
            // It never took a slot: dropping the ticket frees its promised one.
            drop(ticket);
            return;
        }
    }
    let disposition = tokio::select! {
        biased;
        _ = reached(&mut phase, Phase::Abandon) => Disposition::HandBack,
        d = process(&shared, &mut ticket, &queue, &msg, (delivered, held.mark())) => d,
        _ = keep_alive(&msg, every) => unreachable!("keep_alive never returns"),
    };
    if disposition == Disposition::HandBack {
        // Handed back without having run (a shutdown): that delivery is not charged.
        if held.state() == Some(State::Held) && shared.config.max_deliver > 1 {
            if let Err(e) = shared.store.record_idle_delivery(seq).await {
                debug!(queue = &*queue, stream_sequence = seq, error = %e, "cannot record a delivery handed back unrun; it will be charged");
            }
        }
        warn_if_last_delivery(&msg, shared.config.max_deliver, &queue);
        // At shutdown, nak only once the pull loops have left their open pull requests:
        // NATS would otherwise redeliver the message into one of them, where nobody reads.
        if shared.phase() >= Phase::Draining {
            reached(&mut phase, Phase::Released).await;
        }
    }
    finish(&msg, disposition, &queue).await;
    drop(held);
    drop(ticket);
}

/// Gives a message back to NATS for immediate redelivery.
pub(super) async fn hand_back(msg: &Message, queue: &str) {
    finish(msg, Disposition::HandBack, queue).await;
}

/// A message handed back on its last allowed delivery is never delivered again (only with
/// `max_deliver = 1`, where the consumer itself stops: see `Broker::consumer_max_deliver`): say
/// so loudly, with its stream sequence so that an operator can find it (`nats stream get`).
fn warn_if_last_delivery(msg: &Message, max_deliver: i64, queue: &str) {
    let Ok(info) = msg.info() else { return };
    let limit = crate::broker::consumer_max_deliver(max_deliver);
    if limit > 0 && info.delivered >= limit {
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
pub(super) struct Context<'a> {
    pub shared: &'a Shared,
    pub queue: &'a str,
    /// Deliveries of this message (1 on the first).
    pub attempt: u32,
    /// The fields of every record written for this message.
    pub origin: Origin<'a>,
    /// Where its run is entered in the crash journal.
    pub mark: Mark,
    /// What is kept of its outcome (its task's options, once known; `ignore_result`).
    pub results: std::cell::Cell<ResultOptions>,
    /// The delivery itself.
    pub message: &'a Message,
    /// Its entry in the worker's activity (inspect), once admitted; out again when dropped.
    pub tracked: std::cell::OnceCell<crate::activity::Tracked>,
}

impl Context<'_> {
    /// When the message was stored in its stream (Unix seconds, by the server's clock); 0 if
    /// its delivery does not say.
    pub(super) fn published(&self) -> f64 {
        self.message
            .info()
            .map_or(0.0, |i| i.published.unix_timestamp_nanos() as f64 / 1e9)
    }

    /// Task `id` (named `task`) of this message, as events name it.
    pub(super) fn task_ref<'t>(&'t self, id: &'t str, task: &'t str) -> TaskRef<'t> {
        TaskRef {
            id,
            task,
            queue: self.queue,
            attempt: self.attempt,
            parent_id: None,
            root_id: None,
        }
    }

    /// Stores `record` (unless its task keeps no record in its state: `ignore_result`);
    /// `HandBack` if the worker stops before Redis has it.
    pub(super) async fn store(&self, record: &ResultRecord) -> Disposition {
        let results = self.results.get();
        if !results.keeps(record.state) {
            return Disposition::Ack;
        }
        match self.shared.writer.write_for(record, results.ttl).await {
            Ok(()) => Disposition::Ack,
            Err(_) => Disposition::HandBack,
        }
    }
}

/// The pipeline: admit -> run -> settle -> follow-ups. The caller acks.
async fn process(
    shared: &Shared,
    ticket: &mut Ticket,
    queue: &str,
    msg: &Message,
    (delivered, mark): (i64, Mark),
) -> Disposition {
    let attempt = delivered.clamp(1, u32::MAX as i64) as u32;
    let ctx = Context {
        shared,
        queue,
        attempt,
        origin: Origin::delivery(&shared.worker, queue, attempt, now_unix()),
        mark,
        results: Default::default(),
        message: msg,
        tracked: Default::default(),
    };
    // What follows admission is boxed: a message waiting in the prefetch then holds a small
    // future, not one sized for running the task and storing its outcome (a few KB each,
    // times the prefetch). One allocation per message, made once it has its slot.
    let next: Pin<Box<dyn Future<Output = Disposition> + '_>> =
        match admit(&ctx, ticket, msg).await {
            Admission::Run(admitted) => Box::pin(run(&ctx, admitted)),
            Admission::Settled(settled, flow) => Box::pin(follow_up(&ctx, settled, flow, None)),
            Admission::Leave(disposition) => return disposition,
            Admission::Unrecordable(why) => Box::pin(async move {
                super::dead::dead_letter_unreadable(shared, queue, msg, &why).await
            }),
        };
    let disposition = next.await;
    super::tick::settled(shared, msg, disposition).await;
    disposition
}

/// Runs an admitted message's job, settles how it ended, and follows up.
async fn run(ctx: &Context<'_>, admitted: Admitted<'_>) -> Disposition {
    let Admitted {
        task,
        info,
        slot,
        flow,
    } = admitted;
    let config = &ctx.shared.config;
    // `result_extended`: the record keeps the arguments (copied only when asked for).
    let extended = config
        .result_extended
        .then(|| (task.args.clone(), task.kwargs.clone()));
    let job = Job {
        task_id: task.id.clone(),
        task: task.task.as_str().into(),
        args: task.args,
        kwargs: task.kwargs,
        attempt: ctx.attempt,
        retries: task.retries,
        request: Box::new(RequestInfo {
            queue: ctx.queue.to_owned(),
            eta: task.eta,
            parent_id: task.parent_id.clone(),
            root_id: task.root_id.clone(),
            trace: crate::python::otel::enabled()
                .then(|| trace_of(ctx.message.message.headers.as_ref()))
                .flatten(),
        }),
    };
    let Some(ran) = execute(ctx, job, (&task.id, &task.task), info, slot).await else {
        return Disposition::HandBack;
    };

    let mut record =
        ctx.origin
            .record(&task.id, Some(&task.task), TaskState::Success, task.retries);
    record.date_started = Some(ran.started);
    record.date_done = Some(ran.done);
    if let Some((args, kwargs)) = extended {
        record.args = Some(args);
        record.kwargs = Some(kwargs);
    }
    let policy = Policy {
        retry: &info.retry,
        max_result_bytes: config.max_result_bytes,
    };
    let settled = settle(record, ran.ended, &policy, ran.done);
    // A retry publishes the message again, whole with the arguments the executor handed back.
    let next = match (settled.how, ran.arguments) {
        (How::Retry(_), Some(arguments)) => Some(TaskMessage {
            args: arguments.args,
            kwargs: arguments.kwargs,
            ..task
        }),
        _ => None,
    };
    follow_up(ctx, settled, flow, next).await
}

/// What follows a settled message, in this order: the next attempt of a retry is published
/// (JetStream stores it first), the record is stored, then the workflow's next steps run.
/// `message`: the task's message, for a retry to publish again.
async fn follow_up(
    ctx: &Context<'_>,
    settled: Settled,
    flow: Option<Flow>,
    message: Option<TaskMessage>,
) -> Disposition {
    let Settled {
        mut record,
        mut how,
    } = settled;
    // OpenTelemetry on: what this task publishes next continues its span (or, when it did not
    // run here, the trace its message came with).
    let trace = if crate::python::otel::enabled() {
        crate::python::otel::take_span(&record.id)
            .or_else(|| trace_of(ctx.message.message.headers.as_ref()))
    } else {
        None
    };
    if let How::Retry(next) = how {
        match message {
            Some(message) => {
                let publish = crate::retry::publish_retry(
                    &ctx.shared.broker,
                    ctx.queue,
                    message,
                    next.retries,
                    next.eta,
                    trace.as_ref(),
                );
                let published = Box::pin(publish).await;
                if let Err(e) = published {
                    warn!(task_id = %record.id, task = record.task.as_deref().unwrap_or("?"), error = %e, "cannot publish the retry of a task; NATS will deliver the failed attempt again");
                    return Disposition::HandBack;
                }
            }
            None => {
                // The executor hands the arguments back with every outcome the task produced
                // itself: cannot happen, but never panic.
                record.state = TaskState::Failure;
                record.eta = None;
                record.date_done = Some(now_unix());
                how = How::Failed;
            }
        }
    }
    log_settled(ctx, &record, how);
    let stored = match how {
        How::AlreadyFinished => Disposition::Ack,
        _ => ctx.store(&record).await,
    };
    if stored == Disposition::Ack {
        emit(ctx, &record, how);
    }
    workflow(ctx, flow, &record, stored, trace.as_ref()).await
}

/// Tells the hooks how a message was settled, once its record is stored.
fn emit(ctx: &Context<'_>, record: &ResultRecord, how: How) {
    if how == How::Revoked {
        let expired = record
            .error
            .as_ref()
            .is_some_and(|e| e.exc_type == dbtask_protocol::error_types::EXPIRED);
        let terminated = record.date_started.is_some();
        let task = record.task.as_deref().unwrap_or("?");
        crate::python::signals::task_revoked(task, &record.id, terminated, expired);
    }
    let hooks = &ctx.shared.hooks;
    if hooks.is_empty() {
        return;
    }
    let task = ctx.task_ref(&record.id, record.task.as_deref().unwrap_or("?"));
    let error = record.error.as_ref();
    match (how, error) {
        (How::Succeeded, _) => {
            let runtime = match (record.date_started, record.date_done) {
                (Some(started), Some(done)) => (done - started).max(0.0),
                _ => 0.0,
            };
            hooks.succeeded(task, runtime);
        }
        (How::Failed | How::Exhausted { .. }, Some(error)) => hooks.failed(task, error),
        (How::Retry(next), Some(error)) => hooks.retried(task, error, next.delay),
        (How::Revoked, Some(error)) => hooks.revoked(task, error),
        (How::Rejected, Some(error)) => hooks.rejected(task, error),
        _ => {}
    }
}

/// One line per settled message, at a level that says whether anyone should look.
fn log_settled(ctx: &Context<'_>, record: &ResultRecord, how: How) {
    let (id, task, attempt, queue) = (
        record.id.as_str(),
        record.task.as_deref().unwrap_or("?"),
        ctx.attempt,
        ctx.queue,
    );
    let runtime_ms = match (record.date_started, record.date_done) {
        (Some(started), Some(done)) => ((done - started) * 1000.0).max(0.0),
        _ => 0.0,
    };
    let (error_type, error) = record
        .error
        .as_ref()
        .map_or(("", ""), |e| (e.exc_type.as_str(), e.message.as_str()));
    match how {
        How::Succeeded => {
            debug!(
                task_id = id,
                task, attempt, queue, runtime_ms, "task succeeded"
            );
        }
        How::Failed => {
            warn!(
                task_id = id,
                task, attempt, queue, runtime_ms, error_type, error, "task failed"
            );
        }
        How::Exhausted { max_retries } => {
            warn!(
                task_id = id,
                task,
                retries = record.retries,
                max_retries,
                error_type,
                error,
                "task failed: no retry left"
            );
        }
        How::Retry(next) => {
            info!(
                task_id = id,
                task,
                retry = next.retries,
                max_retries = next.max_retries,
                delay_secs = next.delay,
                error_type,
                error,
                "task will be retried"
            );
        }
        How::Revoked => {
            info!(
                task_id = id,
                task,
                attempt,
                queue,
                reason = error,
                "task revoked"
            );
        }
        How::Rejected => {
            warn!(
                task_id = id,
                task, attempt, queue, error_type, error, "task refused"
            );
        }
        How::AlreadyFinished => {
            info!(task_id = id, task, attempt, queue, state = %record.state, "task already finished: acking the redelivery without running it");
        }
    }
}

/// After a final outcome is stored: the workflow's next steps (a no-op for a plain task).
async fn workflow(
    ctx: &Context<'_>,
    flow: Option<Flow>,
    record: &ResultRecord,
    stored: Disposition,
    trace: Option<&Trace>,
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
        trace,
    };
    match Box::pin(canvas.after(&flow, record)).await {
        Ok(()) => Disposition::Ack,
        Err(e) => {
            warn!(task_id = %record.id, queue = ctx.queue, error = %e, "workflow step not done: handing the message back to redo it");
            Disposition::HandBack
        }
    }
}

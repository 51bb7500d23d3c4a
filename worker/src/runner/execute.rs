//! Running an admitted job: its STARTED record when the task tracks it, then the call within
//! its time limits, watched for a terminate. The executor that runs it (the thread pool, the
//! asyncio loop) is the task's [`Executor`](crate::python::Executor): nothing here depends
//! on which.

use dbtask_protocol::{now_unix, TaskState};

use super::admit::{mark_received, RECEIVED_AFTER};
use super::handler::{Context, Slot};
use super::{reached, Disposition, Phase};
use crate::limits::{self, Ended, Limits};
use crate::python::{Arguments, Burst, Dispatch, Handover, Job, TaskInfo};

/// How a job ran.
pub(super) struct Ran {
    pub ended: Ended,
    /// The job's arguments, handed back by the executor when the task returned or raised.
    pub arguments: Option<Arguments>,
    /// When the task started and when its call ended (Unix seconds).
    pub started: f64,
    pub done: f64,
}

/// Runs `job` (task `name`, id `id`) in `slot`. The slot is released once the task function
/// has returned, before the outcome is stored, so that storing and acking (round trips) never
/// keep another task from running. Without a slot the job is handed over to the Python threads
/// (see [`admit`](super::admit)): until one starts it, it is RECEIVED after [`RECEIVED_AFTER`]
/// and handed back at shutdown. `None`: hand the message back (not run).
pub(super) async fn execute(
    ctx: &Context<'_>,
    job: Job,
    (id, name): (&str, &str),
    info: &TaskInfo,
    slot: Option<Slot<'_>>,
) -> Option<Ran> {
    let shared = ctx.shared;
    let retries = job.retries;
    let mut started = now_unix();
    if info.track_started.unwrap_or(shared.config.track_started)
        && ctx.results.get().keeps(TaskState::Started)
    {
        let mut record = ctx
            .origin
            .record(id, Some(name), TaskState::Started, retries);
        record.date_started = Some(started);
        if ctx.store(&record).await != Disposition::Ack {
            return None;
        }
    }
    let limits = Limits::of(Some(info), &shared.config);
    let eta = job.request.eta;
    // Other handlers alive: their jobs are likely being queued in the same turn (a drain).
    let burst = if shared.in_flight.get() > 1 {
        Burst::WithOthers
    } else {
        Burst::Alone
    };
    // Handed over, the thread that takes the job enters it as running in the crash journal;
    // otherwise it has its slot, and starts now.
    let handover = slot
        .is_none()
        .then(|| Handover::new(shared.slots.clone(), ctx.mark));
    if handover.is_none() {
        ctx.mark.running();
    }
    if let Some(tracked) = ctx.tracked.get() {
        tracked.started(handover.as_ref());
    }
    shared.hooks.started(ctx.task_ref(id, name));
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
    let (ended, arguments) = match &handover {
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
                            return None;
                        }
                    }
                    _ = &mut received, if !marked => {
                        marked = true;
                        if handover.state.started_at().is_none() {
                            mark_received(ctx, (id, name, retries));
                        }
                    }
                }
            }
        }
    };
    ctx.mark.returned();
    // The slot is free: with a handover its thread gave it back already.
    match slot {
        Some(slot) => drop(slot),
        None => shared.wake_pull_loops(),
    }
    // Handed over, the task started when a thread took it, not when it was queued.
    let done = now_unix();
    if let Some(at) = handover.and_then(|h| h.state.started_at()) {
        started = done - at.elapsed().as_secs_f64();
    }
    if !shared.hooks.is_empty() {
        // Due when it was stored in its queue (by the server's clock), or at its eta.
        let due = ctx.published().max(eta.unwrap_or(0.0));
        let queued = if due > 0.0 { started - due } else { 0.0 };
        let task = ctx.task_ref(id, name);
        shared
            .hooks
            .ran(task, queued.max(0.0), (done - started).max(0.0));
    }
    Some(Ran {
        ended,
        arguments,
        started,
        done,
    })
}

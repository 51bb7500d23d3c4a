//! Periodic ticks (see docs/periodic.md): a message the server fired from a periodic schedule
//! (or `dbtask schedule run` published) carries the schedule's name in `Dbtask-Periodic`. Its
//! task id is derived from the name and the tick time, so every copy of a tick has one id; a
//! tick overtaken by its successor is skipped (`catch_up="latest"`), a copy of a tick already
//! claimed is dropped, and with `skip_if_running` a tick does not start while the previous
//! one runs. A message without the header costs one header look-up here.

use async_nats::header::HeaderName;
use async_nats::jetstream::Message;
use dbtask_protocol::periodic::{
    parse_next, tick_id, tick_is_overtaken, tick_time, CatchUp, HEADER_CATCH_UP,
    HEADER_EXPIRES_AFTER, HEADER_PERIODIC, HEADER_SCHEDULER, HEADER_SCHEDULE_NEXT,
    HEADER_SKIP_IF_RUNNING,
};
use dbtask_protocol::{error_types, now_unix, TaskError, TaskMessage, TaskState, HEADER_TASK_ID};
use tracing::{debug, warn};

use super::handler::Context;
use super::settle::{How, Settled};
use super::{Disposition, Shared};
use crate::store::{TickClaim, TickRef};

/// The header every tick carries, as a name made once: looking it up allocates nothing.
const PERIODIC: HeaderName = HeaderName::from_static(HEADER_PERIODIC);

/// A delivered tick, read from its headers and its delivery.
pub(super) struct Tick<'m> {
    schedule: &'m str,
    id: String,
    time: i64,
    /// When its successor is due (`Nats-Schedule-Next`); `None` for a tick fired by hand.
    next: Option<f64>,
    catch_up: CatchUp,
    running_ttl: Option<u64>,
    expires_after: Option<u64>,
    stream_seq: u64,
}

impl<'m> Tick<'m> {
    /// The tick `msg` is, `None` for any other message. A tick the server fired takes its id
    /// from the second it was stored in; one published by `dbtask schedule run` carries its id
    /// in `Dbtask-Id`.
    pub(super) fn of(msg: &'m Message) -> Option<Tick<'m>> {
        let headers = msg.message.headers.as_ref()?;
        let schedule = headers.get(PERIODIC)?.as_str();
        let header = |name: &str| headers.get(name).map(|v| v.as_str());
        let info = msg.info().ok();
        let published = info.as_ref().map_or_else(now_unix, |i| {
            i.published.unix_timestamp_nanos() as f64 / 1e9
        });
        let time = tick_time(published);
        let id = match header(HEADER_SCHEDULER) {
            Some(_) => tick_id(schedule, time),
            None => header(HEADER_TASK_ID)?.to_owned(),
        };
        let number = |name: &str| header(name).and_then(|v| v.parse::<u64>().ok());
        Some(Tick {
            schedule,
            id,
            time,
            next: header(HEADER_SCHEDULE_NEXT).and_then(parse_next),
            catch_up: match header(HEADER_CATCH_UP) {
                Some("all") => CatchUp::All,
                _ => CatchUp::Latest,
            },
            running_ttl: number(HEADER_SKIP_IF_RUNNING).filter(|s| *s > 0),
            expires_after: number(HEADER_EXPIRES_AFTER),
            stream_seq: info.map_or(0, |i| i.stream_sequence),
        })
    }
}

/// What admission does with a tick.
// Made once per tick and taken apart at once, like `Admission`: boxing the big variant would
// cost an allocation for nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum TickAdmission {
    /// Runs, as this task message (its id and expiry set from the tick).
    Run(TaskMessage),
    /// Not run: this record says why.
    Settled(Settled),
    /// A copy of a tick claimed by another message: acked, nothing recorded.
    Leave(Disposition),
}

/// Admits the tick `tick` carrying `task`.
pub(super) async fn admit(
    ctx: &Context<'_>,
    tick: Tick<'_>,
    mut task: TaskMessage,
) -> TickAdmission {
    task.id = tick.id.clone();
    if let Some(secs) = tick.expires_after {
        task.expires = Some(tick.time as f64 + secs as f64);
    }
    let skip = |message: String| {
        let error = TaskError::new(error_types::SKIPPED, message);
        let record = ctx
            .origin
            .ended(&tick.id, Some(&task.task), TaskState::Revoked, 0, error);
        TickAdmission::Settled(Settled {
            record,
            how: How::Revoked,
        })
    };
    if tick_is_overtaken(tick.catch_up, tick.next, now_unix()) {
        return skip(format!(
            "skipped: the next tick of schedule {:?} was already due when this one was delivered (catch_up=\"latest\")",
            tick.schedule
        ));
    }
    let store = &ctx.shared.store;
    let claim = TickRef {
        schedule: tick.schedule,
        id: &tick.id,
        stream_seq: tick.stream_seq,
        time: tick.time,
        next: tick.next,
        running_ttl: tick.running_ttl,
    };
    let verdict =
        Box::pin(store.retrying("claim a periodic tick", || store.claim_tick(&claim))).await;
    match verdict {
        TickClaim::Run => TickAdmission::Run(task),
        TickClaim::Duplicate(owner) => {
            debug!(task_id = %tick.id, schedule = tick.schedule, claimed_by_seq = %owner, queue = ctx.queue, "a copy of a tick already claimed: dropped");
            TickAdmission::Leave(Disposition::Ack)
        }
        TickClaim::PreviousRunning(running) => skip(format!(
            "skipped: tick {running} of schedule {:?} was still running (skip_if_running)",
            tick.schedule
        )),
    }
}

/// Once a tick's delivery is settled: gives its schedule's running mark back, if it holds it.
/// A handed-back tick keeps it (its redelivery has the same id and goes on).
pub(super) async fn settled(shared: &Shared, msg: &Message, disposition: Disposition) {
    if disposition != Disposition::Ack {
        return;
    }
    let Some(tick) = Tick::of(msg) else { return };
    if tick.running_ttl.is_none() {
        return;
    }
    if let Err(e) = shared.store.release_tick(tick.schedule, &tick.id).await {
        warn!(task_id = %tick.id, schedule = tick.schedule, error = %e, "cannot clear a schedule's running mark; it expires by itself");
    }
}

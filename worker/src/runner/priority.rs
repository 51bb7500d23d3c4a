//! Priorities: a queue has ten levels (0 to 9, 9 first), each its own subject and durable
//! consumer (`dbtask.tasks.<queue>` / `dbtask-<queue>` for the default level 5,
//! `dbtask.tasks.<queue>.p<N>` / `dbtask-<queue>-p<N>` for the others), since JetStream has no
//! per-message priority and a work-queue stream refuses overlapping consumers.
//!
//! Each round asks the levels, highest first, for the messages already waiting (no-wait
//! fetches) until the free slots are filled. Levels known to be empty are skipped, so a queue
//! whose tasks all use the default level costs no extra round trip: a level is known empty
//! after a fetch returned less than asked, and known non-empty again when a message is
//! published to its subject (a core subscription on `dbtask.tasks.<queue>.*` wakes the worker)
//! or at the latest after [`RECHECK`]. When every level is empty the loop long-polls the default
//! level, and a wake-up meanwhile fetches the woken level at once.
//!
//! No starvation: every [`FAIR_EVERY`]th round starts at another level in turn (rotating
//! through all ten) instead of the highest, so on a backlog each level still gets at least one
//! round in `10 * FAIR_EVERY`.
//!
//! A worker run with `priorities = false` uses the same loop with the default level only
//! ([`Levels::default_only`]).

use std::rc::Rc;
use std::time::{Duration, Instant};

use dbtask_protocol::{subject_priority, DEFAULT_PRIORITY, MAX_PRIORITY};
use futures::{FutureExt, StreamExt};
use tracing::{debug, warn};

use super::{handler, reached, Phase, Shared, PULL_EXPIRES};
use crate::broker::{Batch, Broker, BrokerError, QueueConsumer};
use crate::config::Config;

/// Every this many rounds, the fetch order starts at a rotating level instead of the highest.
const FAIR_EVERY: u64 = 10;
/// Levels marked empty are asked again after this long, in case a message came back to them
/// without a publish (a nak, an ack wait that expired).
const RECHECK: Duration = Duration::from_secs(1);
/// A no-wait fetch normally ends within milliseconds; one with no answer after this long
/// (NATS unreachable, the request or its answer lost in a reconnect) counts as failed.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// At shutdown, how long a fetch under way may still take: what it brings is then handed
/// back by its handlers. Bounded so that an unreachable NATS cannot hold the shutdown.
const DRAIN_FETCH_GRACE: Duration = Duration::from_secs(1);

struct Level {
    priority: u8,
    consumer: QueueConsumer,
    /// Messages may be waiting (unknown counts as yes).
    maybe: bool,
}

/// The consumers of every level of one queue, highest level first.
pub(super) struct Levels {
    queue: String,
    levels: Vec<Level>,
    /// Wake-ups for the non-default levels, subscribed before the worker says it is ready.
    wake: Option<async_nats::Subscriber>,
}

/// Creates or updates the consumers of every priority level of `queue`; `default` is the
/// queue's plain consumer, already set up.
pub(super) async fn ensure_levels(
    broker: &Broker,
    default: QueueConsumer,
    config: &Config,
) -> Result<Levels, BrokerError> {
    let queue = default.queue().to_owned();
    // One round trip for all nine levels instead of nine in a row: it shortens start-up.
    let others = futures::future::try_join_all(
        (0..=MAX_PRIORITY)
            .rev()
            .filter(|p| *p != DEFAULT_PRIORITY)
            .map(|priority| broker.ensure_level_consumer(&queue, priority, config)),
    )
    .await?;
    let mut default = Some(default);
    let mut others = others.into_iter();
    let mut levels = Vec::with_capacity(usize::from(MAX_PRIORITY) + 1);
    for priority in (0..=MAX_PRIORITY).rev() {
        let consumer = match priority {
            DEFAULT_PRIORITY => default.take().expect("the default level comes once"),
            _ => others.next().expect("one consumer per other level"),
        };
        levels.push(Level {
            priority,
            consumer,
            maybe: true,
        });
    }
    // Subscribed (and confirmed by the server with a flush) before the first fetch round, so
    // a priority task published at any moment after that round is either fetched or wakes us.
    let wake = match broker.watch_queue(&queue).await {
        Ok(sub) => Some(sub),
        Err(e) => {
            // Still correct without it: empty levels are asked again every RECHECK.
            warn!(queue = %queue, error = %e, "cannot subscribe to priority wake-ups; priority tasks may wait up to a few seconds on an idle worker");
            None
        }
    };
    Ok(Levels {
        queue,
        levels,
        wake,
    })
}

impl Levels {
    /// Only the queue's default level (the plain consumer), for a worker that ignores
    /// priorities: no other level is asked and no wake-up subscription is made.
    pub(super) fn default_only(default: QueueConsumer) -> Levels {
        Levels {
            queue: default.queue().to_owned(),
            levels: vec![Level {
                priority: DEFAULT_PRIORITY,
                consumer: default,
                maybe: true,
            }],
            wake: None,
        }
    }

    fn mark(&mut self, priority: u8) {
        if let Some(level) = self.levels.iter_mut().find(|l| l.priority == priority) {
            level.maybe = true;
        }
    }

    fn mark_all(&mut self) {
        for level in &mut self.levels {
            level.maybe = true;
        }
    }

    /// Level indexes in the order of this round.
    fn order(&self, round: u64) -> Vec<usize> {
        round_order(self.levels.len(), round)
    }

    fn default_index(&self) -> usize {
        self.levels
            .iter()
            .position(|l| l.priority == DEFAULT_PRIORITY)
            .expect("the default level exists")
    }
}

/// The order in which `n` levels (highest first) are asked in `round`: highest first, except
/// every [`FAIR_EVERY`]th round, which starts at the next level in turn and wraps around.
fn round_order(n: usize, round: u64) -> Vec<usize> {
    let start = if round % FAIR_EVERY == 0 {
        ((round / FAIR_EVERY) % n as u64) as usize
    } else {
        0
    };
    (0..n).map(|i| (start + i) % n).collect()
}

/// Pulls the messages of one queue's levels while the worker runs (see the module doc).
pub(super) async fn pull_loop(shared: Rc<Shared>, mut levels: Levels) {
    let queue: Rc<str> = Rc::from(levels.queue.as_str());
    let mut phase = shared.phase.subscribe();
    let mut wake = levels.wake.take();
    let mut round = 0u64;
    let mut checked = Instant::now();
    let mut failures = 0u32;
    'pull: while shared.phase() == Phase::Running {
        // Wake-ups keep being read while every slot is busy: a backlog of priority messages
        // must not fill the subscription's buffer.
        let free = loop {
            let woken = async {
                match wake.as_mut() {
                    Some(sub) => sub.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                free = free_slots(&shared) => break free,
                _ = reached(&mut phase, Phase::Draining) => break 'pull,
                msg = woken => match msg {
                    Some(msg) => {
                        if let Some(p) = subject_priority(&msg.subject) {
                            levels.mark(p);
                        }
                    }
                    None => wake = None,
                },
            }
        };
        let want = free.min(shared.config.fetch_batch);
        if let Some(sub) = wake.as_mut() {
            while let Some(Some(msg)) = sub.next().now_or_never() {
                if let Some(p) = subject_priority(&msg.subject) {
                    levels.mark(p);
                }
            }
        }
        if checked.elapsed() >= RECHECK {
            levels.mark_all();
            checked = Instant::now();
        }
        round += 1;
        let fetched = {
            let fetch = fetch_round(&shared, &queue, &mut levels, round, want);
            tokio::pin!(fetch);
            tokio::select! {
                fetched = &mut fetch => fetched,
                _ = reached(&mut phase, Phase::Draining) => {
                    let _ = tokio::time::timeout(DRAIN_FETCH_GRACE, &mut fetch).await;
                    break 'pull;
                }
            }
        };
        let got = match fetched {
            Ok(got) => {
                failures = 0;
                got
            }
            Err(e) => {
                failures += 1;
                warn!(queue = %queue, error = %e, failures, "cannot pull messages; retrying");
                if !recover(&shared, &mut phase, &mut levels, failures).await {
                    break 'pull;
                }
                continue;
            }
        };
        if got > 0 {
            continue;
        }

        // Every level is empty: wait on the default level, and on wake-ups for the others.
        let default = levels.default_index();
        let pulled = tokio::select! {
            pulled = levels.levels[default].consumer.pull(want, PULL_EXPIRES) => pulled,
            _ = reached(&mut phase, Phase::Draining) => break 'pull,
        };
        let mut batch = match pulled {
            Ok(batch) => batch,
            Err(e) => {
                failures += 1;
                warn!(queue = %queue, error = %e, failures, "cannot pull messages; retrying");
                if !recover(&shared, &mut phase, &mut levels, failures).await {
                    break 'pull;
                }
                continue;
            }
        };
        loop {
            let woken = async {
                match wake.as_mut() {
                    Some(sub) => sub.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = reached(&mut phase, Phase::Draining) => {
                    let mut held = Vec::new();
                    while let Some(Some(Ok(msg))) = batch.next().now_or_never() {
                        held.push(msg);
                    }
                    // Unsubscribe from the open pull request before the naks: NATS would
                    // otherwise redeliver them into it, where nobody reads any more, and they
                    // would wait out their ack wait.
                    drop(batch);
                    for msg in &held {
                        handler::hand_back(msg, &queue).await;
                    }
                    break 'pull;
                }
                item = batch.next() => match item {
                    Some(Ok(msg)) => spawn(&shared, &queue, msg),
                    Some(Err(e)) => {
                        failures += 1;
                        warn!(queue = %queue, error = %e, failures, "pull request failed; pulling again");
                        if !recover(&shared, &mut phase, &mut levels, failures).await {
                            break 'pull;
                        }
                        break;
                    }
                    None => break,
                },
                msg = woken => {
                    let Some(msg) = msg else {
                        wake = None;
                        continue;
                    };
                    let Some(p) = subject_priority(&msg.subject) else { continue };
                    levels.mark(p);
                    // The default level's open request may still deliver its share: those
                    // messages wait for a slot in their handlers (with in-progress acks).
                    let free = shared.free_slots().min(shared.config.fetch_batch);
                    if free > 0 {
                        let index = levels.levels.iter().position(|l| l.priority == p);
                        if let Some(index) = index {
                            if let Err(e) = fetch_level(&shared, &queue, &mut levels.levels[index], free).await {
                                debug!(queue = %queue, priority = p, error = %e, "cannot fetch a woken priority level; the next round asks again");
                            }
                        }
                    }
                }
            }
        }
    }
    debug!(queue = %queue, "stopped pulling");
}

/// Waits until it is time to ask for messages (see [`Shared::refill`]) and returns how many.
async fn free_slots(shared: &Shared) -> usize {
    loop {
        let mut freed = std::pin::pin!(shared.freed.notified());
        freed.as_mut().enable();
        let free = shared.refill();
        if free > 0 {
            return free;
        }
        freed.await;
    }
}

/// One pass over the levels in this round's order; returns how many messages it took.
async fn fetch_round(
    shared: &Rc<Shared>,
    queue: &Rc<str>,
    levels: &mut Levels,
    round: u64,
    want: usize,
) -> Result<usize, BrokerError> {
    let mut got = 0;
    for index in levels.order(round) {
        if got >= want {
            break;
        }
        let level = &mut levels.levels[index];
        if !level.maybe {
            continue;
        }
        got += fetch_level(shared, queue, level, want - got).await?;
    }
    Ok(got)
}

/// Takes up to `max` waiting messages of one level and starts their handlers; fails after
/// [`FETCH_TIMEOUT`] without an answer (messages taken by then are being handled).
async fn fetch_level(
    shared: &Rc<Shared>,
    queue: &Rc<str>,
    level: &mut Level,
    max: usize,
) -> Result<usize, BrokerError> {
    let mut got = 0;
    let fetch = async {
        let mut batch: Batch = level.consumer.pull_now(max).await?;
        while let Some(item) = batch.next().await {
            match item {
                Ok(msg) => {
                    got += 1;
                    spawn(shared, queue, msg);
                }
                Err(e) => {
                    // A no-wait request ends with "no messages": only a real failure is logged.
                    debug!(queue = %queue, priority = level.priority, error = %e, "no-wait fetch ended");
                    break;
                }
            }
        }
        Ok::<(), BrokerError>(())
    };
    match tokio::time::timeout(FETCH_TIMEOUT, fetch).await {
        Ok(fetched) => fetched?,
        Err(_) => return Err(level.consumer.unanswered(FETCH_TIMEOUT)),
    }
    // The default level has no wake-up: it is always asked.
    level.maybe = got >= max || level.priority == DEFAULT_PRIORITY;
    Ok(got)
}

fn spawn(shared: &Rc<Shared>, queue: &Rc<str>, msg: async_nats::jetstream::Message) {
    let ticket = handler::Ticket::new(shared.clone());
    // Boxed: the task then holds a pointer, not the whole handler (a few KB), which tokio
    // would otherwise copy when it spawns the task and again when the task completes.
    tokio::task::spawn_local(Box::pin(handler::handle(ticket, queue.clone(), msg)));
}

/// Waits before the next pull after a failure (longer each time, up to 5 s); after a few
/// failures in a row, sets the stream and the level consumers up again. `false`: shutting down.
async fn recover(
    shared: &Shared,
    phase: &mut tokio::sync::watch::Receiver<Phase>,
    levels: &mut Levels,
    failures: u32,
) -> bool {
    let delay = Duration::from_millis(200 * 2u64.pow(failures.min(5))).min(Duration::from_secs(5));
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = reached(phase, Phase::Draining) => return false,
    }
    levels.mark_all();
    if failures % 3 == 0 {
        // Requests to NATS, each up to its timeout: a shutdown does not wait for them.
        tokio::select! {
            _ = set_up_again(shared, levels) => {}
            _ = reached(phase, Phase::Draining) => return false,
        }
    }
    true
}

/// Creates or updates the stream and the consumers of every level again.
async fn set_up_again(shared: &Shared, levels: &mut Levels) {
    if let Err(e) = shared.broker.ensure_stream(&shared.config).await {
        warn!(queue = %levels.queue, error = %e, "cannot set up the task stream");
        return;
    }
    for level in &mut levels.levels {
        match shared
            .broker
            .ensure_level_consumer(&levels.queue, level.priority, &shared.config)
            .await
        {
            Ok(fresh) => level.consumer = fresh,
            Err(e) => {
                warn!(queue = %levels.queue, priority = level.priority, error = %e, "cannot set up the queue's consumer")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{round_order, FAIR_EVERY};

    #[test]
    fn highest_first_except_fair_rounds_that_rotate_through_every_level() {
        assert_eq!(round_order(10, 1), (0..10).collect::<Vec<_>>());
        assert_eq!(round_order(10, FAIR_EVERY - 1)[0], 0);
        assert_eq!(
            round_order(10, FAIR_EVERY),
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
        );
        let leaders: std::collections::HashSet<usize> = (1..=FAIR_EVERY * 10)
            .map(|round| round_order(10, round)[0])
            .collect();
        assert_eq!(
            leaders.len(),
            10,
            "every level leads a round within 10 fair rounds"
        );
    }
}

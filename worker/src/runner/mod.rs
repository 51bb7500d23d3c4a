//! The serving loop: connect, set up JetStream, pull messages per queue within the concurrency
//! limit, hand each to [`handler`], and shut down gracefully.
//!
//! Everything runs on one thread (a current-thread runtime and a `LocalSet`): Python runs on its
//! own threads, so this thread only moves bytes, and shared state needs no locks.

mod admit;
mod control;
mod crash;
mod dead;
mod execute;
mod handler;
mod priority;
mod rate;
mod settle;
mod status;
mod tick;

pub use status::{Load, Serving, Status};

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::LocalSet;
use tracing::{debug, info, warn};

use crate::activity::Activity;
use crate::broker::{Broker, BrokerError, EventSink};
use crate::config::Config;
use crate::events::Hooks;
use crate::journal::Journal;
use crate::python::PythonRuntime;
use crate::revoke::Revocations;
use crate::store::{Store, StoreError, Writer};

/// How long one pull request waits on the server for messages. Short, so that a request lost in
/// a reconnect is replaced quickly; an idle queue costs one tiny request per period.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// Handlers that may be finishing (storing their outcome, acking) on top of the running and
/// prefetched ones: about one full pipeline of the result writer.
const FINISHING: usize = crate::store::MAX_BATCH;

/// Why the worker could not start (once serving, errors are logged and retried instead).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Periodic(#[from] crate::broker::PeriodicSetupError),
}

/// How a message leaves this worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    /// The outcome is stored: done.
    Ack,
    /// Not run (or not finished) here: NATS delivers it again, to this worker or another.
    HandBack,
    /// Cannot ever run and cannot be recorded (no task id): drop it.
    Term,
}

/// Where the worker is in its life: each step only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Pulling and running tasks.
    Running,
    /// Shutdown requested: no more pulls, running tasks may finish.
    Draining,
    /// The pull loops have stopped (their open pull requests unsubscribed): tasks not started
    /// yet go back to NATS now.
    Released,
    /// Shutdown timeout passed: everything still held goes back to NATS now.
    Abandon,
}

/// State shared by the pull loops and the message handlers of this worker.
struct Shared {
    config: Config,
    python: PythonRuntime,
    store: Store,
    writer: Writer,
    broker: Broker,
    /// Revoked task ids, followed live from Redis.
    revocations: Revocations,
    /// `hostname:pid`, recorded in every result.
    worker: String,
    /// Who hears of each task's lifecycle events (nobody by default).
    hooks: Hooks,
    /// Which held messages run, for the worker that starts after a crash of this one.
    journal: Journal,
    /// One permit per task allowed to run.
    slots: Arc<Semaphore>,
    /// Messages received but still waiting for a slot.
    waiting: Cell<usize>,
    /// Signalled when a slot or a place in the prefetch is released and more messages should
    /// be asked for (see [`Shared::refill`]).
    freed: Notify,
    /// Handlers alive (received and not yet acked or handed back).
    in_flight: Cell<usize>,
    /// Signalled when `in_flight` drops to zero.
    idle: Notify,
    phase: watch::Sender<Phase>,
    /// What the worker holds and has done, for inspect and heartbeats (with `control` or
    /// `events`).
    activity: Option<Activity>,
    /// Rate limits set with `dbtask control rate-limit`, by task name; they win over the
    /// tasks' own.
    rate_overrides: RefCell<HashMap<String, control::Override>>,
    /// Notified by `dbtask control shutdown`: stop as on SIGTERM.
    stop: Notify,
    /// When the worker started serving.
    started: std::time::Instant,
    /// `--events`: where the worker's own events go.
    events: Option<EventSink>,
}

impl Shared {
    fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// The rate limit `task` runs under: its override if one was set, else `declared`.
    fn rate_limit_of(
        &self,
        task: &str,
        declared: Option<dbtask_protocol::Rate>,
    ) -> Option<dbtask_protocol::Rate> {
        let overrides = self.rate_overrides.borrow();
        if overrides.is_empty() {
            return declared;
        }
        overrides.get(task).map_or(declared, |o| o.rate)
    }

    /// Whether `task`'s rate limit was overridden.
    fn has_rate_override(&self, task: &str) -> bool {
        let overrides = self.rate_overrides.borrow();
        !overrides.is_empty() && overrides.contains_key(task)
    }

    /// Most handlers alive at once: tasks running, waiting for a slot (`prefetch`), and
    /// finishing (their outcome being stored and acked; they hold no slot). The bound only bites
    /// when storing stalls (Redis down): the worker then stops taking messages instead of
    /// running tasks whose outcomes pile up in memory.
    fn max_in_flight(&self) -> usize {
        max_in_flight(&self.config)
    }

    /// Messages waiting for a slot: in their handlers, or handed over to the Python threads
    /// and not taken by one yet (they take their slot then).
    fn waiting_for_slots(&self) -> usize {
        self.waiting.get() + self.python.queued_sync()
    }

    /// Free slots (plus the `prefetch` allowance) not already promised to received messages,
    /// within [`Shared::max_in_flight`].
    fn free_slots(&self) -> usize {
        let room = self.max_in_flight().saturating_sub(self.in_flight.get());
        (self.slots.available_permits() + self.config.prefetch)
            .saturating_sub(self.waiting_for_slots())
            .min(room)
    }

    /// Wakes the pull loops waiting in `free_slots` if they would now ask for messages: not
    /// on every finished task, most of which leave the prefetch full enough.
    fn wake_pull_loops(&self) {
        if self.refill() > 0 {
            self.freed.notify_waiters();
        }
    }

    /// Messages asked for in one go by a busy worker (see [`Shared::refill`]).
    fn refill_batch(&self) -> usize {
        (self.config.prefetch / 2).clamp(1, self.config.fetch_batch)
    }

    /// How many messages to ask for now, or 0 to wait: at once when a slot would otherwise sit
    /// idle (more free slots than messages waiting for one); else only once the prefetch has
    /// room for a good batch, so that a busy worker sends one pull request per batch instead of
    /// one per finished task.
    fn refill(&self) -> usize {
        let free = self.free_slots();
        let idle_slot = self.slots.available_permits() > self.waiting_for_slots();
        if free > 0 && (idle_slot || free >= self.refill_batch()) {
            free
        } else {
            0
        }
    }

    async fn until_idle(&self) {
        loop {
            let mut idle = pin!(self.idle.notified());
            idle.as_mut().enable();
            if self.in_flight.get() == 0 {
                return;
            }
            idle.await;
        }
    }
}

fn max_in_flight(config: &Config) -> usize {
    config.concurrency + config.prefetch + FINISHING
}

/// Completes once the phase reaches `at_least`.
async fn reached(rx: &mut watch::Receiver<Phase>, at_least: Phase) {
    // The sender lives as long as `Shared`, which outlives every receiver's user.
    let _ = rx.wait_for(|p| *p >= at_least).await;
}

/// Connects to NATS and Redis, creates or updates the stream and the consumers, logs
/// `worker ready`, and serves until `shutdown` completes; then lets running tasks finish within
/// `shutdown_timeout` and hands the rest back to NATS. Returns `Ok` after a graceful shutdown.
pub async fn run(
    config: Config,
    python: PythonRuntime,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    run_with_hooks(config, python, Hooks::default(), shutdown).await
}

/// [`run`], telling `hooks` what happens to each task (see [`crate::events`]).
pub async fn run_with_hooks(
    config: Config,
    python: PythonRuntime,
    hooks: Hooks,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    run_watched(config, python, hooks, None, shutdown).await
}

/// [`run_with_hooks`], keeping `status` up to date for watchers on other tasks or threads
/// (the `--http-addr` endpoint, systemd): see [`Status`].
pub async fn run_watched(
    config: Config,
    python: PythonRuntime,
    hooks: Hooks,
    status: Option<Arc<Status>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let worker = worker_identity();
    // Checked by `Config::validate` already; read once more here for a caller that did not.
    let message_key = config.message_key().map_err(WorkerError::Config)?;
    let broker = Broker::connect_with(&config.nats_url, &config.nats_security(), &worker)
        .await?
        .with_message_key(message_key);
    let redis_tls = config.redis_tls();
    let store = Store::connect_with(&config.redis_url, &redis_tls, config.result_ttl).await?;
    if let Some(status) = &status {
        status.connected(&broker, &store);
    }
    // Informational only: a managed Redis may refuse INFO.
    let redis_version = store.server_version().await.unwrap_or_else(|e| {
        warn!(error = %e, "cannot read the Redis version");
        "unknown".to_owned()
    });
    let revocations = Revocations::start(&store).await?;
    let identity = crate::journal::identity(broker.url(), store.url());
    let journal = crash::open_journal(&config, identity, &store, max_in_flight(&config)).await;
    broker.ensure_stream(&config).await?;
    broker.apply_schedules(python.periodic()).await?;
    let mut levels = Vec::with_capacity(config.queues.len());
    for queue in &config.queues {
        let consumer = broker.ensure_consumer(queue, &config).await?;
        levels.push(if config.priorities {
            priority::ensure_levels(&broker, consumer, &config).await?
        } else {
            priority::Levels::default_only(consumer)
        });
    }
    let max_payload = broker.max_payload();
    if max_payload > 0 && config.max_message_bytes > max_payload {
        warn!(
            max_message_bytes = config.max_message_bytes,
            server_max_payload = max_payload,
            "max_message_bytes is above the NATS server's max_payload: the server refuses bigger messages anyway"
        );
    }

    let (hooks, monitoring) = control::monitoring(&config, &broker, &store, &worker, hooks).await;

    let mut tasks: Vec<&str> = python.tasks().keys().map(String::as_str).collect();
    tasks.sort_unstable();
    info!(
        queues = %config.queues.join(","),
        concurrency = config.concurrency,
        tasks = %tasks.join(","),
        worker = %worker,
        nats_url = broker.url(),
        redis_url = store.url(),
        nats_version = broker.server_version(),
        redis_version = %redis_version,
        python_version = python.version().split_whitespace().next().unwrap_or("?"),
        dbtask_version = env!("CARGO_PKG_VERSION"),
        "worker ready"
    );
    if tasks.is_empty() {
        warn!(apps = %config.apps.join(","), "the imported modules registered no task: every message will fail as dbtask.UnknownTask");
    }
    crate::python::signals::send_worker_signal_async("worker_ready").await;
    if let Some(status) = &status {
        status.set_phase(Serving::Ready);
    }

    let local = LocalSet::new();
    local
        .run_until(serve(
            config,
            python,
            broker,
            store,
            revocations,
            levels,
            worker,
            (hooks, journal, status, monitoring),
            shutdown,
        ))
        .await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    config: Config,
    python: PythonRuntime,
    broker: Broker,
    store: Store,
    revocations: Revocations,
    levels: Vec<priority::Levels>,
    worker: String,
    (hooks, journal, status, monitoring): (
        Hooks,
        Journal,
        Option<Arc<Status>>,
        control::Monitoring,
    ),
    shutdown: impl Future<Output = ()>,
) {
    let (writer, writer_loop) = Writer::new(store.clone());
    let writer_done = tokio::spawn(writer_loop);
    // `update_state` from the tasks goes to this writer while the worker serves.
    let states =
        crate::python::state::serve(writer.clone(), worker.clone(), config.max_result_bytes);
    let (phase, _) = watch::channel(Phase::Running);
    let shared = Rc::new(Shared {
        slots: Arc::new(Semaphore::new(config.concurrency)),
        config,
        python,
        store,
        writer,
        broker,
        revocations,
        worker,
        hooks,
        journal,
        waiting: Cell::new(0),
        freed: Notify::new(),
        in_flight: Cell::new(0),
        idle: Notify::new(),
        phase,
        activity: monitoring.activity,
        rate_overrides: RefCell::new(monitoring.overrides),
        stop: Notify::new(),
        started: std::time::Instant::now(),
        events: monitoring.events.as_ref().map(|(sink, _)| sink.clone()),
    });
    let (service, requests) = match monitoring.control {
        Some((service, requests)) => (Some(service), Some(requests)),
        None => (None, None),
    };
    let answering = requests.map(|requests| {
        tokio::task::spawn_local(control::serve_requests(shared.clone(), requests))
    });
    let heartbeats = shared
        .events
        .clone()
        .map(|sink| tokio::task::spawn_local(control::heartbeats(shared.clone(), sink)));

    if let Some(status) = &status {
        status.answer_loads(&shared);
    }
    let pullers: Vec<_> = levels
        .into_iter()
        .map(|levels| tokio::task::spawn_local(priority::pull_loop(shared.clone(), levels)))
        .collect();

    tokio::select! {
        _ = shutdown => {}
        _ = shared.stop.notified() => {}
    }
    // Stopping: no more answers, and `nats micro ls` no longer lists this worker.
    for task in [answering, heartbeats].into_iter().flatten() {
        task.abort();
        let _ = task.await;
    }
    if let Some(service) = service {
        if let Err(e) = service.stop().await {
            debug!(error = %e, "cannot stop the control service");
        }
    }
    let timeout = shared.config.shutdown_timeout();
    info!(
        running = shared.in_flight.get(),
        timeout_secs = timeout.as_secs_f64(),
        "draining: waiting for running tasks"
    );
    shared.phase.send_replace(Phase::Draining);
    if let Some(status) = &status {
        status.set_phase(Serving::Draining);
    }
    for puller in pullers {
        let _ = puller.await;
    }
    shared.phase.send_replace(Phase::Released);
    let finished = tokio::time::timeout(timeout, shared.until_idle())
        .await
        .is_ok();
    if !finished {
        warn!(
            running = shared.in_flight.get(),
            "shutdown timeout: handing running tasks back to NATS for another worker"
        );
        shared.phase.send_replace(Phase::Abandon);
        shared.until_idle().await;
    }

    // Every message is acked or handed back: nothing for a next worker to account for.
    shared.journal.close();
    if let Some(status) = &status {
        status.set_phase(Serving::Stopped);
    }
    crate::python::signals::send_worker_signal_async("worker_shutdown").await;
    if let Some(sink) = &shared.events {
        let offline = control::worker_event(&shared, "worker.offline");
        sink.send(&crate::event_stream::worker_subject("offline"), offline);
        sink.finish().await;
    }
    let python = shared.python.clone();
    // The writer ends once every handle is gone and what it holds is stored; give it a moment.
    drop(states);
    drop(shared);
    if let Some((_, publisher)) = monitoring.events {
        // The queued events, `offline` last, then a flush.
        let _ = tokio::time::timeout(Duration::from_secs(2), publisher).await;
    }
    if tokio::time::timeout(Duration::from_secs(5), writer_done)
        .await
        .is_err()
    {
        warn!("results still unstored at exit: their messages were handed back and will rerun");
    }
    if finished {
        // Joins the Python threads and the pool processes, idle by now; off this thread all
        // the same (the processes' drivers run on it).
        let stop = tokio::task::spawn_blocking(move || {
            python.shutdown();
            python.wait_stopped(Duration::from_secs(6))
        });
        if !matches!(
            tokio::time::timeout(Duration::from_secs(7), stop).await,
            Ok(Ok(true))
        ) {
            warn!("the Python threads or pool processes did not stop within 6 s; exiting anyway");
        }
    }
    info!("worker stopped");
}

/// `hostname:pid`, as recorded in result records and NATS connection names.
pub fn worker_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

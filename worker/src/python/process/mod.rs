//! The pool of processes (`--pool processes`): sync tasks run in child processes, one task at
//! a time each, so that CPU-bound tasks use every core and a task past its hard time limit, or
//! revoked with terminate, can really be stopped (its process is killed and replaced).
//!
//! The worker stays the only process that talks to NATS and Redis; a child only runs Python
//! (see [`child`]). Each child has a *driver*, a task on the pool's own thread (a tokio
//! runtime of its own, so that the children's sockets are polled at once) that takes
//! the next job from the pool's queue, sends it over the child's socket ([`wire`]), and waits
//! for its outcome, for a control (soft limit, kill) or for the child's death.
//!
//! Children are started with exec, never with a bare fork: the worker has threads (tokio, the
//! Python threads), and a fork of a threaded process that holds an interpreter is unsafe. Each
//! child is `/proc/self/exe` again, so it runs exactly the worker's code, and it dies with the
//! worker (`PR_SET_PDEATHSIG`, and the end of its socket).

pub mod child;
mod spawn;
mod wire;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dbtask_protocol::{error_types, TaskError};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use self::spawn::{describe_exit, resident_bytes, stop};
use self::wire::{FromChild, JobFrame, ToChild};
use super::pool::{Alive, ThreadCount};
use super::{CallOutcome, Interrupt, PythonError, WorkItem};

/// How the pool is sized and when a child is replaced.
#[derive(Debug, Clone)]
pub struct ProcessOptions {
    /// Children, each running one task at a time.
    pub size: usize,
    /// Replace a child after it ran this many tasks (`--max-tasks-per-child`); 0: never.
    pub max_tasks: u64,
    /// Replace a child once its resident memory passes this many bytes after a task
    /// (`--max-memory-per-child`); 0: never.
    pub max_memory: u64,
    pub log_level: String,
    pub log_format: crate::telemetry::LogFormat,
}

/// How a child's death is reported, at most once per this interval (with a count).
const CRASH_REPORT_EVERY: Duration = Duration::from_secs(10);
/// A child told to exit (the worker stops, or recycles it) that is still alive after this is
/// killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

pub(crate) struct ProcessPool {
    shared: Arc<Shared>,
    sender: Mutex<Option<mpsc::UnboundedSender<WorkItem>>>,
}

struct Shared {
    options: ProcessOptions,
    /// What every child is told at start, but its socket.
    python: Option<PathBuf>,
    apps: Vec<String>,
    django: Option<String>,
    sys_path: Vec<PathBuf>,
    jobs: tokio::sync::Mutex<mpsc::UnboundedReceiver<WorkItem>>,
    /// The driver of each running job, by task id, for its controls.
    running: Mutex<HashMap<String, mpsc::UnboundedSender<Control>>>,
    closed: AtomicBool,
    /// Children that died on their own in a row (reset by a task that ends normally): the
    /// delay before the next start grows with it.
    crashes_in_a_row: AtomicU32,
    reports: Mutex<CrashReports>,
    /// Children started to replace another, for any reason.
    replaced: AtomicU64,
}

#[derive(Default)]
struct CrashReports {
    last: Option<Instant>,
    unreported: u64,
}

/// What a driver is told about the job its child runs.
#[derive(Debug, Clone, Copy)]
enum Control {
    Soft,
    Kill(Interrupt),
}

/// A running child and its sockets: jobs and their outcomes on one, controls (soft limits) on
/// the other, so that the child's main thread reads its jobs itself and a job costs one
/// wake-up on each side.
struct Child {
    process: tokio::process::Child,
    pid: u32,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    control: tokio::net::UnixStream,
    tasks: u64,
}

/// How [`Shared::run`] left the child.
enum Ran {
    /// The job ended (or was never started: cancelled while it waited for its slot); the
    /// child is ready for the next.
    Kept,
    /// The child is gone: it died, or was killed for the job's hard limit or terminate.
    Gone,
    /// The child died before it could take the job, which did not start: give it to another.
    NotSent(WorkItem),
}

impl ProcessPool {
    /// Starts `options.size` children and waits until each has imported the task modules;
    /// the first that fails stops the start with its error. The children are started and
    /// driven by the pool's own thread, which lives until the pool is closed.
    pub async fn start(
        options: ProcessOptions,
        python: Option<PathBuf>,
        apps: Vec<String>,
        django: Option<String>,
        sys_path: Vec<PathBuf>,
        threads: &Arc<ThreadCount>,
    ) -> Result<ProcessPool, PythonError> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            options,
            python,
            apps,
            django,
            sys_path,
            jobs: tokio::sync::Mutex::new(receiver),
            running: Mutex::default(),
            closed: AtomicBool::new(false),
            crashes_in_a_row: AtomicU32::new(0),
            reports: Mutex::default(),
            replaced: AtomicU64::new(0),
        });
        let (ready, started) = tokio::sync::oneshot::channel();
        let alive = ThreadCount::enter(threads);
        let pool = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("dbtask-pool".into())
            .spawn(move || pool_thread(pool, ready, alive))
            .map_err(|e| PythonError::Init(format!("cannot start the pool's thread: {e}")))?;
        match started.await {
            Ok(Ok(())) => Ok(ProcessPool {
                shared,
                sender: Mutex::new(Some(sender)),
            }),
            Ok(Err(why)) => Err(PythonError::Init(format!(
                "a pool process could not start: {why}"
            ))),
            Err(_) => Err(PythonError::Init("the pool's thread ended at start".into())),
        }
    }

    /// Queues a job for the next free child; gives it back once the pool is closed.
    pub fn submit(&self, item: WorkItem) -> Result<(), WorkItem> {
        let sender = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        match sender.as_ref() {
            Some(sender) => sender.send(item).map_err(|e| e.0),
            None => Err(item),
        }
    }

    /// Interrupts the job `task_id` if a child runs it: a soft limit raises
    /// `SoftTimeLimitExceeded` in it, a hard limit or a terminate kills its child (the
    /// caller has given up on it; a new child takes its place).
    pub fn interrupt(&self, task_id: &str, kind: Interrupt) {
        let control = match kind {
            Interrupt::Soft => Control::Soft,
            hard => Control::Kill(hard),
        };
        let running = self
            .shared
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(driver) = running.get(task_id) {
            let _ = driver.send(control);
        }
    }

    /// Children started in place of others so far (recycled, killed or dead).
    pub fn replaced(&self) -> u64 {
        self.shared.replaced.load(Ordering::Relaxed)
    }

    /// Refuses new jobs: each child finishes its job, then exits.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.sender.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// The pool's own thread, with a tokio runtime of its own: it starts the children and runs
/// their drivers until the pool closes. The children's sockets get its whole attention (the
/// worker's tokio thread, busy with NATS and Redis, would poll them late), and the children
/// die with it (`PR_SET_PDEATHSIG` follows the thread that started them), that is, with the
/// worker.
fn pool_thread(
    shared: Arc<Shared>,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
    _alive: Alive,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot build the pool's runtime: {e}")));
            return;
        }
    };
    runtime.block_on(async move {
        let began = Instant::now();
        let started =
            futures::future::join_all((0..shared.options.size).map(|_| shared.spawn_child())).await;
        let mut children = Vec::with_capacity(started.len());
        for child in started {
            match child {
                Ok(child) => children.push(child),
                Err(why) => {
                    let _ = ready.send(Err(why));
                    return;
                }
            }
        }
        info!(
            processes = children.len(),
            start_ms = began.elapsed().as_millis() as u64,
            "pool processes ready"
        );
        let drivers: Vec<_> = children
            .into_iter()
            .map(|child| tokio::spawn(drive(Arc::clone(&shared), child)))
            .collect();
        let _ = ready.send(Ok(()));
        futures::future::join_all(drivers).await;
    });
}

/// One child's life: run jobs until the pool closes, replacing the child when it dies, is
/// killed, or reaches a recycling limit.
async fn drive(shared: Arc<Shared>, first: Child) {
    let mut child = Some(first);
    let mut frame = Vec::new();
    loop {
        let mut current = match child.take() {
            Some(current) => current,
            None => match shared.respawn().await {
                Some(fresh) => fresh,
                None => return, // the pool closed meanwhile
            },
        };
        let item = tokio::select! {
            item = async { shared.jobs.lock().await.recv().await } => item,
            // An idle child says nothing: readable means it died (or is broken). Found now, it
            // costs no task a delivery.
            _ = tokio::io::AsyncBufReadExt::fill_buf(&mut current.reader) => {
                shared.lost_idle(current).await;
                continue;
            }
        };
        let Some(mut item) = item else {
            stop(current).await;
            return;
        };
        if !take_slot(&item).await {
            child = Some(current);
            continue;
        }
        loop {
            match shared.run(&mut current, item, &mut frame).await {
                Ran::Kept => {
                    current.tasks += 1;
                    if let Some(why) = shared.worn_out(&current) {
                        debug!(
                            pid = current.pid,
                            tasks = current.tasks,
                            "{why}: replacing the pool process"
                        );
                        shared.replaced.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(stop(current));
                    } else {
                        child = Some(current);
                    }
                }
                Ran::Gone => {
                    shared.replaced.fetch_add(1, Ordering::Relaxed);
                }
                Ran::NotSent(unsent) => {
                    // It died idle, just before the job reached it: the job goes to its
                    // replacement, uncharged.
                    shared.lost_idle(current).await;
                    match shared.respawn().await {
                        Some(fresh) => {
                            current = fresh;
                            item = unsent;
                            continue;
                        }
                        None => {
                            // The pool closed meanwhile: the job never ran.
                            if let Some(handover) = &unsent.handover {
                                handover.state.release();
                            }
                            return;
                        }
                    }
                }
            }
            break;
        }
    }
}

/// Whether `item` may start now. A job whose caller gave up on it (revoked, or its hard limit
/// passed) never starts; a job handed over before its slot was free takes its slot first and
/// counts as started (its time limits run) from then on.
async fn take_slot(item: &WorkItem) -> bool {
    if item.reply.is_closed() {
        return false;
    }
    let Some(handover) = &item.handover else {
        return true;
    };
    let Ok(permit) = handover.slots.clone().acquire_owned().await else {
        return false; // closed: never happens, but then nothing may run
    };
    if !handover.state.start(permit) {
        return false; // cancelled while it waited (revoked, or the worker is stopping)
    }
    if item.reply.is_closed() {
        handover.state.release();
        return false;
    }
    true
}

/// Sends a job's outcome, its slot free first.
fn finish(item: WorkItem, outcome: CallOutcome) {
    let WorkItem {
        job,
        reply,
        handover,
        ..
    } = item;
    if let Some(handover) = &handover {
        handover.state.release();
    }
    job.reply(reply, outcome);
}

impl Shared {
    /// Runs one job in `child` and sends its outcome.
    async fn run(&self, child: &mut Child, item: WorkItem, frame: &mut Vec<u8>) -> Ran {
        let mut out = Vec::new();
        let request = ToChild::Job(JobFrame {
            id: Cow::Borrowed(&item.job.task_id),
            task: Cow::Borrowed(&*item.job.task),
            args: &item.job.args,
            kwargs: &item.job.kwargs,
            attempt: item.job.attempt,
            retries: item.job.retries,
            queue: Cow::Borrowed(&item.job.request.queue),
            eta: item.job.request.eta,
            parent_id: item.job.request.parent_id.as_deref().map(Cow::Borrowed),
            root_id: item.job.request.root_id.as_deref().map(Cow::Borrowed),
            traceparent: item
                .job
                .request
                .trace
                .as_ref()
                .map(|t| Cow::Borrowed(t.parent.as_str())),
            tracestate: item
                .job
                .request
                .trace
                .as_ref()
                .and_then(|t| t.state.as_deref())
                .map(Cow::Borrowed),
        });
        if let Err(e) = wire::encode(&request, &mut out) {
            // Never happens (the job is JSON already); the job fails rather than vanish.
            let message = format!("cannot pass the job to a pool process: {e}");
            finish(
                item,
                CallOutcome::Failure(TaskError::new(super::INTERNAL_ERROR, message)),
            );
            return Ran::Kept;
        }
        if child.writer.write_all(&out).await.is_err() {
            return Ran::NotSent(item);
        }
        let task_id = item.job.task_id.clone();
        let (controls, mut control) = mpsc::unbounded_channel();
        self.lock_running().insert(task_id.clone(), controls);
        let mut killed = None;
        let read = loop {
            let read = {
                let read = wire::read(&mut child.reader, frame);
                tokio::pin!(read);
                loop {
                    tokio::select! {
                        read = &mut read => break read,
                        Some(order) = control.recv() => match order {
                            Control::Soft => {
                                if wire::encode(&ToChild::Soft(Cow::Borrowed(&task_id)), &mut out).is_ok() {
                                    let _ = child.control.write_all(&out).await;
                                }
                            }
                            Control::Kill(why) => {
                                killed = Some(why);
                                let _ = child.process.start_kill();
                            }
                        },
                    }
                }
            };
            // A state the task stored (`update_state`): stored, then its outcome is awaited.
            if matches!(read, Ok(true)) && FromChild::is_state(frame) {
                if let Ok(FromChild::State(update)) = serde_json::from_slice::<FromChild>(frame) {
                    if let Err(why) = crate::python::state::store(&update) {
                        warn!(task_id = %update.id, why = %why, "a task's state (update_state) was not stored");
                    }
                }
                continue;
            }
            break read;
        };
        self.lock_running().remove(&task_id);
        match read.map(|more| more.then(|| serde_json::from_slice::<FromChild>(frame))) {
            Ok(Some(Ok(FromChild::Done { outcome, .. }))) => {
                self.crashes_in_a_row.store(0, Ordering::Relaxed);
                finish(item, CallOutcome::from(outcome));
                return Ran::Kept;
            }
            Ok(Some(_)) => {
                error!(pid = child.pid, "a pool process answered nonsense: replacing it (is the worker binary being upgraded under it?)");
                let _ = child.process.start_kill();
                killed = Some(Interrupt::Terminate);
            }
            Ok(None) | Err(_) => {}
        }
        // The child is gone, or going: reap it.
        let status = child.process.wait().await;
        let how = status.map_or_else(|e| format!("cannot be waited for ({e})"), describe_exit);
        match killed {
            Some(why) => {
                debug!(pid = child.pid, task_id, reason = ?why, "pool process killed: starting another");
                // Its caller gave up on it and recorded why; only the slot is left to free.
                if let Some(handover) = &item.handover {
                    handover.state.release();
                }
            }
            None => {
                let message = format!(
                    "the pool process (pid {}) running the task died: {how}; the task did not finish",
                    child.pid
                );
                self.report_crash(&item.job.task, &task_id, &message);
                let error = TaskError::new(error_types::WORKER_LOST, message);
                let outcome = if item.entry.retry_on_lost {
                    CallOutcome::Retry(crate::retry::Request {
                        countdown: None,
                        max_retries: None,
                        error,
                        explicit: false,
                    })
                } else {
                    CallOutcome::Failure(error)
                };
                finish(item, outcome);
            }
        }
        Ran::Gone
    }

    /// Reaps a child found dead while it had no job, and says so; the driver starts another.
    async fn lost_idle(&self, mut child: Child) {
        let how = child
            .process
            .wait()
            .await
            .map_or_else(|e| e.to_string(), describe_exit);
        warn!(
            pid = child.pid,
            "an idle pool process {how}: starting another"
        );
        let _ = child.process.start_kill();
        self.replaced.fetch_add(1, Ordering::Relaxed);
    }

    /// Why `child` is due for replacement after its last task, if it is.
    fn worn_out(&self, child: &Child) -> Option<&'static str> {
        let options = &self.options;
        if options.max_tasks > 0 && child.tasks >= options.max_tasks {
            return Some("--max-tasks-per-child reached");
        }
        if options.max_memory > 0
            && resident_bytes(child.pid).is_some_and(|rss| rss > options.max_memory)
        {
            info!(
                pid = child.pid,
                max_memory_mib = options.max_memory >> 20,
                "pool process over --max-memory-per-child after its task: replacing it"
            );
            return Some("--max-memory-per-child passed");
        }
        None
    }

    /// A child in place of one that is gone, once the delay its predecessors' crashes call
    /// for has passed; `None` once the pool is closed. Retries until one starts.
    async fn respawn(&self) -> Option<Child> {
        loop {
            let crashes = self.crashes_in_a_row.load(Ordering::Relaxed);
            if crashes > 1 {
                // 50 ms, 100 ms... up to 5 s between starts while children keep dying.
                let delay = Duration::from_millis(50u64 << (crashes - 2).min(7))
                    .min(Duration::from_secs(5));
                tokio::time::sleep(delay).await;
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            match self.spawn_child().await {
                Ok(child) => return Some(child),
                Err(why) => {
                    self.crashes_in_a_row.fetch_add(1, Ordering::Relaxed);
                    error!(error = %why, "cannot start a pool process: trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Logs a child's death at once if none was reported in the last [`CRASH_REPORT_EVERY`],
    /// else counts it for the next report: a task that kills its process over and over
    /// writes one line per interval, not one per death.
    fn report_crash(&self, task: &str, task_id: &str, message: &str) {
        self.crashes_in_a_row.fetch_add(1, Ordering::Relaxed);
        let mut reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if reports
            .last
            .is_some_and(|last| now.duration_since(last) < CRASH_REPORT_EVERY)
        {
            reports.unreported += 1;
            debug!(task, task_id, "{message}");
            return;
        }
        let earlier = std::mem::take(&mut reports.unreported);
        reports.last = Some(now);
        error!(
            task,
            task_id,
            unreported_earlier = earlier,
            "{message}: recorded as dbtask.WorkerLost, starting another pool process"
        );
    }

    fn lock_running(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::UnboundedSender<Control>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

//! The embedded CPython interpreter: start-up, the task registry, and running tasks.
//!
//! Sync `def` tasks run on a pool of Python threads, `async def` tasks on one asyncio loop on
//! its own thread: a task's [`Executor`]. Tokio threads never hold the GIL: `dispatch` sends
//! the job to a Python thread and awaits a oneshot reply.
//!
//! Layout: `interpreter` (PEP 587 start-up, `sys.path`, `lazy_ssl.py`), `registry` (the tasks
//! read from `dbtask._worker.TASKS`, with their cached function and signature), `retry` (a
//! task's retry options and a raised `Retry`, read into Rust values), `invoke` (arguments, the
//! call itself), `convert` (exceptions and return values into owned Rust values), `queue`
//! (the job queue between tokio and the Python threads), `handover` (sync jobs queued before
//! their slot is free), `pool` (sync threads), `running` (which thread runs which sync job,
//! for interrupts), `asyncio` and `epoll` (the event loop thread and its selector), and
//! `support.py` (the few helpers written in Python).
//!
//! The interpreter is never finalized: it lives until the process exits.

mod asyncio;
mod context;
mod convert;
mod epoll;
mod handover;
mod interpreter;
mod invoke;
mod logs;
pub mod otel;
mod periodic;
mod pool;
mod process;
mod queue;
mod registry;
mod retry;
mod running;
pub mod signals;
pub mod state;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dbtask_protocol::TaskError;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

pub use self::handover::{Handover, JobState};
pub use self::process::child::{main as pool_process_main, requested as is_pool_process};
pub use self::process::ProcessOptions;

use self::asyncio::AsyncLoop;
use self::pool::{Pool, ThreadCount};
use self::process::ProcessPool;
use self::registry::{Entry, Registry};
use self::running::Running;

/// How to start the interpreter.
#[derive(Debug, Clone)]
pub struct PythonConfig {
    /// The interpreter executable whose environment (venv) to use. `None`: `$VIRTUAL_ENV/bin/python`
    /// when set, else CPython's own search (`python3` on `PATH`, then the prefix libpython was
    /// built with).
    pub python: Option<PathBuf>,
    /// Modules to import (`-A`); their `@task` decorators fill the registry.
    pub apps: Vec<String>,
    /// A Django settings module (`--django`): Django is set up and every installed app's
    /// `tasks` module imported before `apps`.
    pub django: Option<String>,
    /// Size of the thread pool for sync tasks (the worker passes its concurrency).
    pub threads: usize,
    /// What runs sync tasks: [`Executor::Threads`], or [`Executor::Processes`] once
    /// [`PythonRuntime::start_processes`] has started them.
    pub sync_executor: Executor,
}

impl Default for PythonConfig {
    fn default() -> Self {
        PythonConfig {
            python: None,
            apps: Vec::new(),
            django: None,
            threads: 0,
            sync_executor: Executor::Threads,
        }
    }
}

/// What the worker knows of a registered task.
#[derive(Debug, Clone)]
pub struct TaskInfo {
    pub name: String,
    /// What runs its jobs (`async def` or not).
    pub executor: Executor,
    /// The task's default queue (informational: the worker consumes the queues it is told).
    pub queue: String,
    /// `track_started` from the task's options, if it set one.
    pub track_started: Option<bool>,
    /// `max_retries`, `retry_delay`, `retry_backoff`... from the task's options.
    pub retry: crate::retry::RetryPolicy,
    /// `time_limit` (hard) from the task's options, in seconds, if it set one.
    pub time_limit: Option<f64>,
    /// `soft_time_limit` from the task's options, in seconds, if it set one.
    pub soft_time_limit: Option<f64>,
    /// `rate_limit` from the task's options: starts allowed across the whole cluster.
    pub rate_limit: Option<dbtask_protocol::Rate>,
    /// `ignore_result`, `store_errors_even_if_ignored` and `result_ttl` from its options.
    pub results: crate::results::ResultOptions,
}

/// What runs a task's jobs. The runner hands every job to [`PythonRuntime::dispatch`] and
/// never looks inside: admission, settlement and acks are the same for every executor, and a
/// new one (a pool of processes) is a new variant here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executor {
    /// Sync `def` tasks: the pool of Python threads (`pool`).
    Threads,
    /// `async def` tasks: the asyncio loop on its own thread (`asyncio`).
    AsyncLoop,
    /// Sync `def` tasks with `--pool processes`: child processes, one task at a time each
    /// (`process`).
    Processes,
}

impl Executor {
    /// The executor of an `async def` task, else `sync` (the worker's pool for sync tasks).
    pub fn of(is_async: bool, sync: Executor) -> Executor {
        if is_async {
            Executor::AsyncLoop
        } else {
            sync
        }
    }

    /// Whether a job may be queued before its slot is free, the executor taking the slot
    /// when it starts the job (see [`Handover`]).
    pub fn takes_handover(self) -> bool {
        matches!(self, Executor::Threads | Executor::Processes)
    }
}

/// How to interrupt a running task (time limits, revocation with terminate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// Raise `dbtask.SoftTimeLimitExceeded` in it; the task may catch it and go on.
    Soft,
    /// Hard time limit: cancel an `async def` task; raise `dbtask.TimeLimitExceeded` in a
    /// sync one and abandon its thread (a new thread takes its place), or kill its process.
    Hard,
    /// Revoked with terminate: cancel an `async def` task; raise `dbtask.Terminated` in a
    /// sync one and abandon its thread, or kill its process.
    Terminate,
}

/// Whether a call is one of several queued together (see [`PythonRuntime::call_in`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Burst {
    /// No other job is likely to be queued now: wake a Python thread at once.
    Alone,
    /// Other tasks on the caller's thread are queueing jobs too: wake once for all.
    WithOthers,
}

/// One call of a task.
#[derive(Debug)]
pub struct Job {
    pub task_id: String,
    /// The task's name (a boxed `str`: a `Job` crosses queues by value, every byte counts).
    pub task: Box<str>,
    /// JSON array, as it came in the message (decoded once, in Python).
    pub args: Box<RawValue>,
    /// JSON object, as it came in the message.
    pub kwargs: Box<RawValue>,
    /// Delivery count of this message (1 on the first delivery).
    pub attempt: u32,
    /// Retries before this message.
    pub retries: u32,
    /// The rest of what `dbtask.current_task().request` tells (boxed: a `Job` crosses
    /// queues by value, and is read only when a task asks for its request).
    pub request: Box<RequestInfo>,
}

/// What a running task's request tells beyond its id, name and counts (see `context`).
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    /// The queue it was delivered from.
    pub queue: String,
    /// When it was to run (Unix seconds), if it was delayed.
    pub eta: Option<f64>,
    /// In a workflow: the task whose outcome published it, and the workflow's first task.
    pub parent_id: Option<String>,
    pub root_id: Option<String>,
    /// The message's W3C trace context, read only when OpenTelemetry is on ([`otel`]).
    pub trace: Option<dbtask_protocol::Trace>,
}

impl Job {
    /// Sends how this job ended to its caller, with its arguments back (the retry path reuses
    /// them). A caller that gave up waiting (its future dropped) gets nothing.
    fn reply(self, reply: oneshot::Sender<Returned>, outcome: CallOutcome) {
        let arguments = Some(Arguments {
            args: self.args,
            kwargs: self.kwargs,
        });
        let _ = reply.send(Returned { outcome, arguments });
    }
}

/// A job's arguments, handed back with its outcome: a retry publishes them again as they came,
/// without a copy or a second decoding of the message.
#[derive(Debug)]
pub struct Arguments {
    pub args: Box<RawValue>,
    pub kwargs: Box<RawValue>,
}

/// How a call ended, and the job's arguments (absent when the job never reached a thread).
#[derive(Debug)]
pub struct Returned {
    pub outcome: CallOutcome,
    pub arguments: Option<Arguments>,
}

impl Returned {
    fn without_arguments(outcome: CallOutcome) -> Returned {
        Returned {
            outcome,
            arguments: None,
        }
    }
}

/// How a call ended.
#[derive(Debug)]
pub enum CallOutcome {
    /// The task returned; the JSON of its return value.
    Success(Box<RawValue>),
    /// The task raised, its arguments did not fit its signature, its name is unknown, or its
    /// return value is not JSON-serializable. The error says which.
    Failure(TaskError),
    /// The task asked for a retry (`raise dbtask.Retry(...)`, `self.retry()`) or raised an
    /// exception of its `autoretry_for`: [`crate::retry::decide`] says whether it runs again.
    Retry(crate::retry::Request),
}

#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    #[error("cannot start the embedded Python interpreter: {0}")]
    Init(String),
    #[error("cannot import task module {module:?} (is it on sys.path, or is the venv active?):\n{traceback}")]
    Import { module: String, traceback: String },
    #[error("cannot set up Django with the settings {settings:?} (--django): is the project's folder the current directory (or on PYTHONPATH) and Django installed in the worker's venv?\n{traceback}")]
    Django { settings: String, traceback: String },
    #[error("cannot read the dbtask task registry: {0} (is the dbtask package installed in this interpreter's environment?)")]
    Registry(String),
}

/// Error type recorded when the runtime could not run a job at all: `call` after `shutdown`,
/// or a Rust panic while handling the job (a bug, or a pyo3 extension panicking in the task).
pub const INTERNAL_ERROR: &str = "dbtask.InternalError";

/// The one module of the `dbtask` package the worker imports: its docstring is the contract
/// (`TASKS`, `Retry`, `bound`, and the time-limit exceptions).
pub(crate) const CONTRACT_MODULE: &str = "dbtask._worker";

/// Handle to the running interpreter and its threads. Cheap to clone.
#[derive(Clone)]
pub struct PythonRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    version: String,
    pool: Pool,
    aio: AsyncLoop,
    threads: Arc<ThreadCount>,
    running: Arc<Running>,
    finished: Arc<AtomicU64>,
    /// The pool of processes, once started.
    processes: OnceLock<ProcessPool>,
    /// What a pool process needs to start like this one.
    python: Option<PathBuf>,
    apps: Vec<String>,
    django: Option<String>,
    sys_path: Vec<PathBuf>,
}

/// How many calls of a [`PythonRuntime`] ran to their outcome so far.
#[derive(Clone)]
pub struct FinishedCalls(Arc<AtomicU64>);

impl FinishedCalls {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// How [`PythonRuntime::dispatch`] hands a job over.
pub struct Dispatch {
    pub burst: Burst,
    /// A sync job queued before its slot is free.
    pub handover: Option<Handover>,
}

/// One job handed to a Python thread, with where its outcome goes.
struct WorkItem {
    job: Job,
    entry: Arc<Entry>,
    reply: oneshot::Sender<Returned>,
    /// A sync job handed over before its slot was free (see [`Handover`]).
    handover: Option<Handover>,
}

/// Serializes `start` calls: the interpreter is process-wide.
static START: Mutex<()> = Mutex::new(());

impl PythonRuntime {
    /// Initializes CPython (PEP 587 config: the venv's executable, no signal handlers), puts
    /// the current directory on `sys.path`, imports asyncio (with `ssl` deferred to its first
    /// use), then `dbtask` and the apps, reads the registry,
    /// and starts the sync thread pool and the asyncio thread. Call it on the main thread
    /// before the tokio runtime exists. Returns with the GIL released.
    ///
    /// CPython can be initialized once per process: a second `start` (tests) reuses the
    /// interpreter (its `cfg.python` is then ignored), imports its apps and starts new threads.
    pub fn start(cfg: &PythonConfig) -> Result<Self, PythonError> {
        Self::start_with_sys_path(cfg, &[])
    }

    /// [`start`](Self::start), with `extra_sys_path` inserted at the front of `sys.path`
    /// (right after the current directory), e.g. a source tree of `dbtask` in tests.
    pub fn start_with_sys_path(
        cfg: &PythonConfig,
        extra_sys_path: &[PathBuf],
    ) -> Result<Self, PythonError> {
        let _serial = START.lock().unwrap_or_else(|e| e.into_inner());
        interpreter::initialize(cfg.python.as_deref())?;
        let version = interpreter::prepare(extra_sys_path)?;
        if interpreter::defer_ssl() {
            tracing::debug!("asyncio imported; ssl loads on first use");
        }
        let registry = Registry::load(
            &cfg.apps,
            cfg.django.as_deref(),
            cfg.sync_executor,
            registry::Process::Worker,
        )?;
        let threads = Arc::new(ThreadCount::default());
        let running = Arc::new(Running::default());
        let pool = Pool::start(cfg.threads.max(1), &threads, &running)?;
        let aio = AsyncLoop::start(&threads)?;
        Ok(PythonRuntime {
            inner: Arc::new(Inner {
                registry,
                version,
                pool,
                aio,
                threads,
                running,
                finished: Arc::default(),
                processes: OnceLock::new(),
                python: cfg.python.clone(),
                apps: cfg.apps.clone(),
                django: cfg.django.clone(),
                sys_path: extra_sys_path.to_vec(),
            }),
        })
    }

    /// Starts the pool of processes that runs sync tasks when the runtime was started with
    /// [`Executor::Processes`], and waits until each child has imported the task modules.
    /// Call it once.
    pub async fn start_processes(&self, options: ProcessOptions) -> Result<(), PythonError> {
        let pool = ProcessPool::start(
            options,
            self.inner.python.clone(),
            self.inner.apps.clone(),
            self.inner.django.clone(),
            self.inner.sys_path.clone(),
            &self.inner.threads,
        )
        .await?;
        if self.inner.processes.set(pool).is_err() {
            return Err(PythonError::Init(
                "the pool of processes was started twice".into(),
            ));
        }
        Ok(())
    }

    /// Pool processes started in place of others so far (recycled, killed or dead).
    pub fn processes_replaced(&self) -> u64 {
        self.inner.processes.get().map_or(0, ProcessPool::replaced)
    }

    /// Python threads abandoned so far to a task past its hard time limit or terminated
    /// (each replaced by a new thread).
    pub fn threads_abandoned(&self) -> u64 {
        self.inner.pool.retired()
    }

    /// Abandoned Python threads still alive, stuck in their task.
    pub fn threads_stuck(&self) -> usize {
        self.inner.pool.stuck()
    }

    /// Calls `beat` on the asyncio loop's thread every `every`, from the loop itself (a timer
    /// callback): while a task blocks the loop, the beats stop. Call it with no tokio runtime
    /// on this thread (it takes the GIL), once.
    pub fn beat_on_asyncio_loop(
        &self,
        every: Duration,
        beat: impl Fn() + Send + Sync + 'static,
    ) -> Result<(), PythonError> {
        pyo3::Python::attach(|py| self.inner.aio.heartbeat(py, every, beat))
    }

    /// The registered tasks, by name.
    pub fn tasks(&self) -> &HashMap<String, TaskInfo> {
        self.inner.registry.infos()
    }

    /// The periodic schedules the task modules declared: (name, declaration JSON), by name.
    pub fn periodic(&self) -> &[(String, String)] {
        self.inner.registry.periodic()
    }

    /// `sys.version` of the embedded interpreter, for the start-up log.
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// Runs one task to its outcome. Never panics on user input: an unknown name gives
    /// `Failure` with type `dbtask.UnknownTask`.
    ///
    /// After [`shutdown`](Self::shutdown) the job is not run and the outcome is a `Failure`
    /// of type [`INTERNAL_ERROR`]: callers should stop calling before they shut down.
    pub async fn call(&self, job: Job) -> CallOutcome {
        self.call_in(job, Burst::Alone).await
    }

    /// [`call`](Self::call) for a caller on a thread that may be queueing other jobs at the
    /// same moment: with [`Burst::WithOthers`], a sleeping Python thread is woken only once
    /// the other tasks ready on the caller's thread have queued theirs, one wake-up for the
    /// whole burst. [`Burst::Alone`] wakes it at once (a lone task's latency).
    pub async fn call_in(&self, job: Job, burst: Burst) -> CallOutcome {
        self.dispatch(
            job,
            Dispatch {
                burst,
                handover: None,
            },
        )
        .await
        .outcome
    }

    /// [`call_in`](Self::call_in), handing the job's arguments back with its outcome; with a
    /// [`Handover`], a job of an executor that [takes it](Executor::takes_handover) is queued
    /// before its slot is free: the Python thread that takes it takes the slot, and starts it
    /// only if the caller has not cancelled it meanwhile (the outcome is then never sent).
    /// Other jobs must be dispatched with their slot already held, without a handover.
    pub async fn dispatch(&self, job: Job, how: Dispatch) -> Returned {
        let Dispatch { burst, handover } = how;
        let Some(entry) = self.inner.registry.get(&job.task) else {
            return Returned::without_arguments(CallOutcome::Failure(
                self.inner.registry.unknown_task(&job.task),
            ));
        };
        debug_assert!(
            handover.is_none() || entry.executor.takes_handover(),
            "only the thread pool takes a job's slot itself"
        );
        let (reply, returned) = oneshot::channel();
        let item = WorkItem {
            job,
            entry: Arc::clone(entry),
            reply,
            handover,
        };
        let accepted = match entry.executor {
            Executor::AsyncLoop => self.inner.aio.submit(item).is_ok(),
            Executor::Processes => self
                .inner
                .processes
                .get()
                .is_some_and(|pool| pool.submit(item).is_ok()),
            Executor::Threads => match self.inner.pool.submit(item) {
                Ok(wake) => {
                    if wake.owed() && burst == Burst::WithOthers {
                        // The other tasks ready on this thread queue their jobs first; the
                        // wake-up (on drop) then starts a thread for all of them at once.
                        tokio::task::yield_now().await;
                    }
                    true
                }
                Err(_) => false,
            },
        };
        if !accepted {
            return Returned::without_arguments(internal_failure(
                "the worker's Python runtime is shut down: the task did not run",
            ));
        }
        let returned = match returned.await {
            Ok(returned) => returned,
            Err(_) => Returned::without_arguments(internal_failure(
                "the Python thread running the task stopped without an outcome",
            )),
        };
        self.inner.finished.fetch_add(1, Ordering::Relaxed);
        returned
    }

    /// Sync jobs queued for a Python thread and not taken yet.
    pub fn queued_sync(&self) -> usize {
        self.inner.pool.queued()
    }

    /// A counter of the calls that ran to their outcome, for telling a busy worker from an
    /// idle one ([`crate::memory`]); it does not keep the runtime alive.
    pub fn finished_calls(&self) -> FinishedCalls {
        FinishedCalls(Arc::clone(&self.inner.finished))
    }

    /// Interrupts the running task `task_id` (of registered task `task`), if it is running
    /// here; see [`Interrupt`]. Returns at once: the work needs the GIL, so it is done on a
    /// blocking thread, never on the caller's tokio thread. The caller that gives up on a task
    /// (hard limit, terminate) drops its `call` future: the task's eventual outcome is discarded.
    pub fn interrupt(&self, task: &str, task_id: &str, kind: Interrupt) {
        let Some(entry) = self.inner.registry.get(task).cloned() else {
            return;
        };
        if entry.executor == Executor::Processes {
            // No GIL needed: a message to the child's driver.
            if let Some(pool) = self.inner.processes.get() {
                pool.interrupt(task_id, kind);
            }
            return;
        }
        let inner = Arc::clone(&self.inner);
        let task_id = task_id.to_owned();
        let work = move || {
            pyo3::Python::attach(|py| inner.interrupt(py, &entry, &task_id, kind));
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            drop(tokio::task::spawn_blocking(work));
        } else {
            work();
        }
    }

    /// Stops the thread pool and the asyncio loop once the jobs already handed over are done.
    ///
    /// Returns at once: new calls are refused from now on, jobs already handed over still run
    /// to their end, then the threads exit. A task that never ends keeps its thread (and, for
    /// `async def`, the loop) alive; nothing is cancelled, the process exit ends them. Use
    /// [`wait_stopped`](Self::wait_stopped) to wait for the threads with a limit.
    pub fn shutdown(&self) {
        self.inner.close();
    }

    /// Blocks until every thread of this runtime has exited, at most `timeout`; true if they
    /// all did. Meant to follow [`shutdown`](Self::shutdown); blocking, so not on a tokio thread.
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        self.inner.threads.wait_zero(timeout)
    }
}

impl Inner {
    fn close(&self) {
        self.pool.close();
        self.aio.close();
        if let Some(processes) = self.processes.get() {
            processes.close();
        }
    }

    fn interrupt(&self, py: pyo3::Python<'_>, entry: &Entry, task_id: &str, kind: Interrupt) {
        use pyo3::types::PyAnyMethods;
        let (class, aio_kind, message) = match kind {
            Interrupt::Soft => (
                "SoftTimeLimitExceeded",
                "soft",
                "the task ran past its soft time limit",
            ),
            Interrupt::Hard => (
                "TimeLimitExceeded",
                "hard",
                "the task ran past its hard time limit",
            ),
            Interrupt::Terminate => (
                "Terminated",
                "terminate",
                "the task was revoked with terminate=True",
            ),
        };
        if entry.executor == Executor::AsyncLoop {
            self.aio.interrupt(py, task_id, aio_kind, message);
            return;
        }
        let exc = match py.import(CONTRACT_MODULE).and_then(|m| m.getattr(class)) {
            Ok(exc) => exc,
            Err(e) => {
                let error = convert::error_from(py, e);
                tracing::error!(task_id, error = %error.message, "cannot interrupt a task: dbtask._worker lacks the exception (is the dbtask package up to date?)");
                return;
            }
        };
        let abandon = kind != Interrupt::Soft;
        if self
            .running
            .raise(py, task_id, &exc, abandon, || self.pool.reserve_retired())
        {
            self.pool.replace_retired();
        }
    }
}

impl Drop for Inner {
    /// The last handle is gone: nobody can hand over jobs any more, let the threads end.
    fn drop(&mut self) {
        self.close();
    }
}

fn internal_failure(message: &str) -> CallOutcome {
    CallOutcome::Failure(TaskError::new(INTERNAL_ERROR, message))
}

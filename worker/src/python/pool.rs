//! The pool of Python threads that run sync (`def`) tasks.
//!
//! Each thread attaches to the interpreter once, for its whole life, and detaches (releases
//! the GIL) only while it waits for work: when jobs are queued it runs them one after the
//! other without giving the GIL back in between. A job is taken from the queue only when a
//! thread is about to run it, so a slow task never holds back jobs another thread could run.
//!
//! A thread whose job is abandoned (hard time limit, or revoked with terminate) is retired: a
//! new thread takes its place at once, and the old one exits when its job finally returns,
//! its outcome discarded. At most `size` retired threads may be alive at once; beyond that a
//! thread is not retired nor replaced (logged): it serves again once its job returns, so stuck
//! threads never grow the process without bound and capacity comes back when they return.

use std::os::raw::c_ulong;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use super::convert::{encode_result, panic_outcome};
use super::invoke::invoke;
use super::queue::JobQueue;
use super::running::Running;
use super::{PythonError, WorkItem};

pub(crate) struct Pool {
    queue: Arc<JobQueue<WorkItem>>,
    running: Arc<Running>,
    threads: Arc<ThreadCount>,
    size: usize,
    /// Retired threads still alive (stuck in an abandoned job).
    retired_alive: Arc<AtomicUsize>,
    /// Threads retired so far (each replaced by a new one).
    retired_total: AtomicU64,
    next_index: AtomicUsize,
}

/// What one pool thread needs.
struct ThreadCtx {
    queue: Arc<JobQueue<WorkItem>>,
    running: Arc<Running>,
    retired: Arc<AtomicBool>,
    retired_alive: Arc<AtomicUsize>,
}

impl Pool {
    pub fn start(
        size: usize,
        threads: &Arc<ThreadCount>,
        running: &Arc<Running>,
    ) -> Result<Pool, PythonError> {
        let pool = Pool {
            queue: Arc::new(JobQueue::default()),
            running: Arc::clone(running),
            threads: Arc::clone(threads),
            size,
            retired_alive: Arc::new(AtomicUsize::new(0)),
            retired_total: AtomicU64::new(0),
            next_index: AtomicUsize::new(0),
        };
        for _ in 0..size {
            if let Err(e) = pool.spawn_thread() {
                pool.queue.close();
                return Err(PythonError::Init(format!(
                    "cannot start a Python thread: {e}"
                )));
            }
        }
        Ok(pool)
    }

    fn spawn_thread(&self) -> std::io::Result<()> {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        let ctx = ThreadCtx {
            queue: Arc::clone(&self.queue),
            running: Arc::clone(&self.running),
            retired: Arc::new(AtomicBool::new(false)),
            retired_alive: Arc::clone(&self.retired_alive),
        };
        let alive = ThreadCount::enter(&self.threads);
        std::thread::Builder::new()
            .name(format!("dbtask-py-{index}"))
            .spawn(move || {
                let _alive = alive;
                Python::attach(|py| serve(py, &ctx));
                if ctx.retired.load(Ordering::Acquire) {
                    ctx.retired_alive.fetch_sub(1, Ordering::AcqRel);
                }
            })
            .map(|_| ())
    }

    /// Counts one more retired thread if fewer than `size` are alive; false (logged) when the
    /// limit is reached: the thread is then not retired and serves again once its job returns.
    pub fn reserve_retired(&self) -> bool {
        let size = self.size;
        let reserved = self
            .retired_alive
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < size).then_some(n + 1)
            })
            .is_ok();
        if reserved {
            self.retired_total.fetch_add(1, Ordering::Relaxed);
        } else {
            tracing::error!(
                stuck_threads = size,
                "too many Python threads are stuck in abandoned tasks: not replacing this one, the worker runs fewer sync tasks at once until they return (restart it to recover)"
            );
        }
        reserved
    }

    /// Starts a thread in place of one just retired.
    pub fn replace_retired(&self) {
        if let Err(e) = self.spawn_thread() {
            tracing::error!(error = %e, "cannot start a Python thread to replace an abandoned one");
        }
    }

    /// Hands a job to the pool; gives it back once the pool is closed. A thread to run it is
    /// woken when the returned [`SpareWake`] is dropped: a caller on the tokio thread holds
    /// it until the other tasks ready now have queued their jobs too, so that a burst of jobs
    /// costs one wake-up (a futex call and a context switch) instead of one per job.
    pub fn submit(&self, item: WorkItem) -> Result<SpareWake<'_>, WorkItem> {
        let owed = self.queue.push_owing(item)?;
        Ok(SpareWake {
            queue: owed.then_some(&*self.queue),
        })
    }

    /// Threads retired so far, abandoned to a job past its hard time limit or terminated.
    pub fn retired(&self) -> u64 {
        self.retired_total.load(Ordering::Relaxed)
    }

    /// Retired threads still alive: stuck in their abandoned job.
    pub fn stuck(&self) -> usize {
        self.retired_alive.load(Ordering::Acquire)
    }

    /// Jobs queued and not taken by a thread yet.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Refuses new jobs; the threads exit once the queued ones are done.
    pub fn close(&self) {
        self.queue.close();
    }
}

/// A wake-up owed to the pool's threads, done when dropped (see [`Pool::submit`]).
pub(crate) struct SpareWake<'a> {
    queue: Option<&'a JobQueue<WorkItem>>,
}

impl SpareWake<'_> {
    /// Whether a thread is still to be woken.
    pub fn owed(&self) -> bool {
        self.queue.is_some()
    }
}

impl Drop for SpareWake<'_> {
    fn drop(&mut self) {
        if let Some(queue) = self.queue {
            queue.wake_spare();
        }
    }
}

fn serve(py: Python<'_>, ctx: &ThreadCtx) {
    // SAFETY: a plain query of the calling thread's id.
    let ident = unsafe { pyo3::ffi::PyThread_get_thread_ident() };
    let retired = || ctx.retired.load(Ordering::Acquire);
    // Jobs are taken with the GIL held (see the queue's module doc): a thread woken for a job
    // first waits for the GIL, then takes whatever is still queued.
    while py.detach(|| ctx.queue.wait_for_work()) {
        let mut next = ctx.queue.take(true);
        while let Some(item) = next {
            run(py, item, ctx, ident);
            if retired() {
                return;
            }
            next = ctx.queue.take(false);
        }
    }
}

/// Runs a sync task to its outcome and sends it.
fn run(py: Python<'_>, item: WorkItem, ctx: &ThreadCtx, ident: c_ulong) {
    let WorkItem {
        job,
        entry,
        reply,
        handover,
    } = item;
    if reply.is_closed() {
        // The caller gave up before the job started (revoked with terminate while queued
        // here): it must not run.
        return;
    }
    if let Some(handover) = &handover {
        // Its slot first: free unless `async def` tasks hold them all (they share the
        // worker's concurrency), else wait for one without the GIL.
        let permit = match handover.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let slots = handover.slots.clone();
                match py.detach(|| futures::executor::block_on(slots.acquire_owned())) {
                    Ok(permit) => permit,
                    Err(_) => return, // closed: never happens, but then nothing may run
                }
            }
        };
        if !handover.state.start(permit) {
            return; // cancelled while queued (revoked, or the worker is stopping)
        }
        if reply.is_closed() {
            handover.state.release(); // given up while this thread waited for the slot
            return;
        }
    }
    ctx.running.enter(&job.task_id, ident, &ctx.retired);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        super::context::with_job(&job, &entry, || {
            let called = invoke(py, &entry, &job, None);
            ctx.running.leave(py, &job.task_id, ident);
            match called {
                Ok(value) => encode_result(py, &entry.name, &value),
                Err(outcome) => outcome,
            }
        })
    }))
    .unwrap_or_else(panic_outcome);
    // The slot is free before the outcome is sent: the next queued job can take it at once.
    if let Some(handover) = &handover {
        handover.state.release();
    }
    job.reply(reply, outcome);
}

/// Counts the live threads of a runtime, so that its owner can wait for them to exit.
#[derive(Default)]
pub(crate) struct ThreadCount {
    live: Mutex<usize>,
    changed: Condvar,
}

/// Held by a live thread; dropping it (the thread ends, even by a panic) counts it out.
pub(crate) struct Alive(Arc<ThreadCount>);

impl ThreadCount {
    pub fn enter(this: &Arc<ThreadCount>) -> Alive {
        *this.live.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Alive(Arc::clone(this))
    }

    /// Waits until no thread is alive, at most `timeout`; true if none is.
    pub fn wait_zero(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        while *live > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            live = self
                .changed
                .wait_timeout(live, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        *self.0.live.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.0.changed.notify_all();
    }
}

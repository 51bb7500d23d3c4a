//! The pool of Python threads that run sync (`def`) tasks.
//!
//! Each thread attaches to the interpreter once, for its whole life, and detaches (releases
//! the GIL) only while it waits for work: when jobs are queued it runs them one after the
//! other without giving the GIL back in between. A job is taken from the queue only when a
//! thread is about to run it, so a slow task never holds back jobs another thread could run.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use super::convert::{encode_result, panic_outcome};
use super::invoke::invoke;
use super::queue::JobQueue;
use super::{PythonError, WorkItem};

pub(crate) struct Pool {
    queue: Arc<JobQueue<WorkItem>>,
}

impl Pool {
    pub fn start(size: usize, threads: &Arc<ThreadCount>) -> Result<Pool, PythonError> {
        let queue = Arc::new(JobQueue::default());
        for index in 0..size {
            let thread_queue = Arc::clone(&queue);
            let alive = ThreadCount::enter(threads);
            let spawned = std::thread::Builder::new()
                .name(format!("dbtask-py-{index}"))
                .spawn(move || {
                    let _alive = alive;
                    Python::attach(|py| serve(py, &thread_queue));
                });
            if let Err(e) = spawned {
                queue.close();
                return Err(PythonError::Init(format!(
                    "cannot start a Python thread: {e}"
                )));
            }
        }
        Ok(Pool { queue })
    }

    /// Hands a job to the pool; gives it back once the pool is closed.
    pub fn submit(&self, item: WorkItem) -> Result<(), WorkItem> {
        self.queue.push(item)
    }

    /// Refuses new jobs; the threads exit once the queued ones are done.
    pub fn close(&self) {
        self.queue.close();
    }
}

fn serve(py: Python<'_>, queue: &JobQueue<WorkItem>) {
    // Jobs are taken with the GIL held (see the queue's module doc): a thread woken for a job
    // first waits for the GIL, then takes whatever is still queued.
    while py.detach(|| queue.wait_for_work()) {
        let mut next = queue.take(true);
        while let Some(item) = next {
            run(py, item);
            next = queue.take(false);
        }
    }
}

/// Runs a sync task to its outcome and sends it.
fn run(py: Python<'_>, item: WorkItem) {
    let WorkItem { job, entry, reply } = item;
    let outcome = catch_unwind(AssertUnwindSafe(|| match invoke(py, &entry, &job) {
        Ok(value) => encode_result(py, &entry.name, &value),
        Err(outcome) => outcome,
    }))
    .unwrap_or_else(panic_outcome);
    // The caller may have given up waiting (its future dropped): nothing to do then.
    let _ = reply.send(outcome);
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

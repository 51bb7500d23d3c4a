//! Sync jobs running right now, by task id, so that a time limit or a revocation can raise an
//! exception in the thread that runs one (`PyThreadState_SetAsyncExc`). Async jobs are found
//! by support.py's `interrupt` on the loop thread instead.
//!
//! The exception is delivered at the thread's next bytecode boundary: a thread blocked in C
//! code (a long `time.sleep`, a socket read, a C extension's loop) gets it only when that
//! call returns to Python.

use std::collections::HashMap;
use std::os::raw::{c_long, c_ulong};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::prelude::*;

/// The thread running a sync job.
struct SyncJob {
    /// `threading.get_ident()` of the thread.
    ident: c_ulong,
    /// Set when the job is abandoned: the thread exits once the job returns.
    retired: Arc<AtomicBool>,
}

#[derive(Default)]
pub(crate) struct Running {
    sync: Mutex<HashMap<String, SyncJob>>,
}

impl Running {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, SyncJob>> {
        self.sync.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The thread `ident` starts the job `task_id`.
    pub fn enter(&self, task_id: &str, ident: c_ulong, retired: &Arc<AtomicBool>) {
        self.lock().insert(
            task_id.to_owned(),
            SyncJob {
                ident,
                retired: Arc::clone(retired),
            },
        );
    }

    /// The thread `ident` is done with `task_id`: forget it, and drop an exception raised
    /// for the job but not delivered yet, so that it never reaches the thread's next job.
    /// Called with the GIL held, on that thread.
    pub fn leave(&self, _py: Python<'_>, task_id: &str, ident: c_ulong) {
        let mut jobs = self.lock();
        if jobs.get(task_id).is_some_and(|j| j.ident == ident) {
            jobs.remove(task_id);
        }
        // Under the lock: nobody can raise for this thread in between.
        // SAFETY: the GIL is held; a NULL exception clears the thread's pending one.
        unsafe {
            pyo3::ffi::PyThreadState_SetAsyncExc(ident as c_long, std::ptr::null_mut());
        }
    }

    /// Raises `exc` (an exception class) in the thread running `task_id`, if one is. With
    /// `abandon`, the thread is also retired if `may_retire` agrees; true when it was retired
    /// by this call.
    pub fn raise(
        &self,
        _py: Python<'_>,
        task_id: &str,
        exc: &Bound<'_, PyAny>,
        abandon: bool,
        may_retire: impl FnOnce() -> bool,
    ) -> bool {
        let jobs = self.lock();
        let Some(job) = jobs.get(task_id) else {
            return false;
        };
        // SAFETY: the GIL is held and `exc` is a live exception class; the thread is still
        // running this job (it leaves only under the lock we hold).
        unsafe {
            pyo3::ffi::PyThreadState_SetAsyncExc(job.ident as c_long, exc.as_ptr());
        }
        if !abandon || job.retired.load(Ordering::Acquire) || !may_retire() {
            return false;
        }
        // Under the lock, while the thread still runs this job: it sees the flag on return.
        job.retired.store(true, Ordering::Release);
        true
    }
}

//! The running task, for `dbtask.current_task()`, and the callbacks the worker installs in the
//! package (`dbtask._worker.install`) before the task modules are imported.
//!
//! A sync job marks its thread while it runs ([`with_job`]): two thread-local writes, no
//! allocation. Its bound form (`self` of a `bind=True` task, `current_task()`) is made only
//! when asked for, by the function or by `current_task()` (the package calls [`current`]),
//! and kept for the rest of the run so that both see the same object. An `async def` job's
//! bound form is made for every job and set in the task's own context (`support.py`).

use std::cell::{Cell, RefCell};

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::registry::Entry;
use super::Job;

thread_local! {
    /// The sync job this thread is running, while [`with_job`] runs.
    static RUNNING: Cell<Option<(*const Job, *const Entry)>> = const { Cell::new(None) };
    /// Its bound form, once made.
    static BOUND: RefCell<Option<Py<PyAny>>> = const { RefCell::new(None) };
}

/// Runs `f` with `job` (of `entry`) as this thread's running task.
pub(crate) fn with_job<R>(job: &Job, entry: &Entry, f: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            RUNNING.set(None);
            drop(BOUND.take());
        }
    }
    RUNNING.set(Some((job as *const Job, entry as *const Entry)));
    let _reset = Reset;
    f()
}

/// The bound form of the job this thread runs (made once per run), or `None` outside one.
pub(crate) fn running_bound(py: Python<'_>) -> PyResult<Option<Bound<'_, PyAny>>> {
    if let Some(made) = BOUND.with_borrow(|b| b.as_ref().map(|b| b.clone_ref(py))) {
        return Ok(Some(made.into_bound(py)));
    }
    let Some((job, entry)) = RUNNING.get() else {
        return Ok(None);
    };
    // SAFETY: RUNNING holds these pointers only while `with_job` runs on this thread, and
    // `with_job` borrows both for its whole run: they point to live values.
    let (job, entry) = unsafe { (&*job, &*entry) };
    let made = bound(py, entry, job)?;
    BOUND.set(Some(made.clone().unbind()));
    Ok(Some(made))
}

/// `dbtask._worker.bound(task, id, retries, attempt, queue, eta, parent_id, root_id,
/// traceparent, tracestate)`.
pub(crate) fn bound<'py>(py: Python<'py>, entry: &Entry, job: &Job) -> PyResult<Bound<'py, PyAny>> {
    let r = &job.request;
    super::retry::bound_fn(py)?.call1((
        entry.task.bind(py),
        &job.task_id,
        job.retries,
        job.attempt.saturating_add(job.retries),
        &r.queue,
        r.eta,
        r.parent_id.as_deref(),
        r.root_id.as_deref(),
        r.trace.as_ref().map(|t| t.parent.as_str()),
        r.trace.as_ref().and_then(|t| t.state.as_deref()),
    ))
}

/// `current_task()`'s question to the worker: the sync task running on the calling thread.
#[pyfunction]
fn current(py: Python<'_>) -> PyResult<Option<Bound<'_, PyAny>>> {
    running_bound(py)
}

/// Installs the worker's callbacks in the package (`dbtask._worker.install`).
pub(crate) fn install(py: Python<'_>, contract: &Bound<'_, PyModule>) -> PyResult<()> {
    let kwargs = PyDict::new(py);
    kwargs.set_item("lookup", wrap_pyfunction!(current, py)?)?;
    kwargs.set_item("state_writer", super::state::writer(py)?)?;
    kwargs.set_item("emit_log", super::logs::emitter(py)?)?;
    kwargs.set_item("log_level", super::logs::python_level())?;
    kwargs.set_item("signals_changed", super::signals::listener(py)?)?;
    kwargs.set_item("span_writer", super::otel::writer(py)?)?;
    contract.getattr("install")?.call((), Some(&kwargs))?;
    Ok(())
}

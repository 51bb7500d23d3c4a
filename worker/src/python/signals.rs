//! `dbtask.signals` as the worker sees them: two flags the package keeps up to date (whether a
//! task signal, and whether `task_revoked`, has a receiver), so that a signal nobody listens
//! to costs one atomic load; and the worker signals, sent from a Python thread.

use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::prelude::*;

use super::convert::error_from;
use super::CONTRACT_MODULE;

static TASK_SIGNALS: AtomicBool = AtomicBool::new(false);
static REVOKED: AtomicBool = AtomicBool::new(false);

/// A task signal (`task_prerun`...) has a receiver: calls go through the traced wrapper.
pub(crate) fn task_signals() -> bool {
    TASK_SIGNALS.load(Ordering::Relaxed)
}

/// `task_revoked` has a receiver.
pub fn revoked_connected() -> bool {
    REVOKED.load(Ordering::Relaxed)
}

/// `signals_changed(task_signals, revoked)`, called by the package on every connect.
#[pyfunction]
fn signals_changed(task_signals: bool, revoked: bool) {
    TASK_SIGNALS.store(task_signals, Ordering::Relaxed);
    REVOKED.store(revoked, Ordering::Relaxed);
}

pub(crate) fn listener(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    Ok(wrap_pyfunction!(signals_changed, py)?.into_any())
}

/// Sends the worker signal `name` (its receivers' errors are logged by the package).
pub(crate) fn send_worker_signal(py: Python<'_>, name: &str) {
    let sent = py
        .import(CONTRACT_MODULE)
        .and_then(|m| m.getattr("send_signal"))
        .and_then(|send| send.call1((name, worker_name())));
    if let Err(e) = sent {
        let error = error_from(py, e);
        tracing::error!(signal = name, error = %error.message, "cannot send a worker signal");
    }
}

/// The worker's name for `sender` (the host name, as in its records).
fn worker_name() -> String {
    hostname().unwrap_or_else(|| "dbtask-worker".to_owned())
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0)?;
    ok.then(|| String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// Sends a worker signal from a tokio thread: on a blocking thread, never holding the GIL on
/// the caller's; returns once the receivers have run.
pub async fn send_worker_signal_async(name: &'static str) {
    let sent = tokio::task::spawn_blocking(move || {
        Python::attach(|py| send_worker_signal(py, name));
    });
    if let Err(e) = sent.await {
        tracing::error!(signal = name, error = %e, "a worker signal's receivers panicked");
    }
}

/// Sends `task_revoked` for a task whose REVOKED record is stored, if it has a receiver; on a
/// blocking thread, without waiting.
pub fn task_revoked(task: &str, task_id: &str, terminated: bool, expired: bool) {
    if !revoked_connected() {
        return;
    }
    let (task, task_id) = (task.to_owned(), task_id.to_owned());
    drop(tokio::task::spawn_blocking(move || {
        Python::attach(|py| {
            let sent = py
                .import(CONTRACT_MODULE)
                .and_then(|m| m.getattr("task_revoked"))
                .and_then(|f| f.call1((&task, &task_id, terminated, expired)));
            if let Err(e) = sent {
                let error = error_from(py, e);
                tracing::error!(task_id, task, error = %error.message, "cannot send task_revoked");
            }
        });
    }));
}

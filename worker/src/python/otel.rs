//! OpenTelemetry, when the task modules' environment has it (docs/tracing.md): the worker
//! only carries W3C trace context; the spans are made in Python (`dbtask._otel`).
//!
//! Whether it is on is read once, at start-up, from `dbtask._worker.OTEL` (the package tried
//! `import opentelemetry` when the worker imported it). Off, nothing here runs: no header is
//! read, no task goes through the wrapper, no follow-up looks for a span.
//!
//! On, each task runs in the wrapper `dbtask._otel` adds to `traced(task)`, which opens a
//! span continuing the message's `traceparent`, and tells [`write_span`] the context of that
//! span, so that the retries and workflow steps published after it carry it (children of the
//! span). A pool process cannot tell the worker (its span stays its own): what it publishes
//! after carries the message's own trace context.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use dbtask_protocol::Trace;
use pyo3::prelude::*;

static ON: AtomicBool = AtomicBool::new(false);

/// The span context each running (or just finished) task reported, by task id.
static SPANS: Mutex<Option<HashMap<String, Trace>>> = Mutex::new(None);

/// Whether tracing is on (set once when the registry is read).
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

pub(crate) fn set_enabled(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// The span context the task `task_id` reported, taken out.
pub fn take_span(task_id: &str) -> Option<Trace> {
    SPANS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()?
        .remove(task_id)
}

/// `span_writer(task_id, traceparent, tracestate)`: the context of a running task's span.
#[pyfunction]
#[pyo3(signature = (task_id, traceparent, tracestate=None))]
fn write_span(task_id: String, traceparent: String, tracestate: Option<String>) {
    if let Ok(trace) = Trace::new(traceparent, tracestate) {
        SPANS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(HashMap::new)
            .insert(task_id, trace);
    }
}

/// The `span_writer` callback the package gets: `None` in a pool process, whose spans the
/// worker cannot hear of.
pub(crate) fn writer(py: Python<'_>) -> PyResult<Option<Bound<'_, PyAny>>> {
    if super::process::child::requested() {
        return Ok(None);
    }
    Ok(Some(wrap_pyfunction!(write_span, py)?.into_any()))
}

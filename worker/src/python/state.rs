//! `update_state`: a task's own state (`"PROGRESS"`) with its meta, stored as the task's record
//! and published on its notification channel, where `AsyncResult.progress()` hears it.
//!
//! The Python thread running the task queues the write on the result writer itself, before
//! the task returns: the task's final record, queued after the run, always lands after its
//! last state. A pool process sends its states to the worker over its socket
//! ([`forward_with`]); the worker queues them the same way.

use std::sync::Mutex;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::store::Writer;

/// Where states go while the worker serves: its result writer, its name for the records, and
/// the largest meta it stores (`max_result_bytes`, as for a result).
struct Sink {
    writer: Writer,
    worker: String,
    max_bytes: usize,
}

static SINK: Mutex<Option<Sink>> = Mutex::new(None);

/// How a pool process hands its states on instead: to the worker, over its socket.
type Forward = Box<dyn Fn(StateUpdate) -> Result<(), String> + Send>;

static FORWARD: Mutex<Option<Forward>> = Mutex::new(None);

/// In a pool process: states go through `forward` (to the worker, which stores them).
pub(crate) fn forward_with(forward: Forward) {
    *FORWARD.lock().unwrap_or_else(|e| e.into_inner()) = Some(forward);
}

/// One state a task stored for itself.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StateUpdate {
    pub id: String,
    pub task: String,
    pub state: String,
    /// The meta as JSON, checked by `json.dumps` in the task's process.
    pub meta: Box<RawValue>,
    /// The task's `result_ttl`, if it has one.
    pub ttl: Option<u64>,
}

/// The record as Redis keeps it.
#[derive(Serialize)]
struct StateRecord<'a> {
    id: &'a str,
    state: &'a str,
    task: &'a str,
    meta: &'a RawValue,
    worker: &'a str,
    date_updated: f64,
}

/// While the returned guard lives, tasks' states go to `writer`; a meta over `max_bytes` of
/// JSON is refused.
pub fn serve(writer: Writer, worker: String, max_bytes: usize) -> Serving {
    *SINK.lock().unwrap_or_else(|e| e.into_inner()) = Some(Sink {
        writer,
        worker,
        max_bytes,
    });
    Serving(())
}

/// Stops taking states when dropped (the worker has stopped serving).
pub struct Serving(());

impl Drop for Serving {
    fn drop(&mut self) {
        *SINK.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Queues `update` on the result writer; the error says why it cannot be stored.
pub(crate) fn store(update: &StateUpdate) -> Result<(), String> {
    let sink = SINK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(sink) = sink.as_ref() else {
        return Err(
            "the worker is not serving (starting or stopping): the state is not stored".into(),
        );
    };
    let size = update.meta.get().len();
    if size > sink.max_bytes {
        return Err(format!(
            "update_state meta is {size} bytes of JSON, over the worker's max_result_bytes ({}): the state is not stored",
            sink.max_bytes
        ));
    }
    let json = serde_json::to_vec(&StateRecord {
        id: &update.id,
        state: &update.state,
        task: &update.task,
        meta: &update.meta,
        worker: &sink.worker,
        date_updated: dbtask_protocol::now_unix(),
    })
    .expect("a state record always serializes");
    let ttl = update.ttl.unwrap_or_else(|| sink.writer.default_ttl());
    if sink
        .writer
        .enqueue_write(sink.writer.published(&update.id, &json, ttl))
    {
        Ok(())
    } else {
        Err("the worker's result writer has stopped: the state is not stored".into())
    }
}

/// The update `update_state` made, checked: `meta` is the JSON `json.dumps` gave.
fn update(
    task_id: String,
    task: String,
    state: String,
    meta: String,
    ttl: Option<u64>,
) -> PyResult<StateUpdate> {
    let meta = RawValue::from_string(meta)
        .map_err(|e| PyRuntimeError::new_err(format!("update_state: meta is not JSON: {e}")))?;
    Ok(StateUpdate {
        id: task_id,
        task,
        state,
        meta,
        ttl,
    })
}

/// `state_writer(task_id, task_name, state, meta_json, ttl)`: stored by the worker, or, in a
/// pool process, sent to it.
#[pyfunction]
fn write_state(
    task_id: String,
    task: String,
    state: String,
    meta: String,
    ttl: Option<u64>,
) -> PyResult<()> {
    let update = update(task_id, task, state, meta, ttl)?;
    if let Some(forward) = FORWARD.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return forward(update).map_err(PyRuntimeError::new_err);
    }
    store(&update).map_err(PyRuntimeError::new_err)
}

/// The `state_writer` callback the package gets.
pub(crate) fn writer(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    Ok(wrap_pyfunction!(write_state, py)?.into_any())
}

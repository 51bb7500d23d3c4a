//! `dbtask._dbtask`: the compiled half of the dbtask Python client.
//!
//! It publishes task messages to NATS JetStream and reads results from Redis, on its own tokio
//! runtime (one I/O thread per process). Python sees one class, [`client::Client`], whose
//! methods come in pairs: an awaitable one for asyncio and a blocking `*_sync` twin that
//! releases the GIL while it waits. The public API lives in the pure-Python package `dbtask`.
//!
//! Modules, one concern each (no module imports one that imports it back):
//! - [`client`]: the Python class, its argument checks, the hand-over to the bridge;
//! - [`connection`]: the NATS and Redis connections, the task stream, `close`;
//! - [`publish`]: task messages checked, encoded and published, confirmations in order;
//! - [`results`]: reading a record, waiting for a ready one, forgetting it;
//! - [`progress`]: following a task's states as they are stored;
//! - [`canvas`]: workflows; [`revoke`]: revocations; [`admin`]: dead letters, and through
//!   [`inspect`] events, inspect / control requests, scheduled tasks and queue purges;
//! - [`periodic`]: periodic schedules (`dbtask.schedule` and the rest);
//! - [`security`]: TLS and credentials of the NATS connection;
//! - [`bridge`], [`runtime`], [`notify`], [`json`], [`ids`], [`error`]: the plumbing.

use pyo3::prelude::*;

/// The client's Rust allocations: a message is built on the Python thread and freed on the
/// I/O thread, and glibc's malloc takes the owning arena's lock for such a free, so the two
/// threads kept waking each other through that lock (a futex call per task in W1).
/// mimalloc frees across threads without a lock. Python's own objects are not affected.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod bridge;
mod canvas;
mod client;
mod connection;
mod error;
mod ids;
mod inspect;
mod json;
mod notify;
mod periodic;
mod progress;
mod publish;
mod results;
mod revoke;
mod runtime;
mod security;

/// Resets process-wide state in a forked child (called from `os.register_at_fork`): the
/// parent's I/O thread does not exist here, and its connections belong to the parent.
#[pyfunction]
fn _after_fork_in_child() {
    runtime::after_fork_in_child();
    ids::after_fork_in_child();
    bridge::after_fork_in_child();
}

/// A new random task id (a v4 UUID, as `str(uuid.uuid4())`), from a buffer of OS randomness:
/// about 20 times cheaper than Python's `uuid4()`, for workflows that name many tasks at once.
#[pyfunction]
fn new_task_id() -> String {
    ids::new_task_id()
}

/// The body of the message a publish of `task` would send, checked and encoded exactly as
/// `Client.publish` does (the same errors for arguments that cannot travel), but not sent:
/// eager mode (`dbtask.init(eager=True)`) runs it in-process.
#[pyfunction]
#[pyo3(signature = (queue, task, args, kwargs=None, options=None))]
fn encode_task<'py>(
    py: Python<'py>,
    queue: &str,
    task: &str,
    args: &Bound<'py, PyAny>,
    kwargs: Option<&Bound<'py, PyAny>>,
    options: Option<&Bound<'py, client::CallOptions>>,
) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
    let (task_id, options) = client::CallOptions::read(options);
    let out = publish::prepare(
        queue,
        task,
        args,
        kwargs,
        task_id,
        options,
        dbtask_protocol::now_unix(),
    )?;
    Ok(pyo3::types::PyBytes::new(py, out.body()))
}

#[pymodule]
fn _dbtask(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<client::Client>()?;
    m.add_class::<client::CallOptions>()?;
    m.add_class::<progress::ProgressStream>()?;
    m.add_class::<admin::Admin>()?;
    m.add_class::<inspect::EventSubscription>()?;
    m.add_class::<periodic::Schedules>()?;
    m.add_function(wrap_pyfunction!(_after_fork_in_child, m)?)?;
    m.add_function(wrap_pyfunction!(new_task_id, m)?)?;
    m.add_function(wrap_pyfunction!(encode_task, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PROTOCOL_VERSION", dbtask_protocol::PROTOCOL_VERSION)?;
    Ok(())
}

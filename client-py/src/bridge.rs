//! Awaitables for asyncio, resolved from the tokio thread without ever taking the GIL there.
//!
//! Each event loop gets a [`LoopWaker`]: a queue of finished operations and a socket pair
//! whose read end the loop watches (`loop.add_reader`). A finished Rust future pushes its
//! outcome on the queue and, if the loop is not already due to look, writes one byte. The loop
//! thread then drains the whole queue in one callback and resolves the asyncio futures. So
//! the tokio thread never waits for the GIL, and a burst of completions costs one wake-up,
//! not one thread hop and one GIL hand-over each (as `call_soon_threadsafe` from a
//! `spawn_blocking` thread would).

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyCFunction;
use pyo3::{intern, IntoPyObjectExt};
use tokio::task::AbortHandle;

use crate::error::ClientError;
use crate::runtime;

/// Turns the Rust outcome into a Python value; runs on the loop's thread, with the GIL.
type Deliver = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

struct Completion {
    future: Py<PyAny>,
    deliver: Deliver,
}

struct WakerState {
    queue: Mutex<Vec<Completion>>,
    /// A byte is on its way to the loop (or the loop is about to drain): no need for another.
    armed: AtomicBool,
    reader: UnixStream,
    writer: UnixStream,
}

impl WakerState {
    fn push(&self, completion: Completion) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(completion);
        if !self.armed.swap(true, Ordering::SeqCst) {
            // Non-blocking; the buffer only ever holds a few bytes, and a full buffer
            // already means the loop will wake up.
            let _ = (&self.writer).write(&[1]);
        }
    }
}

/// The reader callback installed on one event loop.
#[pyclass(frozen, module = "dbtask._dbtask")]
struct LoopWaker {
    state: Arc<WakerState>,
}

#[pymethods]
impl LoopWaker {
    fn __call__(&self, py: Python<'_>) {
        // One read, not a loop until EAGAIN: at most a byte or two are ever waiting (one per
        // arming), and should more remain, the selector is level-triggered and calls us again.
        // That saves a syscall per wake-up, which is per task when awaiting one at a time.
        let mut buf = [0u8; 64];
        while let Err(e) = (&self.state.reader).read(&mut buf) {
            if e.kind() != ErrorKind::Interrupted {
                break;
            }
        }
        // Disarm before taking the queue: a completion pushed after the take sees the flag
        // down and writes a new byte, so nothing is left behind.
        self.state.armed.store(false, Ordering::SeqCst);
        let items =
            std::mem::take(&mut *self.state.queue.lock().unwrap_or_else(|e| e.into_inner()));
        for item in items {
            let future = item.future.bind(py);
            let outcome = (item.deliver)(py);
            let res = match outcome {
                Ok(value) => future.call_method1(intern!(py, "set_result"), (value,)),
                Err(err) => {
                    future.call_method1(intern!(py, "set_exception"), (err.into_value(py),))
                }
            };
            if let Err(err) = res {
                // InvalidStateError: the awaiting task was cancelled; nothing to deliver.
                if !future
                    .call_method0(intern!(py, "done"))
                    .and_then(|d| d.is_truthy())
                    .unwrap_or(false)
                {
                    err.write_unraisable(py, Some(future));
                }
            }
        }
    }
}

/// One waker per live event loop. Looked up by identity, most recent first; entries of closed
/// loops are dropped when a new loop registers.
static WAKERS: Mutex<Vec<(Py<PyAny>, Arc<WakerState>)>> = Mutex::new(Vec::new());

fn get_running_loop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    GET_RUNNING_LOOP
        .get_or_try_init(py, || -> PyResult<_> {
            Ok(py.import("asyncio")?.getattr("get_running_loop")?.unbind())
        })?
        .bind(py)
        .call0()
        .map_err(|_| {
            PyRuntimeError::new_err(
                "no running event loop: await this from a coroutine, or use the *_sync method",
            )
        })
}

fn waker_for(py: Python<'_>, event_loop: &Bound<'_, PyAny>) -> PyResult<Arc<WakerState>> {
    // Never call into Python while holding the lock: Python code may switch threads, and
    // another thread blocked on this lock with the GIL would then deadlock us.
    let known: Vec<Py<PyAny>> = {
        let wakers = WAKERS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, state)) = wakers
            .iter()
            .find(|(l, _)| l.as_ptr() == event_loop.as_ptr())
        {
            return Ok(state.clone());
        }
        wakers.iter().map(|(l, _)| l.clone_ref(py)).collect()
    };
    // A loop only ever asks from its own thread, so nobody races us for this one.
    let closed: Vec<usize> = known
        .iter()
        .filter(|l| {
            l.bind(py)
                .call_method0(intern!(py, "is_closed"))
                .and_then(|c| c.is_truthy())
                .unwrap_or(true)
        })
        .map(|l| l.as_ptr() as usize)
        .collect();
    let (reader, writer) = UnixStream::pair()
        .and_then(|(r, w)| {
            r.set_nonblocking(true)?;
            w.set_nonblocking(true)?;
            Ok((r, w))
        })
        .map_err(|e| {
            PyRuntimeError::new_err(format!("cannot create the event loop wake-up socket: {e}"))
        })?;
    let fd = reader.as_raw_fd();
    let state = Arc::new(WakerState {
        queue: Mutex::new(Vec::new()),
        armed: AtomicBool::new(false),
        reader,
        writer,
    });
    let waker = Py::new(
        py,
        LoopWaker {
            state: state.clone(),
        },
    )?;
    event_loop.call_method1(intern!(py, "add_reader"), (fd, waker))?;
    let removed: Vec<(Py<PyAny>, Arc<WakerState>)> = {
        let mut wakers = WAKERS.lock().unwrap_or_else(|e| e.into_inner());
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut *wakers)
            .into_iter()
            .partition(|(l, _)| closed.contains(&(l.as_ptr() as usize)));
        *wakers = kept;
        wakers.insert(0, (event_loop.clone().unbind(), state.clone()));
        gone
    };
    drop(removed); // outside the lock: dropping Python objects may run Python code
    Ok(state)
}

/// Runs `fut` on the client's runtime and returns an asyncio future of its outcome, bound to
/// the running loop. `convert` turns the Rust value into a Python one on the loop's thread.
pub fn awaitable<'py, F, T, C>(py: Python<'py>, fut: F, convert: C) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = Result<T, ClientError>> + Send + 'static,
    T: Send + 'static,
    C: FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
{
    Ok(spawn_awaitable(py, fut, convert)?.0)
}

/// Like [`awaitable`], for futures that must stop when the awaiting task is cancelled (e.g.
/// `asyncio.wait_for` around a `get()`): dropping the Rust future undoes its registrations.
pub fn cancellable<'py, F, T, C>(py: Python<'py>, fut: F, convert: C) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = Result<T, ClientError>> + Send + 'static,
    T: Send + 'static,
    C: FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
{
    let (py_future, abort) = spawn_awaitable(py, fut, convert)?;
    let on_done = PyCFunction::new_closure(py, None, None, move |args, _kwargs| -> PyResult<()> {
        let fut = args.get_item(0)?;
        if fut
            .call_method0(intern!(args.py(), "cancelled"))?
            .is_truthy()?
        {
            abort.abort();
        }
        Ok(())
    })?;
    py_future.call_method1(intern!(py, "add_done_callback"), (on_done,))?;
    Ok(py_future)
}

fn spawn_awaitable<'py, F, T, C>(
    py: Python<'py>,
    fut: F,
    convert: C,
) -> PyResult<(Bound<'py, PyAny>, AbortHandle)>
where
    F: Future<Output = Result<T, ClientError>> + Send + 'static,
    T: Send + 'static,
    C: FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
{
    // On the heap at once: a publish future is a few KB (async-nats' state machines), and
    // every move on the way into tokio's task cell would copy it otherwise.
    let fut = Box::pin(fut);
    let (py_future, pending) = Pending::new(py)?;
    let task = runtime::spawn(async move {
        pending.resolve(guarded(fut).await, convert);
    });
    Ok((py_future, task.abort_handle()))
}

/// `fut`'s outcome, with a panic turned into an error instead of a future never resolved.
pub async fn guarded<F, T>(fut: F) -> Result<T, ClientError>
where
    F: Future<Output = Result<T, ClientError>>,
{
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(result) => result,
        Err(_) => Err(ClientError::runtime(
            "dbtask internal error: the operation panicked",
        )),
    }
}

/// An asyncio future of the running loop, to be resolved from any thread without the GIL.
pub struct Pending {
    waker: Arc<WakerState>,
    future: Py<PyAny>,
}

impl Pending {
    /// A new future on the running loop (RuntimeError without one), and its resolver.
    pub fn new(py: Python<'_>) -> PyResult<(Bound<'_, PyAny>, Pending)> {
        let event_loop = get_running_loop(py)?;
        let waker = waker_for(py, &event_loop)?;
        let py_future = event_loop.call_method0(intern!(py, "create_future"))?;
        let future = py_future.clone().unbind();
        Ok((py_future, Pending { waker, future }))
    }

    /// Hands the outcome to the loop's thread, where `convert` makes the Python value.
    pub fn resolve<T, C>(self, result: Result<T, ClientError>, convert: C)
    where
        T: Send + 'static,
        C: FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
    {
        let deliver: Deliver = Box::new(move |py| match result {
            Ok(value) => convert(py, value),
            Err(err) => Err(err.into()),
        });
        self.waker.push(Completion {
            future: self.future,
            deliver,
        });
    }
}

/// Converts values that already implement `IntoPyObject`.
pub fn into_py<T>(py: Python<'_>, value: T) -> PyResult<Py<PyAny>>
where
    T: for<'p> IntoPyObject<'p>,
{
    value.into_py_any(py)
}

/// Forgets the wakers of the parent's loops in a forked child.
pub fn after_fork_in_child() {
    let old = std::mem::take(&mut *WAKERS.lock().unwrap_or_else(|e| e.into_inner()));
    // Dropped outside the lock; we hold the GIL in the at-fork hook.
    drop(old);
}

//! The client's tokio runtime: one current-thread runtime driven by one dedicated thread,
//! created on first use and shared by every client and event loop of the process.
//!
//! Every Rust future of the client runs there; Python threads only hand work over (and wait
//! for it with the GIL released, in the blocking API). A current-thread runtime beat the
//! multi-thread one on this workload (see DESIGN.md), and one I/O thread keeps the process
//! small next to a Python application.
//!
//! A forked child does not inherit the thread: after `os.fork()` the next use builds a new
//! runtime, and the parent's one is leaked on purpose (dropping it would touch the parent's
//! epoll instance, which the child shares).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use pyo3::prelude::*;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::error::ClientError;

static HANDLE: RwLock<Option<Handle>> = RwLock::new(None);
static FORKED: AtomicBool = AtomicBool::new(false);

fn start() -> Handle {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("dbtask-io")
        .build()
        .expect("cannot build the dbtask tokio runtime");
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("dbtask-io".into())
        .spawn(move || rt.block_on(keep_a_timer_due()))
        .expect("cannot start the dbtask I/O thread");
    handle
}

/// How often the I/O thread's idle timer fires: well under every timeout the client arms
/// (publish confirmations: 10 s; Redis answers: 10 s).
const TIMER_KEEPALIVE: Duration = Duration::from_secs(2);

/// Keeps a timer due within [`TIMER_KEEPALIVE`], forever.
///
/// tokio's timer writes the runtime's eventfd whenever a timer is registered that expires
/// before every other one (so that a parked driver recomputes its sleep), even from the
/// runtime's own thread. With no other timer pending, that is every publish when publishing
/// one at a time (async-nats arms a 10 s timeout per publish): a write and a spurious epoll
/// round each. An earlier timer always pending makes those registrations silent; its own
/// cost is one wake-up every 2 s.
async fn keep_a_timer_due() {
    loop {
        tokio::time::sleep(TIMER_KEEPALIVE).await;
    }
}

/// The runtime's handle, starting the runtime on first use (or first use after a fork).
pub fn handle() -> Handle {
    if !FORKED.load(Ordering::Acquire) {
        if let Some(h) = HANDLE.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return h.clone();
        }
    }
    let mut slot = HANDLE.write().unwrap_or_else(|e| e.into_inner());
    if FORKED.swap(false, Ordering::AcqRel) {
        // The parent's runtime has no thread here: forget it without running its destructor.
        if let Some(old) = slot.take() {
            std::mem::forget(old);
        }
    }
    slot.get_or_insert_with(start).clone()
}

/// Called in a forked child (`os.register_at_fork`).
pub fn after_fork_in_child() {
    FORKED.store(true, Ordering::Release);
}

pub fn spawn<F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    handle().spawn(fut)
}

/// Runs `fut` on the runtime and blocks this thread until it is done, with the GIL released.
/// Signals are checked every 200 ms, so Ctrl-C interrupts a long `get_sync()` (the future is
/// then dropped, which undoes its registrations).
pub fn block_on<F, T>(py: Python<'_>, fut: F) -> PyResult<T>
where
    F: Future<Output = Result<T, ClientError>> + Send + 'static,
    T: Send + 'static,
{
    let fut = Box::pin(fut); // see bridge::spawn_awaitable: moved once, not copied
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let task = spawn(async move {
        let _ = tx.send(fut.await);
    });
    let mut rx = rx;
    loop {
        let (received, back) = py.detach(move || (rx.recv_timeout(Duration::from_millis(200)), rx));
        rx = back;
        match received {
            Ok(result) => return result.map_err(PyErr::from),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Err(err) = py.check_signals() {
                    task.abort();
                    return Err(err);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(ClientError::runtime(
                    "dbtask internal error: the operation stopped without an outcome",
                )
                .into())
            }
        }
    }
}

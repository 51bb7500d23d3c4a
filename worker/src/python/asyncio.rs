//! The asyncio event loop that runs `async def` tasks, on its own thread.
//!
//! Tokio threads queue jobs without the GIL and wake the loop through a socket pair the loop
//! watches (`add_reader`): one byte per wake-up, however many jobs are waiting. The loop then
//! starts every waiting job as an asyncio task in one go. A wrapper coroutine (support.py)
//! hands each outcome to a `TaskReply`, which encodes it on the loop thread and sends it.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyCFunction;
use tokio::sync::oneshot;

use super::convert::{encode_result, error_from, panic_outcome, support};
use super::invoke::invoke;
use super::pool::ThreadCount;
use super::queue::JobQueue;
use super::registry::Entry;
use super::{Arguments, CallOutcome, PythonError, Returned, WorkItem};

pub(crate) struct AsyncLoop {
    shared: Arc<Shared>,
    /// The event loop and support.py's `interrupt`, to reach a running task from outside.
    event_loop: Py<PyAny>,
    interrupt: Py<PyAny>,
}

struct Shared {
    queue: JobQueue<WorkItem>,
    /// A wake-up byte is on its way and the loop has not taken the jobs yet.
    wake_pending: AtomicBool,
    waker: UnixStream,
    /// The end the loop watches; kept here so that writing to `waker` never meets a closed
    /// peer (EPIPE, SIGPIPE), even after the loop is gone.
    wakee: UnixStream,
    /// The loop saw the queue closed and waits for its last tasks before stopping.
    stopping: AtomicBool,
}

impl AsyncLoop {
    pub fn start(threads: &Arc<ThreadCount>) -> Result<AsyncLoop, PythonError> {
        let init =
            |e: std::io::Error| PythonError::Init(format!("cannot start the asyncio thread: {e}"));
        let (waker, wakee) = UnixStream::pair().map_err(init)?;
        waker.set_nonblocking(true).map_err(init)?;
        wakee.set_nonblocking(true).map_err(init)?;
        let shared = Arc::new(Shared {
            queue: JobQueue::default(),
            wake_pending: AtomicBool::new(false),
            waker,
            wakee,
            stopping: AtomicBool::new(false),
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let alive = ThreadCount::enter(threads);
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("dbtask-asyncio".to_owned())
            .spawn(move || {
                let _alive = alive;
                Python::attach(|py| run_loop(py, thread_shared, ready_tx));
            })
            .map_err(init)?;
        match ready_rx.recv() {
            Ok(Ok((event_loop, interrupt))) => Ok(AsyncLoop {
                shared,
                event_loop,
                interrupt,
            }),
            Ok(Err(message)) => Err(PythonError::Init(format!(
                "cannot start the asyncio loop: {message}"
            ))),
            Err(_) => Err(PythonError::Init(
                "the asyncio thread ended during start-up".to_owned(),
            )),
        }
    }

    /// Hands a job to the loop; gives it back once the loop is closed.
    pub fn submit(&self, item: WorkItem) -> Result<(), WorkItem> {
        self.shared.queue.push(item)?;
        self.shared.wake();
        Ok(())
    }

    /// Asks the loop to interrupt the running task `task_id` (support.py's `interrupt`):
    /// `kind` is "soft", "hard" or "terminate". Does nothing if it is not running.
    pub fn interrupt(&self, py: Python<'_>, task_id: &str, kind: &str, message: &str) {
        let called = self.event_loop.bind(py).call_method1(
            "call_soon_threadsafe",
            (self.interrupt.bind(py), task_id, kind, message),
        );
        if let Err(e) = called {
            let error = error_from(py, e);
            tracing::debug!(task_id, error = %error.message, "cannot interrupt an async task");
        }
    }

    /// Calls `beat` from the loop every `every` (see `support.py`'s `heartbeat`).
    pub fn heartbeat(
        &self,
        py: Python<'_>,
        every: Duration,
        beat: impl Fn() + Send + Sync + 'static,
    ) -> Result<(), PythonError> {
        let fail = |e: PyErr| {
            PythonError::Init(format!(
                "cannot watch the asyncio loop: {}",
                error_from(py, e).message
            ))
        };
        let beat = PyCFunction::new_closure(py, Some(c"dbtask_beat"), None, move |_, _| beat())
            .map_err(fail)?;
        support(py)
            .and_then(|s| {
                s.heartbeat
                    .bind(py)
                    .call1((self.event_loop.bind(py), beat, every.as_secs_f64()))
            })
            .map(drop)
            .map_err(fail)
    }

    /// Refuses new jobs; the loop stops once the tasks it holds are done.
    pub fn close(&self) {
        self.shared.queue.close();
        self.shared.wake();
    }
}

impl Shared {
    fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            // Non-blocking: a full socket already holds a wake-up, nothing is lost.
            let _ = (&self.waker).write(&[1]);
        }
    }
}

/// What the loop thread hands back once started: the event loop and `interrupt`.
type Started = Result<(Py<PyAny>, Py<PyAny>), String>;

fn run_loop(py: Python<'_>, shared: Arc<Shared>, ready: mpsc::Sender<Started>) {
    let fd = shared.wakee.as_raw_fd();
    #[allow(clippy::type_complexity)]
    let setup = || -> PyResult<(Bound<'_, PyAny>, Bound<'_, PyAny>, Bound<'_, PyAny>)> {
        let asyncio = py.import("asyncio")?;
        let wait = pyo3::wrap_pyfunction!(super::epoll::epoll_wait_ns, py)?;
        let event_loop = support(py)?.new_loop.bind(py).call1((wait,))?;
        asyncio.call_method1("set_event_loop", (&event_loop,))?;
        #[allow(clippy::type_complexity)]
        let (submit, stop, pending, interrupt): (
            Bound<'_, PyAny>,
            Bound<'_, PyAny>,
            Bound<'_, PyAny>,
            Bound<'_, PyAny>,
        ) = support(py)?
            .start_loop
            .bind(py)
            .call1((&event_loop,))?
            .extract()?;
        let drainer = Drainer {
            shared: Arc::clone(&shared),
            submit: submit.unbind(),
            stop: stop.unbind(),
        };
        let on_wake =
            PyCFunction::new_closure(py, Some(c"dbtask_wake"), None, move |args, _kwargs| {
                drainer.drain(args.py());
            })?;
        event_loop.call_method1("add_reader", (fd, on_wake))?;
        Ok((event_loop, pending, interrupt))
    };
    let (event_loop, pending) = match setup() {
        Ok((event_loop, pending, interrupt)) => {
            let _ = ready.send(Ok((event_loop.clone().unbind(), interrupt.unbind())));
            (event_loop, pending)
        }
        Err(e) => {
            let _ = ready.send(Err(error_from(py, e).message));
            return;
        }
    };
    loop {
        // run_forever returns when the loop is stopped: by us once idle after close, or by a
        // task (`loop.stop()`, or SystemExit/KeyboardInterrupt from a plain callback). Only
        // the first ends the thread; otherwise the loop resumes where it was.
        let failed = event_loop.call_method0("run_forever").err();
        if shared.stopping.load(Ordering::Acquire)
            && pending
                .call0()
                .and_then(|n| n.extract::<usize>())
                .map_or(true, |n| n == 0)
        {
            break;
        }
        if let Some(e) = failed {
            let error = error_from(py, e);
            tracing::error!(error = %error.exc_type, message = %error.message, "the asyncio loop stopped on an error; restarting it");
            py.detach(|| std::thread::sleep(Duration::from_millis(100)));
        }
    }
    let _ = event_loop.call_method1("remove_reader", (fd,));
    let _ = event_loop.call_method0("close");
}

/// Runs on the loop thread when woken: starts every waiting job.
struct Drainer {
    shared: Arc<Shared>,
    submit: Py<PyAny>,
    stop: Py<PyAny>,
}

impl Drainer {
    fn drain(&self, py: Python<'_>) {
        let mut buf = [0u8; 64];
        while matches!((&self.shared.wakee).read(&mut buf), Ok(n) if n > 0) {}
        // Reset before taking the jobs: a job queued after `take_all` writes a new byte.
        self.shared.wake_pending.store(false, Ordering::Release);
        let (items, closed) = self.shared.queue.take_all();
        for item in items {
            self.start(py, item);
        }
        if closed && !self.shared.stopping.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.stop.bind(py).call0() {
                let error = error_from(py, e);
                tracing::error!(error = %error.exc_type, message = %error.message, "cannot stop the asyncio loop");
            }
        }
    }

    /// Calls the task function and schedules its coroutine, or sends the outcome at once
    /// (unknown arguments, or it raised before returning a coroutine).
    fn start(&self, py: Python<'_>, item: WorkItem) {
        let WorkItem {
            job, entry, reply, ..
        } = item;
        if reply.is_closed() {
            // The caller gave up before the job started: it must not run.
            return;
        }
        let mut reply = Some(reply);
        let started = catch_unwind(AssertUnwindSafe(|| {
            // Its bound form, for `current_task()` in the task's context (and `self`).
            let me = match super::context::bound(py, &entry, &job) {
                Ok(me) => me,
                Err(e) => return send_err(py, &mut reply, e),
            };
            let called = invoke(py, &entry, &job, Some(&me));
            let arguments = Some(Arguments {
                args: job.args,
                kwargs: job.kwargs,
            });
            match called {
                Err(outcome) => send(&mut reply, outcome, arguments),
                Ok(coroutine) => {
                    let tx = Mutex::new(reply.take().map(|tx| (tx, arguments)));
                    let handle = match Bound::new(
                        py,
                        TaskReply {
                            tx,
                            entry: Arc::clone(&entry),
                        },
                    ) {
                        Ok(handle) => handle,
                        Err(e) => return send_err(py, &mut reply, e),
                    };
                    if let Err(e) =
                        self.submit
                            .bind(py)
                            .call1((coroutine, &handle, &job.task_id, &me))
                    {
                        handle.get().send(CallOutcome::Failure(error_from(py, e)));
                    }
                }
            }
        }));
        if let Err(panic) = started {
            send(&mut reply, panic_outcome(panic), None);
        }
    }
}

fn send(
    reply: &mut Option<oneshot::Sender<Returned>>,
    outcome: CallOutcome,
    arguments: Option<Arguments>,
) {
    if let Some(reply) = reply.take() {
        let _ = reply.send(Returned { outcome, arguments });
    }
}

fn send_err(py: Python<'_>, reply: &mut Option<oneshot::Sender<Returned>>, e: PyErr) {
    send(reply, CallOutcome::Failure(error_from(py, e)), None);
}

/// Where an async task's outcome goes; called by the wrapper coroutine in support.py.
#[pyclass(frozen, name = "TaskReply", module = "_dbtask_worker")]
struct TaskReply {
    /// Where the outcome goes, with the job's arguments to hand back.
    tx: Mutex<Option<(oneshot::Sender<Returned>, Option<Arguments>)>>,
    entry: Arc<Entry>,
}

impl TaskReply {
    fn send(&self, outcome: CallOutcome) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((tx, arguments)) = tx {
            let _ = tx.send(Returned { outcome, arguments });
        }
    }
}

#[pymethods]
impl TaskReply {
    /// The task returned `result`.
    fn succeed(&self, py: Python<'_>, result: &Bound<'_, PyAny>) {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            encode_result(py, &self.entry.name, result)
        }))
        .unwrap_or_else(panic_outcome);
        self.send(outcome);
    }

    /// The task raised `exc` (any BaseException).
    fn fail(&self, py: Python<'_>, exc: &Bound<'_, PyAny>) {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            super::retry::outcome_of(py, &self.entry, exc)
        }))
        .unwrap_or_else(panic_outcome);
        self.send(outcome);
    }
}

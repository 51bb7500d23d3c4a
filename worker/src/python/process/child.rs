//! A pool process: the same `dbtask-worker` executable, started by the worker with
//! [`CHILD_ENV`] set. It starts its own interpreter, imports the task modules, then runs the
//! jobs the worker sends over its socket one at a time on its main thread, and answers each
//! with its outcome. It never talks to NATS or Redis.
//!
//! The main thread reads its jobs from the job socket itself (one wake-up per job); a second
//! thread reads the control socket, where a soft time limit raises `SoftTimeLimitExceeded` in
//! the running job. When the worker closes the sockets (it stops, or replaces this process) or
//! dies, the process exits: at once when idle, within [`ORPHAN_GRACE`] when a task is still
//! running. SIGINT and SIGTERM are ignored: the worker
//! owns them (a Ctrl-C in a terminal reaches the whole process group), and it kills a pool
//! process with SIGKILL when it must.

use std::borrow::Cow;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use serde::{Deserialize, Serialize};

use super::wire::{self, FromChild, Outcome, ToChild};
use crate::python::context::with_job;
use crate::python::convert::{encode_result, error_from, panic_outcome};
use crate::python::invoke::invoke;
use crate::python::registry::{Process, Registry};
use crate::python::running::Running;
use crate::python::{interpreter, Job, CONTRACT_MODULE};
use crate::telemetry::LogFormat;

/// Environment variable that makes `dbtask-worker` a pool process; its value is a
/// [`ChildSpec`] in JSON.
pub const CHILD_ENV: &str = "DBTASK_POOL_CHILD";

/// How long a task may go on after the worker is gone before the process exits anyway.
const ORPHAN_GRACE: Duration = Duration::from_secs(1);

/// What a pool process is told at start.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ChildSpec {
    /// The sockets to the worker (inherited): jobs and outcomes, and controls.
    pub fd: RawFd,
    pub control_fd: RawFd,
    pub python: Option<PathBuf>,
    pub apps: Vec<String>,
    /// `--django`: the settings module Django is set up with before the apps are imported.
    #[serde(default)]
    pub django: Option<String>,
    pub sys_path: Vec<PathBuf>,
    pub log_level: String,
    pub log_format: LogFormat,
}

/// Whether this process was started as a pool process.
pub fn requested() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// The whole life of a pool process.
pub fn main() -> ExitCode {
    let Some(spec) = std::env::var(CHILD_ENV)
        .ok()
        .and_then(|s| serde_json::from_str::<ChildSpec>(&s).ok())
    else {
        eprintln!("dbtask-worker: {CHILD_ENV} is set but unreadable: this variable is for the worker's own pool processes");
        return ExitCode::from(2);
    };
    // Not inherited by what the tasks start.
    std::env::remove_var(CHILD_ENV);
    // SAFETY: setting a signal's disposition to SIG_IGN is always sound.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    crate::telemetry::init(&spec.log_level, spec.log_format);
    // SAFETY: the worker passed these descriptors, open, for this process alone.
    let (socket, control) = unsafe {
        (
            UnixStream::from_raw_fd(spec.fd),
            UnixStream::from_raw_fd(spec.control_fd),
        )
    };
    // Subprocesses of the tasks must not inherit them.
    for fd in [spec.fd, spec.control_fd] {
        // SAFETY: plain fcntl on a descriptor this process owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let mut out = match socket.try_clone() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("dbtask-worker pool process: cannot use its socket: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The states the running task stores (`update_state`) go to the worker on this socket,
    // written by the main thread only, between the job's frame and its outcome's.
    if let Ok(states) = out.try_clone() {
        crate::python::state::forward_with(Box::new(move |update| {
            wire::write_blocking(&mut &states, &FromChild::State(update))
                .map_err(|e| format!("cannot send the state to the worker: {e}"))
        }));
    }
    let registry = match start(&spec) {
        Ok(registry) => registry,
        Err(why) => {
            let _ = wire::write_blocking(&mut out, &FromChild::Failed(why));
            return ExitCode::FAILURE;
        }
    };
    if wire::write_blocking(&mut out, &FromChild::Ready).is_err() {
        return ExitCode::FAILURE;
    }
    let running = Arc::new(Running::default());
    {
        let running = Arc::clone(&running);
        std::thread::Builder::new()
            .name("dbtask-pool-control".into())
            .spawn(move || read_controls(control, &running))
            .expect("a pool process starts its control thread");
    }
    // SAFETY: a plain query of the calling thread's id.
    let ident = unsafe { pyo3::ffi::PyThread_get_thread_ident() };
    let retired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut jobs = std::io::BufReader::new(socket);
    let mut body = Vec::new();
    // Until the worker closes the socket (or a broken frame: the process ends, the worker
    // sees it and starts another).
    while let Ok(true) = wire::read_blocking(&mut jobs, &mut body) {
        let frame = match serde_json::from_slice::<ToChild>(&body) {
            Ok(ToChild::Job(frame)) => frame,
            Ok(ToChild::Soft(_)) | Err(_) => {
                tracing::error!("pool process: unreadable job from the worker (versions differ?)");
                break;
            }
        };
        let job = Job {
            task_id: frame.id.into_owned(),
            task: frame.task.into(),
            args: frame.args.to_owned(),
            kwargs: frame.kwargs.to_owned(),
            attempt: frame.attempt,
            retries: frame.retries,
            request: Box::new(crate::python::RequestInfo {
                queue: frame.queue.into_owned(),
                eta: frame.eta,
                parent_id: frame.parent_id.map(Cow::into_owned),
                root_id: frame.root_id.map(Cow::into_owned),
                trace: frame.traceparent.and_then(|p| {
                    dbtask_protocol::Trace::new(
                        p.into_owned(),
                        frame.tracestate.map(Cow::into_owned),
                    )
                    .ok()
                }),
            }),
        };
        let outcome = Python::attach(|py| {
            let Some(entry) = registry.get(&job.task) else {
                return crate::python::CallOutcome::Failure(registry.unknown_task(&job.task));
            };
            running.enter(&job.task_id, ident, &retired);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                with_job(&job, entry, || match invoke(py, entry, &job, None) {
                    Ok(value) => encode_result(py, &entry.name, &value),
                    Err(outcome) => outcome,
                })
            }))
            .unwrap_or_else(panic_outcome);
            running.leave(py, &job.task_id, ident);
            outcome
        });
        let done = FromChild::Done {
            id: job.task_id,
            outcome: Outcome::from(outcome),
        };
        if wire::write_blocking(&mut out, &done).is_err() {
            break; // the worker is gone
        }
    }
    flush_stdio();
    ExitCode::SUCCESS
}

/// The interpreter, `sys.path` and the task modules, as in the worker itself.
fn start(spec: &ChildSpec) -> Result<Registry, String> {
    interpreter::initialize(spec.python.as_deref()).map_err(|e| e.to_string())?;
    interpreter::prepare(&spec.sys_path).map_err(|e| e.to_string())?;
    interpreter::defer_ssl();
    Registry::load(
        &spec.apps,
        spec.django.as_deref(),
        crate::python::Executor::Processes,
        Process::PoolChild,
    )
    .map_err(|e| e.to_string())
}

/// Raises soft limits, until the worker closes the control socket.
fn read_controls(mut control: UnixStream, running: &Running) {
    let mut body = Vec::new();
    while let Ok(true) = wire::read_blocking(&mut control, &mut body) {
        match serde_json::from_slice::<ToChild>(&body) {
            Ok(ToChild::Soft(task_id)) => soft_limit(running, &task_id),
            Ok(ToChild::Job(_)) | Err(_) => {
                tracing::error!(
                    "pool process: unreadable control from the worker (versions differ?)"
                )
            }
        }
    }
    // The worker closed the socket or died. The main thread exits when it next waits for a
    // job; a task still running gets a moment, then the process ends regardless.
    std::thread::sleep(ORPHAN_GRACE);
    flush_stdio();
    // SAFETY: ends the process at once, as after a crash; nothing is left to write.
    unsafe { libc::_exit(0) };
}

fn soft_limit(running: &Running, task_id: &str) {
    Python::attach(|py| {
        match py
            .import(CONTRACT_MODULE)
            .and_then(|m| m.getattr("SoftTimeLimitExceeded"))
        {
            Ok(exc) => {
                running.raise(py, task_id, &exc, false, || false);
            }
            Err(e) => {
                let error = error_from(py, e);
                tracing::error!(error = %error.message, "cannot raise SoftTimeLimitExceeded: dbtask._worker lacks it (is the dbtask package up to date?)");
            }
        }
    });
}

/// What the tasks printed reaches the logs before the process ends.
fn flush_stdio() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
}

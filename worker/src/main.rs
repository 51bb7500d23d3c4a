//! `dbtask-worker`: parse the command line, load the config, start Python, run the worker.

use std::process::ExitCode;

use clap::Parser;
use dbtask_worker::cli::Cli;
use dbtask_worker::events::Hooks;
use dbtask_worker::monitor::{self, Watch};
use dbtask_worker::python::{self, PythonRuntime};
use dbtask_worker::{memory, run_watched, shutdown, telemetry};

/// Exit code for settings that cannot be used (as sysexits' EX_USAGE... close enough: 2 is
/// what clap uses for a bad command line).
const EXIT_CONFIG: u8 = 2;
/// Exit code for anything else that stops the worker: Python, NATS or Redis at start-up.
const EXIT_FAILURE: u8 = 1;

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("dbtask-worker: error: {message}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    memory::configure();
    // The worker starts its pool processes (`--pool processes`) as itself again.
    if python::is_pool_process() {
        return python::pool_process_main();
    }
    let cli = Cli::parse();
    let config = match cli.load_config() {
        Ok(config) => config,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    if cli.print_config {
        print!("{}", config.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    telemetry::init(&config.log_level, config.log_format);
    // Bound before anything slow: an address in use fails the start at once.
    let listener = match config.http_addr.as_deref().map(monitor::bind).transpose() {
        Ok(listener) => listener,
        Err(e) => return fail(EXIT_FAILURE, e),
    };
    if let Some(addr) = listener.as_ref().and_then(|l| l.local_addr().ok()) {
        tracing::info!(url = %format!("http://{addr}"), "serving /metrics, /livez and /readyz");
    }

    // The interpreter starts on this thread, before any tokio thread exists.
    let python = match PythonRuntime::start(&config.python_config()) {
        Ok(python) => python,
        Err(e) => return fail(EXIT_FAILURE, e),
    };
    // The endpoint, systemd's notifications: only when asked for.
    let watch = match Watch::prepare(&config, &python, listener) {
        Ok(watch) => watch,
        Err(e) => return fail(EXIT_FAILURE, e),
    };
    // Importing the task modules freed more than it kept: give that back before connecting.
    memory::trim();
    // One thread moves messages; Python runs on its own threads. On a few cores this measured
    // faster than the multi-thread runtime.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(EXIT_FAILURE, format!("cannot start the async runtime: {e}")),
    };
    let outcome = runtime.block_on(async {
        let shutdown =
            shutdown::signals().map_err(|e| format!("cannot listen for SIGTERM/SIGINT: {e}"))?;
        if let Some(options) = config.process_options() {
            python
                .start_processes(options)
                .await
                .map_err(|e| e.to_string())?;
        }
        // Freed heap memory goes back to the OS whenever the worker is idle (after start-up,
        // then after each burst of tasks).
        let trimmer = tokio::spawn(memory::trim_when_idle(python.finished_calls()));
        let (hooks, status) = match watch {
            Some(watch) => {
                let (hooks, status) = watch.start(Hooks::default());
                (hooks, Some(status))
            }
            None => (Hooks::default(), None),
        };
        let outcome = run_watched(config, python, hooks, status, shutdown)
            .await
            .map_err(|e| e.to_string());
        trimmer.abort();
        outcome
    });
    let code = match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(EXIT_FAILURE, message),
    };
    // Python threads still busy with abandoned tasks must not hold the exit: NATS redelivers
    // those tasks. Do not wait for them (nor for the runtime's blocking pool).
    runtime.shutdown_background();
    code
}

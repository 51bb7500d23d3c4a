//! The registered tasks: imported once at start-up from `dbtask._worker.TASKS`, with the
//! Python objects each call needs (function, signature) kept ready.

use std::collections::HashMap;
use std::sync::Arc;

use dbtask_protocol::{error_types, TaskError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::convert::{error_from, support};
use super::{Executor, PythonError, TaskInfo};

/// How many names the "unknown task" message lists.
const LISTED_NAMES: usize = 20;
/// How much of an unknown name the message shows (the name comes from the message).
const MAX_SHOWN_NAME: usize = 200;

/// One registered task, as the Python threads use it.
pub(crate) struct Entry {
    pub name: String,
    pub func: Py<PyAny>,
    pub executor: Executor,
    /// `inspect.signature(func)`, when it has one.
    pub signature: Option<Py<PyAny>>,
    /// Calling `func` checks the arguments exactly as `signature.bind` does, before running
    /// any of its code: call first, and bind only to explain a `TypeError`.
    pub precise: bool,
    /// `name(x, y)`, for messages.
    pub display: String,
    /// The `Task` object (its bound form is a `bind=True` task's `self` and
    /// `dbtask.current_task()`).
    pub task: Py<PyAny>,
    /// `bind=True`: the function takes the task's bound form as `self`.
    pub bind: bool,
    /// `dbtask._worker.traced(task)`: the function wrapped in its class hooks and the task
    /// signals, called instead of `func` when [`Entry::traced`] says so.
    pub trace: Py<PyAny>,
    /// The task's class overrides a hook (`on_success`...).
    pub hooks: bool,
    /// `autoretry_for`, as a tuple of exception types.
    pub autoretry_for: Option<Py<PyAny>>,
    /// `autoretry_for` names `dbtask.WorkerLost`: a task whose pool process died is retried.
    pub retry_on_lost: bool,
}

pub(crate) struct Registry {
    infos: HashMap<String, TaskInfo>,
    entries: HashMap<String, Arc<Entry>>,
    /// "3 registered: a, b, c", for the unknown-task message.
    registered: String,
    /// The periodic schedules declared by the imported modules: (name, declaration JSON).
    periodic: Vec<(String, String)>,
}

impl Entry {
    /// Whether a call goes through [`Entry::trace`]: the task has hooks, a task signal has a
    /// receiver, or OpenTelemetry is on (its span). Otherwise the function is called directly, at no cost.
    pub fn traced(&self) -> bool {
        self.hooks || super::signals::task_signals() || super::otel::enabled()
    }
}

/// Which process loads the registry: the worker, or one of its pool processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Process {
    Worker,
    PoolChild,
}

impl Registry {
    /// Imports `dbtask`, installs the worker's callbacks in it (logs, `current_task()`,
    /// `update_state`, signals), sets Django up when `django` names its settings module
    /// (`dbtask._worker.setup_django`: `django.setup()` and each installed app's `tasks`
    /// module), imports each app module (whose `@task`s register), reads the registry, and
    /// sends `worker_init` (or `worker_process_init` in a pool process).
    pub fn load(
        apps: &[String],
        django: Option<&str>,
        sync: Executor,
        process: Process,
    ) -> Result<Registry, PythonError> {
        Python::attach(|py| {
            let registry = py.import(super::CONTRACT_MODULE).map_err(|e| {
                PythonError::Registry(format!(
                    "importing dbtask failed:\n{}",
                    error_from(py, e).traceback.unwrap_or_default()
                ))
            })?;
            super::context::install(py, &registry).map_err(|e| {
                PythonError::Registry(format!(
                    "installing the worker's callbacks in dbtask failed (is the dbtask package up to date?):\n{}",
                    error_from(py, e).traceback.unwrap_or_default()
                ))
            })?;
            if let Some(settings) = django {
                let imported: Vec<String> = registry
                    .getattr("setup_django")
                    .and_then(|setup| setup.call1((settings,)))
                    .and_then(|modules| modules.extract())
                    .map_err(|e| PythonError::Django {
                        settings: settings.to_owned(),
                        traceback: error_from(py, e).traceback.unwrap_or_default(),
                    })?;
                if process == Process::Worker {
                    tracing::info!(settings, modules = %imported.join(","), "django set up; task modules of the installed apps imported");
                }
            }
            for module in apps {
                py.import(module.as_str())
                    .map_err(|e| PythonError::Import {
                        module: module.clone(),
                        traceback: error_from(py, e).traceback.unwrap_or_default(),
                    })?;
            }
            // OpenTelemetry: on when the package could import it (one attempt, at start-up).
            super::otel::set_enabled(
                registry
                    .getattr("OTEL")
                    .and_then(|on| on.is_truthy())
                    .unwrap_or(false),
            );
            let mut loaded =
                read(py, &registry, sync).map_err(|e| PythonError::Registry(e.to_string()))?;
            loaded.periodic = super::periodic::declared(&registry).map_err(|e| {
                PythonError::Registry(format!("cannot read the declared periodic schedules: {e}"))
            })?;
            let signal = match process {
                Process::Worker => "worker_init",
                Process::PoolChild => "worker_process_init",
            };
            super::signals::send_worker_signal(py, signal);
            Ok(loaded)
        })
    }

    pub fn infos(&self) -> &HashMap<String, TaskInfo> {
        &self.infos
    }

    pub fn periodic(&self) -> &[(String, String)] {
        &self.periodic
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Entry>> {
        self.entries.get(name)
    }

    /// The failure of a call naming no registered task.
    pub fn unknown_task(&self, name: &str) -> TaskError {
        let name = match name.char_indices().nth(MAX_SHOWN_NAME) {
            Some((cut, _)) => format!("{}...", &name[..cut]),
            None => name.to_owned(),
        };
        TaskError::new(
            error_types::UNKNOWN_TASK,
            format!(
                "task {name:?} is not registered in this worker ({})",
                self.registered
            ),
        )
    }
}

fn read(py: Python<'_>, registry: &Bound<'_, PyModule>, sync: Executor) -> PyResult<Registry> {
    let worker_lost = registry.getattr("WorkerLost")?;
    let support = support(py)?;
    let tasks = registry.getattr("TASKS")?.cast_into::<PyDict>()?;
    let mut infos = HashMap::new();
    let mut entries = HashMap::new();
    for (key, task) in tasks.iter() {
        let name: String = key.extract()?;
        let with_name = |e: PyErr| {
            pyo3::exceptions::PyValueError::new_err(format!("task {name:?}: {}", describe(py, &e)))
        };
        let func = task.getattr("fn").map_err(with_name)?;
        let is_async = task
            .getattr("is_async")
            .and_then(|v| v.is_truthy())
            .map_err(with_name)?;
        let queue: String = task
            .getattr("queue")
            .and_then(|q| q.extract())
            .map_err(with_name)?;
        let track_started = match task.getattr("options") {
            Ok(options) if !options.is_none() => {
                match options.cast::<PyDict>()?.get_item("track_started")? {
                    Some(v) if !v.is_none() => Some(v.is_truthy()?),
                    _ => None,
                }
            }
            _ => None,
        };
        let retry_options = super::retry::read_options(py, &task).map_err(with_name)?;
        let seconds = |key: &str| -> PyResult<Option<f64>> {
            let Ok(options) = task.getattr("options") else {
                return Ok(None);
            };
            if options.is_none() {
                return Ok(None);
            }
            match options.cast::<PyDict>()?.get_item(key)? {
                Some(v) if !v.is_none() => {
                    let secs: f64 = v.extract().map_err(with_name)?;
                    Ok((secs > 0.0 && secs.is_finite()).then_some(secs))
                }
                _ => Ok(None),
            }
        };
        let time_limit = seconds("time_limit")?;
        let soft_time_limit = seconds("soft_time_limit")?;
        let rate_limit = rate_limit_option(&task).map_err(with_name)?;
        let results = result_options(&task).map_err(with_name)?;
        let trace = registry
            .getattr("traced")
            .and_then(|traced| traced.call1((&task,)))
            .map_err(with_name)?;
        let hooks = registry
            .getattr("has_hooks")
            .and_then(|has| has.call1((&task,)))
            .and_then(|h| h.is_truthy())
            .map_err(with_name)?;
        let (signature, precise, display): (Bound<'_, PyAny>, bool, String) =
            support.describe.bind(py).call1((&name, &func))?.extract()?;
        let signature = (!signature.is_none()).then(|| signature.unbind());
        infos.insert(
            name.clone(),
            TaskInfo {
                name: name.clone(),
                executor: Executor::of(is_async, sync),
                queue,
                track_started,
                retry: retry_options.policy,
                time_limit,
                soft_time_limit,
                rate_limit,
                results,
            },
        );
        entries.insert(
            name.clone(),
            Arc::new(Entry {
                name,
                func: func.unbind(),
                executor: Executor::of(is_async, sync),
                signature,
                precise,
                display,
                task: task.clone().unbind(),
                bind: retry_options.bind,
                trace: trace.unbind(),
                hooks,
                retry_on_lost: match &retry_options.autoretry_for {
                    Some(types) => worker_lost
                        .cast::<pyo3::types::PyType>()?
                        .is_subclass(types.bind(py))?,
                    None => false,
                },
                autoretry_for: retry_options.autoretry_for,
            }),
        );
    }
    let registered = registered_list(infos.keys().map(String::as_str));
    Ok(Registry {
        infos,
        entries,
        registered,
        periodic: Vec::new(),
    })
}

/// `options["rate_limit"]` parsed; a bad one stops the worker with the task's name.
fn rate_limit_option(task: &Bound<'_, PyAny>) -> PyResult<Option<dbtask_protocol::Rate>> {
    let Ok(options) = task.getattr("options") else {
        return Ok(None);
    };
    if options.is_none() {
        return Ok(None);
    }
    match options.cast::<PyDict>()?.get_item("rate_limit")? {
        Some(v) if !v.is_none() => {
            let text: String = v.str()?.extract()?;
            text.parse::<dbtask_protocol::Rate>()
                .map(Some)
                .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))
        }
        _ => Ok(None),
    }
}

/// `ignore_result`, `store_errors_even_if_ignored` and `result_ttl` from the task's options.
fn result_options(task: &Bound<'_, PyAny>) -> PyResult<crate::results::ResultOptions> {
    let mut out = crate::results::ResultOptions::default();
    let Ok(options) = task.getattr("options") else {
        return Ok(out);
    };
    if options.is_none() {
        return Ok(out);
    }
    let options = options.cast::<PyDict>()?;
    if let Some(v) = options.get_item("ignore_result")?.filter(|v| !v.is_none()) {
        out.ignore_result = v.is_truthy()?;
    }
    if let Some(v) = options
        .get_item("store_errors_even_if_ignored")?
        .filter(|v| !v.is_none())
    {
        out.store_errors = v.is_truthy()?;
    }
    if let Some(v) = options.get_item("result_ttl")?.filter(|v| !v.is_none()) {
        let secs: u32 = v.extract()?;
        if secs == 0 {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "result_ttl must be at least 1 second",
            ));
        }
        out.ttl = Some(u64::from(secs));
    }
    Ok(out)
}

fn describe(py: Python<'_>, e: &PyErr) -> String {
    let t = error_from(py, e.clone_ref(py));
    format!("{}: {}", t.exc_type, t.message)
}

/// "3 registered: a, b, c", sorted, listing at most `LISTED_NAMES` names.
fn registered_list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let mut names: Vec<&str> = names.collect();
    names.sort_unstable();
    match names.len() {
        0 => "no task is registered: check the -A modules".to_owned(),
        n if n <= LISTED_NAMES => format!("{n} registered: {}", names.join(", ")),
        n => format!(
            "{n} registered: {}, and {} more",
            names[..LISTED_NAMES].join(", "),
            n - LISTED_NAMES
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::registered_list;

    #[test]
    fn lists_registered_names_sorted_and_truncated() {
        assert_eq!(
            registered_list([].into_iter()),
            "no task is registered: check the -A modules"
        );
        assert_eq!(
            registered_list(["b", "a"].into_iter()),
            "2 registered: a, b"
        );
        let many: Vec<String> = (0..25).map(|i| format!("t{i:02}")).collect();
        let text = registered_list(many.iter().map(String::as_str));
        assert!(text.starts_with("25 registered: t00, t01,"), "{text}");
        assert!(text.ends_with("t19, and 5 more"), "{text}");
    }
}

//! The Python side of retries: reading a raised exception (an explicit `dbtask.Retry`, an
//! exception listed in `autoretry_for`, or a plain failure) and a task's retry options into
//! owned values. What they mean (whether a retry is left, and when) is decided in
//! [`crate::retry`].

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use super::convert::task_error;
use super::registry::Entry;
use super::CallOutcome;
use crate::retry::{Request, RetryPolicy};

/// `Retry` and `bound` of the contract module, imported on first use.
struct RetryModule {
    retry: Py<PyAny>,
    bound: Py<PyAny>,
}

static MODULE: PyOnceLock<RetryModule> = PyOnceLock::new();

fn module(py: Python<'_>) -> PyResult<&'static RetryModule> {
    MODULE.get_or_try_init(py, || {
        let m = py.import(super::CONTRACT_MODULE)?;
        Ok(RetryModule {
            retry: m.getattr("Retry")?.unbind(),
            bound: m.getattr("bound")?.unbind(),
        })
    })
}

/// The outcome of a task that raised `exc`.
pub(crate) fn outcome_of(py: Python<'_>, entry: &Entry, exc: &Bound<'_, PyAny>) -> CallOutcome {
    if let Ok(m) = module(py) {
        if exc.is_instance(m.retry.bind(py)).unwrap_or(false) {
            let countdown = exc
                .getattr("countdown")
                .ok()
                .and_then(|c| c.extract::<Option<f64>>().ok())
                .flatten();
            let max_retries = exc
                .getattr("max_retries")
                .ok()
                .and_then(|c| c.extract::<Option<i64>>().ok())
                .flatten()
                .map(|n| n.clamp(0, u32::MAX as i64) as u32);
            let cause = exc.getattr("exc").ok().filter(|c| !c.is_none());
            let error = task_error(py, cause.as_ref().unwrap_or(exc));
            return CallOutcome::Retry(Request {
                countdown,
                max_retries,
                error,
                explicit: cause.is_none(),
            });
        }
    }
    if let Some(types) = &entry.autoretry_for {
        if exc.is_instance(types.bind(py)).unwrap_or(false) {
            return CallOutcome::Retry(Request {
                countdown: None,
                max_retries: None,
                error: task_error(py, exc),
                explicit: false,
            });
        }
    }
    CallOutcome::Failure(task_error(py, exc))
}

/// `bound` of the contract module: the `self` of a `bind=True` task and `current_task()`
/// (see [`super::context::bound`]).
pub(crate) fn bound_fn(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    Ok(module(py)?.bound.bind(py))
}

/// The retry options of a registered task, read from its `options` dict.
pub(crate) struct RetryOptions {
    pub policy: RetryPolicy,
    pub bind: bool,
    pub autoretry_for: Option<Py<PyAny>>,
}

/// Reads `bind`, `autoretry_for`, `max_retries`, `retry_delay`, `retry_backoff`,
/// `retry_backoff_max` and `retry_jitter` from `task.options` (absent: the defaults).
pub(crate) fn read_options(py: Python<'_>, task: &Bound<'_, PyAny>) -> PyResult<RetryOptions> {
    let mut out = RetryOptions {
        policy: RetryPolicy::default(),
        bind: false,
        autoretry_for: None,
    };
    let options = match task.getattr("options") {
        Ok(o) if !o.is_none() => o.cast_into::<pyo3::types::PyDict>()?,
        _ => return Ok(out),
    };
    let get = |key: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
        Ok(options.get_item(key)?.filter(|v| !v.is_none()))
    };
    let seconds = |key: &str, v: &Bound<'_, PyAny>| -> PyResult<f64> {
        let x: f64 = v.extract()?;
        if !x.is_finite() || x < 0.0 {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "{key} must be a number of seconds >= 0, not {x}"
            )));
        }
        Ok(x)
    };
    if let Some(v) = get("bind")? {
        out.bind = v.is_truthy()?;
    }
    if let Some(v) = get("max_retries")? {
        out.policy.max_retries = v.extract::<u32>()?;
    }
    if let Some(v) = get("retry_delay")? {
        out.policy.retry_delay = seconds("retry_delay", &v)?;
    }
    if let Some(v) = get("retry_backoff_max")? {
        out.policy.retry_backoff_max = seconds("retry_backoff_max", &v)?;
    }
    if let Some(v) = get("retry_jitter")? {
        out.policy.retry_jitter = v.is_truthy()?;
    }
    if let Some(v) = get("retry_backoff")? {
        out.policy.retry_backoff = if v.is_instance_of::<pyo3::types::PyBool>() {
            // `True`: the first delay is `retry_delay`, doubling each time.
            v.is_truthy()?.then_some(out.policy.retry_delay)
        } else {
            Some(seconds("retry_backoff", &v)?)
        };
    }
    if let Some(v) = get("autoretry_for")? {
        let types = if v.is_instance_of::<pyo3::types::PyTuple>() {
            v
        } else if v.is_instance_of::<pyo3::types::PyList>() {
            v.cast_into::<pyo3::types::PyList>()?.to_tuple().into_any()
        } else {
            pyo3::types::PyTuple::new(py, [v])?.into_any()
        };
        out.autoretry_for = Some(types.unbind());
    }
    Ok(out)
}

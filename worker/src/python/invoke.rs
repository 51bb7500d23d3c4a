//! Calling a task function: decode the arguments, check they fit, call.

use dbtask_protocol::{error_types, TaskError};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::convert::{decode_arguments, error_from};
use super::registry::Entry;
use super::{CallOutcome, Job};

/// Calls the task's function with the job's arguments: its return value (a coroutine for an
/// `async def`), or the outcome that ends the job here (bad arguments, or what it raised).
/// `me`: the job's bound form when the caller made it already (an `async def` job); a sync
/// job's is made here only for a `bind=True` task (see [`super::context`]).
pub(crate) fn invoke<'py>(
    py: Python<'py>,
    entry: &Entry,
    job: &Job,
    me: Option<&Bound<'py, PyAny>>,
) -> Result<Bound<'py, PyAny>, CallOutcome> {
    let (mut args, kwargs) =
        decode_arguments(py, &job.args, &job.kwargs).map_err(|why| bad_arguments(entry, &why))?;
    if entry.bind {
        // A bound task gets `self` (its request and `retry()`) before its arguments.
        let me = match me {
            Some(me) => me.clone(),
            None => super::context::running_bound(py)
                .and_then(|me| match me {
                    Some(me) => Ok(me),
                    None => super::context::bound(py, entry, job),
                })
                .map_err(|e| CallOutcome::Failure(error_from(py, e)))?,
        };
        let mut all = vec![me];
        all.extend(args.iter());
        args = PyTuple::new(py, all).map_err(|e| CallOutcome::Failure(error_from(py, e)))?;
    }
    // Hooks or task signals: the traced wrapper, whose arguments are checked before it runs.
    let traced = entry.traced();
    let (func, precise) = if traced {
        (&entry.trace, false)
    } else {
        (&entry.func, entry.precise)
    };
    if !precise {
        if let Some(why) = misfit(py, entry, &args, kwargs.as_ref()) {
            return Err(bad_arguments(entry, &why));
        }
    }
    match func.bind(py).call(&args, kwargs.as_ref()) {
        Ok(value) => Ok(value),
        Err(err) => {
            // For a plain function a TypeError either comes from the call itself (the arguments
            // do not fit, nothing ran) or from its body (a normal task failure): bind says which.
            if precise && err.is_instance_of::<PyTypeError>(py) {
                if let Some(why) = misfit(py, entry, &args, kwargs.as_ref()) {
                    return Err(bad_arguments(entry, &why));
                }
            }
            let exc = err.into_value(py);
            Err(super::retry::outcome_of(py, entry, exc.bind(py).as_any()))
        }
    }
}

/// Why the arguments do not fit the task's signature (`signature.bind`'s message), if they don't.
fn misfit(
    py: Python<'_>,
    entry: &Entry,
    args: &Bound<'_, PyTuple>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> Option<String> {
    let signature = entry.signature.as_ref()?.bind(py);
    match signature
        .getattr("bind")
        .and_then(|bind| bind.call(args, kwargs))
    {
        Ok(_) => None,
        Err(err) if err.is_instance_of::<PyTypeError>(py) => Some(err.value(py).str().map_or_else(
            |_| "(no message)".to_owned(),
            |s| s.to_string_lossy().into_owned(),
        )),
        Err(_) => None,
    }
}

fn bad_arguments(entry: &Entry, why: &str) -> CallOutcome {
    CallOutcome::Failure(TaskError::new(
        error_types::BAD_ARGUMENTS,
        format!("arguments do not fit {}: {why}", entry.display),
    ))
}

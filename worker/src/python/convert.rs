//! Python values into owned Rust values, on the Python thread: the helpers of `support.py`,
//! exceptions into `TaskError`s, return values into JSON.

use std::any::Any;
use std::ffi::CString;

use dbtask_protocol::{error_types, TaskError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyString, PyTuple};
use serde_json::value::RawValue;

use super::{CallOutcome, INTERNAL_ERROR};

/// The Python objects every call uses, made once per process.
pub(crate) struct Support {
    /// `json.loads`.
    pub decode: Py<PyAny>,
    /// A compact, `allow_nan=False` `JSONEncoder(...).encode`.
    pub encode: Py<PyAny>,
    /// `format_exception(exc) -> str`.
    pub format_exception: Py<PyAny>,
    /// `describe(name, fn) -> (signature | None, precise, display)`.
    pub describe: Py<PyAny>,
    /// `new_loop(wait) -> loop`: the asyncio thread's event loop.
    pub new_loop: Py<PyAny>,
    /// `start_loop(loop) -> (submit, stop, pending)`.
    pub start_loop: Py<PyAny>,
    /// `heartbeat(loop, beat, every)`: `beat()` from the loop every `every` seconds.
    pub heartbeat: Py<PyAny>,
}

static SUPPORT: PyOnceLock<Support> = PyOnceLock::new();

/// The helpers, loading `support.py` (as module `_dbtask_worker`) on first use.
pub(crate) fn support(py: Python<'_>) -> PyResult<&'static Support> {
    SUPPORT.get_or_try_init(py, || {
        let code = CString::new(include_str!("support.py")).expect("support.py has no NUL byte");
        let module =
            PyModule::from_code(py, &code, c"dbtask-worker/support.py", c"_dbtask_worker")?;
        let get = |name: &str| module.getattr(name).map(Bound::unbind);
        Ok(Support {
            decode: get("decode")?,
            encode: get("encode")?,
            format_exception: get("format_exception")?,
            describe: get("describe")?,
            new_loop: get("new_loop")?,
            start_loop: get("start_loop")?,
            heartbeat: get("heartbeat")?,
        })
    })
}

/// `ValueError` for builtins, `module.QualName` otherwise.
pub(crate) fn type_name(ty: &Bound<'_, PyAny>) -> String {
    let qualname = ty
        .getattr("__qualname__")
        .or_else(|_| ty.getattr("__name__"))
        .and_then(|q| q.str().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|_| "<unknown type>".to_owned());
    match ty
        .getattr("__module__")
        .and_then(|m| m.str().map(|s| s.to_string_lossy().into_owned()))
    {
        Ok(module) if module != "builtins" => format!("{module}.{qualname}"),
        _ => qualname,
    }
}

/// The recorded form of a raised error (its traceback attached, see [`task_error`]).
pub(crate) fn error_from(py: Python<'_>, err: PyErr) -> TaskError {
    // `into_value` sets `__traceback__`, which a fetched error only carries beside the value.
    task_error(py, err.into_value(py).bind(py))
}

/// The recorded form of an exception: qualified type name, `str(exc)` and the full traceback.
pub(crate) fn task_error(py: Python<'_>, exc: &Bound<'_, PyAny>) -> TaskError {
    let exc_type = type_name(&exc.get_type().into_any());
    let message = match exc.str() {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(e) => format!("<str() of the exception failed: {}>", describe_err(py, &e)),
    };
    let traceback = support(py)
        .and_then(|s| s.format_exception.bind(py).call1((exc,)))
        .and_then(|tb| tb.cast_into::<PyString>().map_err(PyErr::from))
        .map(|tb| tb.to_string_lossy().into_owned())
        .ok();
    TaskError {
        exc_type,
        message,
        traceback,
    }
}

/// `Type: message` of an error raised while handling another one (never raises).
fn describe_err(py: Python<'_>, err: &PyErr) -> String {
    let value = err.value(py);
    let name = type_name(&value.get_type().into_any());
    match value.str() {
        Ok(s) => format!("{name}: {}", s.to_string_lossy()),
        Err(_) => name,
    }
}

/// The JSON of a task's return value, or `dbtask.UnserializableResult` naming its type.
pub(crate) fn encode_result(py: Python<'_>, task: &str, value: &Bound<'_, PyAny>) -> CallOutcome {
    if value.is_none() {
        return CallOutcome::Success(null());
    }
    if let Some(raw) = encode_scalar(value) {
        return CallOutcome::Success(raw);
    }
    let unserializable = |why: String| {
        CallOutcome::Failure(TaskError::new(
            error_types::UNSERIALIZABLE_RESULT,
            format!(
                "the return value of {task} (of type {}) is not JSON-serializable: {why}",
                type_name(&value.get_type().into_any())
            ),
        ))
    };
    let encoded = match support(py).and_then(|s| s.encode.bind(py).call1((value,))) {
        Ok(encoded) => encoded,
        Err(e) => return unserializable(describe_err(py, &e)),
    };
    let text = match encoded
        .cast::<PyString>()
        .map_err(PyErr::from)
        .and_then(|s| s.to_str().map(str::to_owned))
    {
        Ok(text) => text,
        Err(e) => return unserializable(describe_err(py, &e)),
    };
    match RawValue::from_string(text) {
        Ok(raw) => CallOutcome::Success(raw),
        Err(e) => unserializable(e.to_string()),
    }
}

/// The JSON of an exact `int` (within i64), `bool`, finite `float` or `str`, written here
/// without a call into Python's encoder (most task results are one of these); `None` for
/// anything else, which the encoder handles (and refuses when it must: NaN, infinities).
fn encode_scalar(value: &Bound<'_, PyAny>) -> Option<Box<RawValue>> {
    use pyo3::types::{PyBool, PyFloat, PyInt};
    let text = if value.is_exact_instance_of::<PyBool>() {
        (if value.is_truthy().ok()? {
            "true"
        } else {
            "false"
        })
        .to_owned()
    } else if value.is_exact_instance_of::<PyInt>() {
        value.extract::<i64>().ok()?.to_string()
    } else if value.is_exact_instance_of::<PyFloat>() {
        let f = value.cast::<PyFloat>().ok()?.value();
        if !f.is_finite() {
            return None;
        }
        serde_json::to_string(&f).ok()?
    } else if value.is_exact_instance_of::<PyString>() {
        serde_json::to_string(value.cast::<PyString>().ok()?.to_str().ok()?).ok()?
    } else {
        return None;
    };
    RawValue::from_string(text).ok()
}

fn null() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("null is JSON")
}

/// `(args, kwargs)` decoded from the job's JSON, or the reason they are not an array and an
/// object.
pub(crate) fn decode_arguments<'py>(
    py: Python<'py>,
    args: &RawValue,
    kwargs: &RawValue,
) -> Result<(Bound<'py, PyTuple>, Option<Bound<'py, pyo3::types::PyDict>>), String> {
    let support = support(py).map_err(|e| describe_err(py, &e))?;
    let decode = |text: &str| {
        support
            .decode
            .bind(py)
            .call1((text,))
            .map_err(|e| describe_err(py, &e))
    };
    let args = match args.get().trim() {
        "[]" => PyTuple::empty(py),
        text => match scalar_args(py, text) {
            Some(args) => args,
            None => {
                let value = decode(text)?;
                let list = value.cast::<pyo3::types::PyList>().map_err(|_| {
                    format!(
                        "args must be a JSON array, not {}",
                        type_name(&value.get_type().into_any())
                    )
                })?;
                list.to_tuple()
            }
        },
    };
    let kwargs = match kwargs.get().trim() {
        "{}" | "null" => None,
        text => {
            let value = decode(text)?;
            let dict = value.cast_into::<pyo3::types::PyDict>().map_err(|e| {
                format!(
                    "kwargs must be a JSON object, not {}",
                    type_name(&e.into_inner().get_type().into_any())
                )
            })?;
            Some(dict)
        }
    };
    Ok((args, kwargs))
}

/// The arguments as a tuple when they are a JSON array of scalars only (numbers that fit an
/// i64 or are floats, strings, booleans, null), built here without a call to `json.loads`;
/// `None` for anything else (nested values, big integers, lone surrogates...), which
/// `json.loads` decodes exactly as before.
fn scalar_args<'py>(py: Python<'py>, text: &str) -> Option<Bound<'py, PyTuple>> {
    let items: Vec<&RawValue> = serde_json::from_str(text).ok()?;
    let mut values = Vec::with_capacity(items.len());
    for item in items {
        let raw = item.get();
        let value = match raw.as_bytes().first()? {
            b'"' => serde_json::from_str::<String>(raw)
                .ok()?
                .into_pyobject(py)
                .ok()?
                .into_any(),
            b't' | b'f' => pyo3::types::PyBool::new(py, raw == "true")
                .to_owned()
                .into_any(),
            b'n' => py.None().into_bound(py),
            b'-' | b'0'..=b'9' if raw.contains(['.', 'e', 'E']) => {
                pyo3::types::PyFloat::new(py, raw.parse::<f64>().ok()?).into_any()
            }
            b'-' | b'0'..=b'9' => raw.parse::<i64>().ok()?.into_pyobject(py).ok()?.into_any(),
            _ => return None,
        };
        values.push(value);
    }
    PyTuple::new(py, values).ok()
}

/// The outcome of a Rust panic while handling a job (a pyo3 extension called by the task may
/// panic too: pyo3 resumes such a panic when the exception reaches Rust).
pub(crate) fn panic_outcome(panic: Box<dyn Any + Send>) -> CallOutcome {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    CallOutcome::Failure(TaskError::new(
        INTERNAL_ERROR,
        format!("panic while running the task: {message}"),
    ))
}

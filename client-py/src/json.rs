//! Python arguments to JSON, written straight from the Python objects into the message buffer
//! (no intermediate `json.dumps` string or `serde_json::Value`).
//!
//! Accepted, as by `json.dumps`: None, bool, int, float, str, list, tuple, dict (and their
//! subclasses: IntEnum, StrEnum, namedtuple, OrderedDict...); dict keys may be str, int,
//! float, bool or None and become strings. Refused with a ValueError that names the type and
//! where it sits (`args[1]['when']`): everything else, NaN and infinities (not JSON), and
//! nesting deeper than [`MAX_DEPTH`] (which also catches circular references).

use std::cell::RefCell;
use std::fmt::Write as _;

use pyo3::prelude::*;
use pyo3::type_object::PyTypeInfo;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

use crate::error::ClientError;

/// Deepest accepted nesting of lists and dicts: the protocol's limit, past which the worker
/// records a message as malformed.
pub const MAX_DEPTH: usize = dbtask_protocol::MAX_JSON_DEPTH;

enum Step {
    Index(usize),
    Key(String),
}

#[derive(Default)]
struct Failure {
    /// Path from the failing value up to the root (pushed while unwinding).
    path: Vec<Step>,
    problem: Option<Problem>,
}

/// Why one value cannot be written as JSON. A failure of Python itself (a str that does not
/// encode, an int whose digits cannot be read) keeps the Python exception as its source.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("object of type {0} is not JSON-serializable")]
    Type(String),
    #[error("dict keys must be str, int, float, bool or None, not {0}")]
    KeyType(String),
    #[error("float {0} is not valid JSON (NaN and infinities have no JSON form)")]
    NotFinite(f64),
    #[error("nested deeper than {MAX_DEPTH} levels (a circular reference?)")]
    TooDeep,
    #[error("str is not valid UTF-8 ({0})")]
    Utf8(#[source] PyErr),
    #[error("cannot convert int: {0}")]
    Int(#[source] PyErr),
    /// The digits of an int beyond 64 bits are not a JSON number (cannot happen with
    /// Python's int, kept rather than unwrapped).
    #[error("cannot convert int: {0}")]
    IntDigits(#[source] serde_json::Error),
    /// serde_json stopped without one of the problems above.
    #[error("cannot be written as JSON ({0})")]
    Json(#[source] serde_json::Error),
}

/// A task argument that cannot be sent: where it sits (`args[1]['when']`) and why.
#[derive(Debug, thiserror::Error)]
#[error("task argument {at} cannot be sent: {problem}; arguments must be JSON-serializable (str, int, float, bool, None, list, tuple, dict)")]
pub struct ArgumentError {
    pub at: String,
    #[source]
    pub problem: Problem,
}

struct Value<'a, 'py> {
    obj: &'a Bound<'py, PyAny>,
    depth: usize,
    failure: &'a RefCell<Failure>,
}

impl<'py> Value<'_, 'py> {
    fn fail<E: serde::ser::Error>(&self, problem: Problem) -> E {
        self.failure.borrow_mut().problem = Some(problem);
        E::custom("not JSON-serializable")
    }

    fn child<'b>(&'b self, obj: &'b Bound<'py, PyAny>) -> Value<'b, 'py> {
        Value {
            obj,
            depth: self.depth + 1,
            failure: self.failure,
        }
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    let ty = obj.get_type();
    match (ty.module(), ty.qualname()) {
        (Ok(m), Ok(q)) if m.to_str().map(|m| m != "builtins").unwrap_or(false) => {
            format!("{m}.{q}")
        }
        (_, Ok(q)) => q.to_string(),
        _ => "<unknown type>".to_owned(),
    }
}

fn int_json(obj: &Bound<'_, PyAny>) -> Result<IntJson, Problem> {
    if let Ok(v) = obj.extract::<i64>() {
        return Ok(IntJson::I(v));
    }
    if let Ok(v) = obj.extract::<u64>() {
        return Ok(IntJson::U(v));
    }
    // Beyond 64 bits: JSON numbers have no size limit and Python's json reads them back as
    // int, so write the decimal digits as they are.
    let digits = PyInt::type_object(obj.py())
        .call1((obj,))
        .and_then(|i| i.str())
        .map_err(Problem::Int)?;
    let raw = RawValue::from_string(digits.to_string()).map_err(Problem::IntDigits)?;
    Ok(IntJson::Big(raw))
}

enum IntJson {
    I(i64),
    U(u64),
    Big(Box<RawValue>),
}

fn float_json(v: f64) -> Result<f64, Problem> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Problem::NotFinite(v))
    }
}

fn key_string(key: &Bound<'_, PyAny>) -> Result<String, Problem> {
    if let Ok(s) = key.cast::<PyString>() {
        return s.to_str().map(str::to_owned).map_err(Problem::Utf8);
    }
    if key.is_none() {
        return Ok("null".into());
    }
    if let Ok(b) = key.cast::<PyBool>() {
        return Ok(if b.is_true() { "true" } else { "false" }.into());
    }
    if key.is_instance_of::<PyInt>() {
        return match int_json(key)? {
            IntJson::I(v) => Ok(v.to_string()),
            IntJson::U(v) => Ok(v.to_string()),
            IntJson::Big(raw) => Ok(raw.get().to_owned()),
        };
    }
    if let Ok(f) = key.cast::<PyFloat>() {
        let v = float_json(f.value())?;
        return Ok(serde_json::Number::from_f64(v)
            .map(|n| n.to_string())
            .unwrap_or_default());
    }
    Err(Problem::KeyType(type_name(key)))
}

impl Serialize for Value<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let obj = self.obj;
        // Exact types first: the common case costs one pointer comparison each.
        if let Ok(s) = obj.cast_exact::<PyString>() {
            return match s.to_str() {
                Ok(s) => serializer.serialize_str(s),
                Err(e) => Err(self.fail(Problem::Utf8(e))),
            };
        }
        if obj.is_none() {
            return serializer.serialize_unit();
        }
        if let Ok(b) = obj.cast_exact::<PyBool>() {
            return serializer.serialize_bool(b.is_true());
        }
        if obj.is_exact_instance_of::<PyInt>()
            || (obj.is_instance_of::<PyInt>() && !obj.is_instance_of::<PyBool>())
        {
            return match int_json(obj) {
                Ok(IntJson::I(v)) => serializer.serialize_i64(v),
                Ok(IntJson::U(v)) => serializer.serialize_u64(v),
                Ok(IntJson::Big(raw)) => raw.serialize(serializer),
                Err(p) => Err(self.fail(p)),
            };
        }
        if let Ok(f) = obj.cast::<PyFloat>() {
            return match float_json(f.value()) {
                Ok(v) => serializer.serialize_f64(v),
                Err(p) => Err(self.fail(p)),
            };
        }
        if let Ok(list) = obj.cast::<PyList>() {
            self.check_depth()?;
            let mut seq = serializer.serialize_seq(Some(list.len()))?;
            for (i, item) in list.iter().enumerate() {
                if let Err(e) = seq.serialize_element(&self.child(&item)) {
                    self.failure.borrow_mut().path.push(Step::Index(i));
                    return Err(e);
                }
            }
            return seq.end();
        }
        if let Ok(tuple) = obj.cast::<PyTuple>() {
            self.check_depth()?;
            let mut seq = serializer.serialize_seq(Some(tuple.len()))?;
            for (i, item) in tuple.iter().enumerate() {
                if let Err(e) = seq.serialize_element(&self.child(&item)) {
                    self.failure.borrow_mut().path.push(Step::Index(i));
                    return Err(e);
                }
            }
            return seq.end();
        }
        if let Ok(dict) = obj.cast::<PyDict>() {
            self.check_depth()?;
            let mut map = serializer.serialize_map(Some(dict.len()))?;
            for (key, value) in dict.iter() {
                let key = match key_string(&key) {
                    Ok(k) => k,
                    Err(p) => return Err(self.fail(p)),
                };
                if let Err(e) = map.serialize_entry(&key, &self.child(&value)) {
                    self.failure.borrow_mut().path.push(Step::Key(key));
                    return Err(e);
                }
            }
            return map.end();
        }
        if obj.is_instance_of::<PyString>() {
            // A str subclass (StrEnum...): its str value.
            return match obj
                .cast::<PyString>()
                .map_err(PyErr::from)
                .and_then(|s| s.to_str().map(str::to_owned))
            {
                Ok(s) => serializer.serialize_str(&s),
                Err(e) => Err(self.fail(Problem::Utf8(e))),
            };
        }
        Err(self.fail(Problem::Type(type_name(obj))))
    }
}

impl Value<'_, '_> {
    fn check_depth<E: serde::ser::Error>(&self) -> Result<(), E> {
        if self.depth >= MAX_DEPTH {
            Err(self.fail(Problem::TooDeep))
        } else {
            Ok(())
        }
    }
}

/// Where the failing value sits, as Python would index it from `root`: `args[1]['when']`.
fn path(root: &str, steps: &[Step]) -> String {
    let mut at = root.to_owned();
    for step in steps.iter().rev() {
        match step {
            Step::Index(i) => {
                let _ = write!(at, "[{i}]");
            }
            Step::Key(k) => {
                // As Python shows a str key: ['when'].
                let quoted = k.replace('\\', "\\\\").replace('\'', "\\'");
                let _ = write!(at, "['{quoted}']");
            }
        }
    }
    at
}

/// Serializes `obj` (the task's positional arguments, `root` = "args", or keyword arguments,
/// `root` = "kwargs") into a JSON value.
pub fn to_raw_json(obj: &Bound<'_, PyAny>, root: &str) -> Result<Box<RawValue>, ClientError> {
    let failure = RefCell::new(Failure::default());
    let value = Value {
        obj,
        depth: 0,
        failure: &failure,
    };
    serde_json::value::to_raw_value(&value).map_err(|e| {
        let failure = failure.into_inner();
        ClientError::from(ArgumentError {
            at: path(root, &failure.path),
            problem: failure.problem.unwrap_or(Problem::Json(e)),
        })
    })
}

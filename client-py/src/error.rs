//! The client's errors, as owned Rust values: they cross the tokio threads without the GIL
//! and become Python exceptions only when a Python thread delivers them.

use std::sync::Arc;

use pyo3::exceptions::{PyConnectionError, PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::{PyErr, Python};

use crate::json::{ArgumentError, Problem};
use crate::notify::Down;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// NATS or Redis cannot be reached, or the connection broke (Python `ConnectionError`).
    #[error("{0}")]
    Connection(String),
    /// The shared Redis pub/sub connection of `wait` is down, and why (Python
    /// `ConnectionError`).
    #[error(transparent)]
    PubSub(Arc<Down>),
    /// A wait with a timeout rode out an outage until its deadline (Python `ConnectionError`).
    #[error("{source}; still unreachable after waiting {secs:.3} s for task {task_id}")]
    StillDown {
        task_id: String,
        secs: f64,
        source: Box<ClientError>,
    },
    /// Bad input: a name, an id, a message too large (Python `ValueError`).
    #[error("{0}")]
    Value(String),
    /// A name, id or message the protocol refuses (Python `ValueError`).
    #[error(transparent)]
    Protocol(#[from] dbtask_protocol::ProtocolError),
    /// A task argument that is not JSON (Python `ValueError`, whose `__cause__` is the Python
    /// exception underneath, when there is one).
    #[error(transparent)]
    Argument(#[from] ArgumentError),
    /// `wait(timeout=...)` expired (Python `TimeoutError`).
    #[error("{0}")]
    Timeout(String),
    /// Anything else (Python `RuntimeError`).
    #[error("{0}")]
    Runtime(String),
}

impl ClientError {
    /// Whether the error says a server cannot be reached (Python `ConnectionError`).
    pub(crate) fn is_connection(&self) -> bool {
        matches!(
            self,
            ClientError::Connection(_) | ClientError::PubSub(_) | ClientError::StillDown { .. }
        )
    }
}

impl From<ClientError> for PyErr {
    fn from(err: ClientError) -> PyErr {
        if err.is_connection() {
            return PyConnectionError::new_err(err.to_string());
        }
        match err {
            ClientError::Value(m) => PyValueError::new_err(m),
            ClientError::Protocol(e) => PyValueError::new_err(e.to_string()),
            ClientError::Argument(e) => {
                let raised = PyValueError::new_err(e.to_string());
                if let Problem::Utf8(cause) | Problem::Int(cause) = e.problem {
                    Python::attach(|py| raised.set_cause(py, Some(cause)));
                }
                raised
            }
            ClientError::Timeout(m) => PyTimeoutError::new_err(m),
            other => PyRuntimeError::new_err(other.to_string()),
        }
    }
}

/// URL redaction and user-info decoding: the one implementation of each, shared with the worker.
pub use dbtask_protocol::{percent_decode, redact_url};

//! The client's errors, as owned Rust values: they cross the tokio threads without the GIL
//! and become Python exceptions only when a Python thread delivers them.

use pyo3::exceptions::{PyConnectionError, PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::PyErr;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// NATS or Redis cannot be reached, or the connection broke (Python `ConnectionError`).
    #[error("{0}")]
    Connection(String),
    /// Bad input: a name, an id, arguments that are not JSON, a message too large
    /// (Python `ValueError`).
    #[error("{0}")]
    Value(String),
    /// `wait(timeout=...)` expired (Python `TimeoutError`).
    #[error("{0}")]
    Timeout(String),
    /// Anything else (Python `RuntimeError`).
    #[error("{0}")]
    Runtime(String),
}

impl From<ClientError> for PyErr {
    fn from(err: ClientError) -> PyErr {
        match err {
            ClientError::Connection(m) => PyConnectionError::new_err(m),
            ClientError::Value(m) => PyValueError::new_err(m),
            ClientError::Timeout(m) => PyTimeoutError::new_err(m),
            ClientError::Runtime(m) => PyRuntimeError::new_err(m),
        }
    }
}

impl From<dbtask_protocol::ProtocolError> for ClientError {
    fn from(err: dbtask_protocol::ProtocolError) -> Self {
        ClientError::Value(err.to_string())
    }
}

/// URL redaction and user-info decoding: the one implementation of each, shared with the worker.
pub use dbtask_protocol::{percent_decode, redact_url};

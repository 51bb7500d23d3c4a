//! The client's errors, as owned Rust values: they cross the tokio threads without the GIL
//! and become Python exceptions only when a Python thread delivers them.

use std::sync::Arc;

use pyo3::exceptions::{PyConnectionError, PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::{PyErr, Python};

use crate::json::{ArgumentError, Problem};
use crate::notify::Down;

/// The library error underneath a [`ClientError`] (async-nats', redis-rs', serde_json's...).
pub type Source = Box<dyn std::error::Error + Send + Sync>;

/// What a call of the client failed with. The kind decides the Python exception; `what` is
/// its message, which names the library error when there is one, kept as `source`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// NATS or Redis cannot be reached, or the connection broke (Python `ConnectionError`).
    #[error("{what}")]
    Connection {
        what: String,
        #[source]
        source: Option<Source>,
    },
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
    /// Bad input: a name, an id, a URL, a message too large (Python `ValueError`).
    #[error("{what}")]
    Value {
        what: String,
        #[source]
        source: Option<Source>,
    },
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
    #[error("{what}")]
    Runtime {
        what: String,
        #[source]
        source: Option<Source>,
    },
}

impl ClientError {
    /// A server cannot be reached (Python `ConnectionError`).
    pub(crate) fn connection(what: impl Into<String>) -> ClientError {
        ClientError::Connection {
            what: what.into(),
            source: None,
        }
    }

    /// Bad input (Python `ValueError`).
    pub(crate) fn value(what: impl Into<String>) -> ClientError {
        ClientError::Value {
            what: what.into(),
            source: None,
        }
    }

    /// Anything else (Python `RuntimeError`).
    pub(crate) fn runtime(what: impl Into<String>) -> ClientError {
        ClientError::Runtime {
            what: what.into(),
            source: None,
        }
    }

    /// The same error, keeping `cause` (which its message already describes) as its source.
    pub(crate) fn because(self, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        match self {
            ClientError::Connection { what, .. } => ClientError::Connection {
                what,
                source: Some(Box::new(cause)),
            },
            ClientError::Value { what, .. } => ClientError::Value {
                what,
                source: Some(Box::new(cause)),
            },
            ClientError::Runtime { what, .. } => ClientError::Runtime {
                what,
                source: Some(Box::new(cause)),
            },
            other => other,
        }
    }

    /// Whether the error says a server cannot be reached (Python `ConnectionError`).
    pub(crate) fn is_connection(&self) -> bool {
        matches!(
            self,
            ClientError::Connection { .. } | ClientError::PubSub(_) | ClientError::StillDown { .. }
        )
    }

    /// Whether the error is about the caller's input (Python `ValueError`).
    pub(crate) fn is_value(&self) -> bool {
        matches!(
            self,
            ClientError::Value { .. } | ClientError::Protocol(_) | ClientError::Argument(_)
        )
    }
}

impl From<ClientError> for PyErr {
    fn from(err: ClientError) -> PyErr {
        if err.is_connection() {
            return PyConnectionError::new_err(err.to_string());
        }
        match err {
            ClientError::Argument(e) => {
                let raised = PyValueError::new_err(e.to_string());
                if let Problem::Utf8(cause) | Problem::Int(cause) = e.problem {
                    Python::attach(|py| raised.set_cause(py, Some(cause)));
                }
                raised
            }
            e if e.is_value() => PyValueError::new_err(e.to_string()),
            ClientError::Timeout(m) => PyTimeoutError::new_err(m),
            other => PyRuntimeError::new_err(other.to_string()),
        }
    }
}

/// URL redaction: the one implementation, shared with the worker (the seeds' user info is
/// decoded in `dbtask_protocol::seeds`).
pub use dbtask_protocol::redact_url;

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn an_error_keeps_the_library_error_it_came_from() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err =
            ClientError::connection("cannot reach Redis at redis://h:1 (refused)").because(refused);
        assert!(err.is_connection() && !err.is_value());
        assert_eq!(
            err.to_string(),
            "cannot reach Redis at redis://h:1 (refused)"
        );
        let io = err
            .source()
            .and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(
            io.map(|e| e.kind()),
            Some(std::io::ErrorKind::ConnectionRefused)
        );

        // Wrapped again (as publish_many does), the chain goes down to the first cause.
        let wrapped = ClientError::connection("publish_many: 3 of 10 confirmed").because(err);
        let mut depth = 0;
        let mut next = wrapped.source();
        while let Some(e) = next {
            depth += 1;
            next = e.source();
        }
        assert_eq!(depth, 2);
    }
}

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

/// A URL as it may be printed: the one implementation, shared with the worker.
pub use dbtask_protocol::redact_url;

/// Percent-decodes URL user info (`%40` -> `@`).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_is_percent_decoded() {
        assert_eq!(percent_decode("p%40ss%3Aw"), "p@ss:w");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}

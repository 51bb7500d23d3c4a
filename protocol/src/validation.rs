//! Names and ids are checked before they become subjects, keys or headers.

use crate::PROTOCOL_VERSION;

/// Longest accepted queue name.
pub const MAX_QUEUE_NAME_LEN: usize = 64;
/// Longest accepted task name.
pub const MAX_TASK_NAME_LEN: usize = 200;
/// Longest accepted task id.
pub const MAX_TASK_ID_LEN: usize = 128;

/// Why a name, id or message was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid queue name {0:?}: use 1 to 64 characters among A-Z a-z 0-9 _ -")]
    InvalidQueue(String),
    #[error("invalid task name {0:?}: use 1 to 200 printable characters without spaces")]
    InvalidTaskName(String),
    #[error("invalid task id {0:?}: use 1 to 128 characters among A-Z a-z 0-9 _ - . :")]
    InvalidTaskId(String),
    /// The body is not the JSON of a task message; serde_json's error is the source.
    #[error("message is not a dbtask task message: {0}")]
    Json(#[source] serde_json::Error),
    /// The JSON is a task message, but one that breaks a rule the error states.
    #[error("message is not a dbtask task message: {0}")]
    Malformed(String),
    #[error("message has protocol version {0}, this worker understands up to {PROTOCOL_VERSION}: upgrade the worker")]
    UnsupportedVersion(u32),
}

/// Queue names become NATS subject tokens and consumer names, so only a safe alphabet passes.
pub fn validate_queue(queue: &str) -> Result<(), ProtocolError> {
    let ok = !queue.is_empty()
        && queue.len() <= MAX_QUEUE_NAME_LEN
        && queue
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::InvalidQueue(queue.to_owned()))
    }
}

/// Task names are Python-style dotted names; anything printable without white space passes.
pub fn validate_task_name(name: &str) -> Result<(), ProtocolError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TASK_NAME_LEN
        && name.chars().all(|c| !c.is_whitespace() && !c.is_control());
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::InvalidTaskName(name.to_owned()))
    }
}

/// Task ids are Redis key and NATS header material: a safe alphabet only.
pub fn validate_task_id(id: &str) -> Result<(), ProtocolError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_TASK_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::InvalidTaskId(id.to_owned()))
    }
}

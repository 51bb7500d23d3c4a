//! Optional message signing (`--message-key` on the worker, `message_key=` in `init()`): an
//! HMAC-SHA256 over what decides what runs and where, so that a worker with a key runs only
//! messages made by someone holding it. Publish permission on NATS is then not enough to run a
//! task or overwrite its result (docs/security.md).
//!
//! Signed: the subject the message is delivered on (a message schedule's target, not the
//! schedule's own subject), the task id and task name headers, and the body, each
//! length-prefixed so that no two inputs sign alike. The header is `Dbtask-Signature:
//! v1=<64 hex digits>`. A message schedule's ticks and a dead letter's replay keep their
//! headers and body, so they stay valid; the worker signs what it publishes itself (retries,
//! workflow steps, tasks sent back to wait for their eta).

use std::path::Path;

use async_nats::HeaderMap;
use ring::hmac;

use crate::{HEADER_SCHEDULE_TARGET, HEADER_TASK, HEADER_TASK_ID};

/// The header carrying the signature.
pub const HEADER_SIGNATURE: &str = "Dbtask-Signature";

/// Shortest key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

const VERSION: &str = "v1=";

/// A message key, read from a file.
pub struct MessageKey(hmac::Key);

impl std::fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageKey(***)")
    }
}

impl MessageKey {
    /// The key in `path`: the file's bytes, without a trailing line break. The error says
    /// what is wrong and never quotes the file.
    pub fn from_file(path: &Path) -> Result<MessageKey, String> {
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "file not found".to_owned(),
            _ => format!("cannot read it: {e}"),
        })?;
        let key = bytes.trim_ascii_end();
        if key.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the key is {} bytes: use at least {MIN_KEY_BYTES} random bytes (e.g. `openssl rand -hex 32 > FILE`)",
                key.len()
            ));
        }
        Ok(MessageKey::new(key))
    }

    pub fn new(key: &[u8]) -> MessageKey {
        MessageKey(hmac::Key::new(hmac::HMAC_SHA256, key))
    }

    fn context(&self, subject: &str, id: &str, task: &str, body: &[u8]) -> hmac::Context {
        let mut ctx = hmac::Context::with_key(&self.0);
        for part in [subject.as_bytes(), id.as_bytes(), task.as_bytes(), body] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        ctx
    }

    /// The signature header's value for a message delivered on `subject`.
    pub fn sign(&self, subject: &str, id: &str, task: &str, body: &[u8]) -> String {
        let tag = self.context(subject, id, task, body).sign();
        let mut out = String::with_capacity(VERSION.len() + 64);
        out.push_str(VERSION);
        for byte in tag.as_ref() {
            out.push_str(&format!("{byte:02x}"));
        }
        out
    }

    /// Signs a message about to be published on `subject` with `headers` (the task's own,
    /// see [`crate::task_headers`]).
    pub fn sign_headers(&self, headers: &mut HeaderMap, subject: &str, body: &[u8]) {
        let get = |name| headers.get(name).map(|v| v.as_str()).unwrap_or("");
        let delivered_on = headers
            .get(HEADER_SCHEDULE_TARGET)
            .map_or(subject, |v| v.as_str());
        let signature = self.sign(delivered_on, get(HEADER_TASK_ID), get(HEADER_TASK), body);
        headers.insert(HEADER_SIGNATURE, signature);
    }

    /// Checks a message delivered on `subject`; the error says what is wrong with it.
    pub fn verify(
        &self,
        headers: Option<&HeaderMap>,
        subject: &str,
        body: &[u8],
    ) -> Result<(), &'static str> {
        let get = |name| {
            headers
                .and_then(|h| h.get(name))
                .map(|v| v.as_str())
                .unwrap_or("")
        };
        let given = get(HEADER_SIGNATURE);
        if given.is_empty() {
            return Err("unsigned: the message has no Dbtask-Signature header, and this worker runs only messages signed with its --message-key");
        }
        let tag = given
            .strip_prefix(VERSION)
            .and_then(decode_hex)
            .ok_or("the Dbtask-Signature header is not v1=<64 hex digits>")?;
        let expected = self
            .context(subject, get(HEADER_TASK_ID), get(HEADER_TASK), body)
            .sign();
        // Every byte compared, whatever differs first: the time says nothing of the tag.
        let differs = expected
            .as_ref()
            .iter()
            .zip(&tag)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if differs == 0 && tag.len() == expected.as_ref().len() {
            Ok(())
        } else {
            Err("wrong signature: the message was not signed with this worker's --message-key, or was changed since")
        }
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 {
        return None;
    }
    (0..64)
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(id: &str, task: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER_TASK_ID, id);
        h.insert(HEADER_TASK, task);
        h
    }

    #[test]
    fn a_signed_message_verifies_and_any_change_breaks_it() {
        let key = MessageKey::new(&[7; 32]);
        let mut h = headers("t1", "add");
        key.sign_headers(&mut h, "dbtask.tasks.default", b"{}");
        assert!(key.verify(Some(&h), "dbtask.tasks.default", b"{}").is_ok());
        assert!(
            key.verify(Some(&h), "dbtask.tasks.other", b"{}").is_err(),
            "another queue"
        );
        assert!(
            key.verify(Some(&h), "dbtask.tasks.default", b"{ }")
                .is_err(),
            "another body"
        );
        let mut renamed = h.clone();
        renamed.insert(HEADER_TASK, "os.system");
        assert!(key
            .verify(Some(&renamed), "dbtask.tasks.default", b"{}")
            .is_err());
        let other = MessageKey::new(&[8; 32]);
        assert!(other
            .verify(Some(&h), "dbtask.tasks.default", b"{}")
            .unwrap_err()
            .starts_with("wrong signature"));
        assert!(key
            .verify(Some(&headers("t1", "add")), "dbtask.tasks.default", b"{}")
            .unwrap_err()
            .starts_with("unsigned"));
        assert!(key.verify(None, "dbtask.tasks.default", b"{}").is_err());
        let mut garbled = h.clone();
        garbled.insert(HEADER_SIGNATURE, "v1=zz");
        assert!(key
            .verify(Some(&garbled), "dbtask.tasks.default", b"{}")
            .unwrap_err()
            .contains("not v1="));
    }

    #[test]
    fn a_scheduled_message_is_signed_for_the_subject_it_is_delivered_on() {
        let key = MessageKey::new(&[7; 32]);
        let mut h = headers("t1", "add");
        h.insert(HEADER_SCHEDULE_TARGET, "dbtask.tasks.default");
        key.sign_headers(&mut h, "dbtask.sched.default.t1", b"{}");
        assert!(key.verify(Some(&h), "dbtask.tasks.default", b"{}").is_ok());
    }

    #[test]
    fn short_and_missing_key_files_are_refused_without_quoting_them() {
        let dir = std::env::temp_dir().join(format!("dbtask-key-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "secret\n").unwrap();
        let e = MessageKey::from_file(&short).unwrap_err();
        assert!(e.contains("6 bytes") && !e.contains("secret"), "{e}");
        assert_eq!(
            MessageKey::from_file(&dir.join("none")).unwrap_err(),
            "file not found"
        );
        let good = dir.join("good");
        std::fs::write(&good, format!("{}\n", "ab".repeat(32))).unwrap();
        assert!(MessageKey::from_file(&good).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Operator commands on JetStream for the `dbtask` command line: list, show, replay and purge
//! dead letters (stream `DBTASK_DEAD`). Blocking methods only (a command line has no event
//! loop); they run on the client's I/O thread with the GIL released.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::stream::{LastRawMessageErrorKind, RawMessageError, Stream};
use async_nats::jetstream::{self, context::GetStreamErrorKind, ErrorCode};
use async_nats::HeaderMap;
use dbtask_protocol as protocol;
use protocol::{dead_headers, DEAD_STREAM, DEAD_SUBJECT_WILDCARD, TASK_STREAM};
use pyo3::prelude::*;

use crate::connection::connect_nats;
use crate::error::{redact_url, ClientError};
use crate::runtime;
use crate::security::NatsSecurity;

/// One dead letter: (sequence, subject, headers, body as text).
type Letter = (u64, String, HashMap<String, String>, String);

/// A NATS connection for operator commands.
#[pyclass(module = "dbtask._dbtask", frozen)]
pub struct Admin {
    js: jetstream::Context,
    safe: String,
}

fn no_message(e: &RawMessageError) -> bool {
    matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound)
}

fn headers_map(headers: &HeaderMap) -> HashMap<String, String> {
    headers
        .iter()
        .map(|(name, values)| {
            let value = values
                .first()
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            (AsRef::<str>::as_ref(name).to_owned(), value)
        })
        .collect()
}

impl Admin {
    /// The dead-letter stream, `None` when it does not exist (nothing was ever dead-lettered).
    async fn dead_stream(&self) -> Result<Option<Stream>, ClientError> {
        match self.js.get_stream(DEAD_STREAM).await {
            Ok(stream) => Ok(Some(stream)),
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(err)
                    if err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(None)
                }
                _ => Err(ClientError::connection(format!(
                    "cannot read stream {DEAD_STREAM} on NATS at {}: {e}",
                    self.safe
                ))
                .because(e)),
            },
        }
    }

    fn failed(&self, what: &str, e: impl std::error::Error + Send + Sync + 'static) -> ClientError {
        ClientError::connection(format!("cannot {what} on NATS at {}: {e}", self.safe)).because(e)
    }

    async fn letter(&self, stream: &Stream, sequence: u64) -> Result<Option<Letter>, ClientError> {
        match stream.get_raw_message(sequence).await {
            Ok(m) => Ok(Some((
                m.sequence,
                m.subject.to_string(),
                headers_map(&m.headers),
                String::from_utf8_lossy(&m.payload).into_owned(),
            ))),
            Err(e) if no_message(&e) => Ok(None),
            Err(e) => Err(self.failed(&format!("read dead letter {sequence}"), e)),
        }
    }
}

#[pymethods]
impl Admin {
    /// Connects to NATS (the URL may hold credentials; errors show it without them); the
    /// `nats_*` files secure the connection (TLS, credentials), as for `Client.connect`.
    #[staticmethod]
    #[pyo3(signature = (nats_url, timeout=5.0, *, nats_tls_ca=None, nats_tls_cert=None, nats_tls_key=None, nats_creds=None, nats_nkey=None))]
    // One Rust parameter per Python parameter of the signature in _dbtask.pyi.
    #[allow(clippy::too_many_arguments)]
    fn connect_sync(
        py: Python<'_>,
        nats_url: String,
        timeout: f64,
        nats_tls_ca: Option<PathBuf>,
        nats_tls_cert: Option<PathBuf>,
        nats_tls_key: Option<PathBuf>,
        nats_creds: Option<PathBuf>,
        nats_nkey: Option<PathBuf>,
    ) -> PyResult<Admin> {
        let security = NatsSecurity::new(
            nats_tls_ca,
            nats_tls_cert,
            nats_tls_key,
            nats_creds,
            nats_nkey,
            None,
        );
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(ClientError::value(format!(
                "timeout must be a positive number of seconds, not {timeout}"
            ))
            .into());
        }
        let safe = redact_url(&nats_url);
        let shown = safe.clone();
        // The JetStream context spawns a task: it must be made on the runtime.
        let js = runtime::block_on(py, async move {
            let client = connect_nats(
                &nats_url,
                &shown,
                Duration::from_secs_f64(timeout),
                &security,
            )
            .await?;
            Ok(jetstream::new(client))
        })?;
        Ok(Admin { js, safe })
    }

    /// Dead letters from sequence `start` on (of `queue` only, if given), at most `limit`.
    #[pyo3(signature = (queue=None, start=1, limit=100))]
    fn dead_list(
        &self,
        py: Python<'_>,
        queue: Option<String>,
        start: u64,
        limit: usize,
    ) -> PyResult<Vec<Letter>> {
        if let Some(q) = &queue {
            protocol::validate_queue(q).map_err(ClientError::from)?;
        }
        let this = Admin {
            js: self.js.clone(),
            safe: self.safe.clone(),
        };
        runtime::block_on(py, async move {
            let Some(stream) = this.dead_stream().await? else {
                return Ok(Vec::new());
            };
            let subject = match &queue {
                Some(q) => protocol::dead_subject(q),
                None => DEAD_SUBJECT_WILDCARD.to_owned(),
            };
            let mut letters = Vec::new();
            let mut next = start.max(1);
            while letters.len() < limit {
                let found = stream
                    .raw_message_builder()
                    .sequence(next)
                    .next_by_subject(subject.clone())
                    .send()
                    .await;
                match found {
                    Ok(m) => {
                        next = m.sequence + 1;
                        letters.push((
                            m.sequence,
                            m.subject.to_string(),
                            headers_map(&m.headers),
                            String::from_utf8_lossy(&m.payload).into_owned(),
                        ));
                    }
                    Err(e) if no_message(&e) => break,
                    Err(e) => return Err(this.failed("list dead letters", e)),
                }
            }
            Ok(letters)
        })
    }

    /// One dead letter, or None.
    fn dead_get(&self, py: Python<'_>, sequence: u64) -> PyResult<Option<Letter>> {
        let this = Admin {
            js: self.js.clone(),
            safe: self.safe.clone(),
        };
        runtime::block_on(py, async move {
            match this.dead_stream().await? {
                Some(stream) => this.letter(&stream, sequence).await,
                None => Ok(None),
            }
        })
    }

    /// Publishes dead letter `sequence` again to the subject it was dead-lettered from (its
    /// original headers and body, a fresh message id), then deletes it from the dead-letter
    /// stream. Returns (task subject, sequence in the task stream); ValueError if there is no
    /// such dead letter.
    fn dead_replay(&self, py: Python<'_>, sequence: u64) -> PyResult<(String, u64)> {
        let this = Admin {
            js: self.js.clone(),
            safe: self.safe.clone(),
        };
        runtime::block_on(py, async move {
            let missing = || {
                ClientError::value(format!(
                    "no dead letter {sequence} in stream {DEAD_STREAM} (see `dbtask dead list`)"
                ))
            };
            let stream = this.dead_stream().await?.ok_or_else(missing)?;
            let original = match stream.get_raw_message(sequence).await {
                Ok(m) => m,
                Err(e) if no_message(&e) => return Err(missing()),
                Err(e) => return Err(this.failed(&format!("read dead letter {sequence}"), e)),
            };
            let subject = original
                .headers
                .get(dead_headers::SUBJECT)
                .map(|v| v.as_str().to_owned())
                .filter(|s| s.starts_with(protocol::TASK_SUBJECT_PREFIX))
                .ok_or_else(|| {
                    ClientError::value(format!(
                        "dead letter {sequence} has no valid {} header: it was not written by a dbtask worker",
                        dead_headers::SUBJECT
                    ))
                })?;
            let mut headers = HeaderMap::new();
            for (name, values) in original.headers.iter() {
                let name: &str = name.as_ref();
                if name.starts_with("Dbtask-Dead-") || name.starts_with("Nats-") {
                    continue;
                }
                for value in values {
                    headers.append(name, value.as_str());
                }
            }
            // A fresh id: the task id may still be in the task stream's duplicate window.
            headers.insert(
                protocol::HEADER_MSG_ID,
                protocol::replay_msg_id(sequence, protocol::now_unix()),
            );
            let ack = this
                .js
                .publish_with_headers(subject.clone(), headers, original.payload.clone())
                .await
                .map_err(|e| this.failed(&format!("publish to {subject}"), e))?
                .await
                .map_err(|e| {
                    this.failed(
                        &format!("publish to {subject} (is the {TASK_STREAM} stream there?)"),
                        e,
                    )
                })?;
            stream
                .delete_message(sequence)
                .await
                .map_err(|e| this.failed(&format!("delete dead letter {sequence}"), e))?;
            Ok((subject, ack.sequence))
        })
    }

    /// Deletes every dead letter (of `queue` only, if given); returns how many.
    #[pyo3(signature = (queue=None))]
    fn dead_purge(&self, py: Python<'_>, queue: Option<String>) -> PyResult<u64> {
        if let Some(q) = &queue {
            protocol::validate_queue(q).map_err(ClientError::from)?;
        }
        let this = Admin {
            js: self.js.clone(),
            safe: self.safe.clone(),
        };
        runtime::block_on(py, async move {
            let Some(stream) = this.dead_stream().await? else {
                return Ok(0);
            };
            let purged = match &queue {
                Some(q) => stream.purge().filter(protocol::dead_subject(q)).await,
                None => stream.purge().await,
            };
            purged
                .map(|p| p.purged)
                .map_err(|e| this.failed("purge dead letters", e))
        })
    }
}

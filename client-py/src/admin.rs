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
use crate::inspect::{purge_queue, request_all, subscribe_events, EventSubscription};
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

/// Messages of `stream` on `subject` from sequence `start` on, at most `limit`, read one by one
/// with direct gets (nothing is consumed, even from a work-queue stream).
async fn list_messages(
    stream: &Stream,
    subject: &str,
    start: u64,
    limit: usize,
) -> Result<Vec<Letter>, RawMessageError> {
    let mut letters = Vec::new();
    let mut next = start.max(1);
    while letters.len() < limit {
        let found = stream
            .raw_message_builder()
            .sequence(next)
            .next_by_subject(subject.to_owned())
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
            Err(e) => return Err(e),
        }
    }
    Ok(letters)
}

impl Admin {
    /// Another handle on the same connection, to move into a future.
    fn handle(&self) -> Admin {
        Admin {
            js: self.js.clone(),
            safe: self.safe.clone(),
        }
    }

    /// The task stream (made by the first worker or client).
    async fn task_stream(&self) -> Result<Stream, ClientError> {
        self.js.get_stream(TASK_STREAM).await.map_err(|e| {
            ClientError::connection(format!(
                "cannot read stream {TASK_STREAM} on NATS at {} (has a worker or client ever run against it?): {e}",
                self.safe
            ))
            .because(e)
        })
    }

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
            list_messages(&stream, &subject, start, limit)
                .await
                .map_err(|e| this.failed("list dead letters", e))
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
    /// Follows the workers' events (`dbtask.events.>`): subscribed when this returns.
    fn events(&self, py: Python<'_>) -> PyResult<EventSubscription> {
        let this = self.handle();
        let subscriber = runtime::block_on(py, async move {
            subscribe_events(&this.js.client(), &this.safe).await
        })?;
        Ok(EventSubscription::new(subscriber))
    }

    /// Sends `command` (`ping`, `stats`...) to every worker with the JSON `body` and returns
    /// the replies (JSON texts) that came within `timeout` seconds, or once `expect` came.
    #[pyo3(signature = (command, body, timeout, expect=None))]
    fn request_all(
        &self,
        py: Python<'_>,
        command: String,
        body: String,
        timeout: f64,
        expect: Option<usize>,
    ) -> PyResult<Vec<String>> {
        if !protocol::CONTROL_COMMANDS.contains(&command.as_str()) {
            return Err(ClientError::value(format!(
                "unknown command {command:?}: use one of {}",
                protocol::CONTROL_COMMANDS.join(", ")
            ))
            .into());
        }
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(ClientError::value(format!(
                "timeout must be a positive number of seconds, not {timeout}"
            ))
            .into());
        }
        let this = self.handle();
        runtime::block_on(py, async move {
            request_all(
                &this.js.client(),
                &this.safe,
                protocol::control_subject(&command),
                body,
                Duration::from_secs_f64(timeout),
                expect,
            )
            .await
        })
    }

    /// Tasks waiting for their eta in the task stream (message schedules on `dbtask.sched.>`),
    /// from sequence `start` on, at most `limit`: (sequence, subject, headers, body).
    #[pyo3(signature = (start=1, limit=100))]
    fn scheduled(&self, py: Python<'_>, start: u64, limit: usize) -> PyResult<Vec<Letter>> {
        let this = self.handle();
        runtime::block_on(py, async move {
            let stream = this.task_stream().await?;
            list_messages(&stream, protocol::SCHEDULE_SUBJECT_WILDCARD, start, limit)
                .await
                .map_err(|e| this.failed("list the scheduled tasks", e))
        })
    }

    /// Deletes every task waiting in `queue` (every priority level; not its scheduled ones);
    /// returns how many.
    fn purge_queue(&self, py: Python<'_>, queue: String) -> PyResult<u64> {
        protocol::validate_queue(&queue).map_err(ClientError::from)?;
        let this = self.handle();
        runtime::block_on(py, async move {
            let stream = this.task_stream().await?;
            purge_queue(&stream, &queue, &this.safe).await
        })
    }
}

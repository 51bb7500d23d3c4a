//! The NATS side of `dbtask events`, `dbtask inspect`, `dbtask control` and `dbtask purge`:
//! following the workers' events, asking every worker at once and gathering their answers
//! (scatter-gather: one request, every reply until the timeout), the scheduled tasks in the
//! task stream, and purging a queue. Blocking, for the command line and `dbtask.inspect`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use async_nats::{Client, Subscriber};
use dbtask_protocol as protocol;
use futures::StreamExt;
use pyo3::prelude::*;
use tokio::sync::Mutex;

use crate::error::ClientError;
use crate::runtime;

/// A subscription to the workers' events (`dbtask.events.>`), made by `Admin.events`.
#[pyclass(module = "dbtask._dbtask", frozen)]
pub struct EventSubscription {
    subscriber: Arc<Mutex<Subscriber>>,
}

impl EventSubscription {
    pub(crate) fn new(subscriber: Subscriber) -> EventSubscription {
        EventSubscription {
            subscriber: Arc::new(Mutex::new(subscriber)),
        }
    }
}

#[pymethods]
impl EventSubscription {
    /// The next event as (subject, JSON text); None after `timeout` seconds without one.
    /// Ctrl-C interrupts the wait (KeyboardInterrupt).
    #[pyo3(signature = (timeout=None))]
    fn next_sync(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
    ) -> PyResult<Option<(String, String)>> {
        let limit = match timeout {
            None => None,
            Some(t) if t.is_finite() && t >= 0.0 => Some(Duration::from_secs_f64(t)),
            Some(t) => {
                return Err(ClientError::value(format!(
                    "timeout must be a number of seconds >= 0, not {t}"
                ))
                .into())
            }
        };
        let subscriber = self.subscriber.clone();
        runtime::block_on(py, async move {
            let mut subscriber = subscriber.lock().await;
            let next = match limit {
                None => subscriber.next().await,
                Some(limit) => match tokio::time::timeout(limit, subscriber.next()).await {
                    Ok(next) => next,
                    Err(_) => return Ok(None),
                },
            };
            match next {
                Some(m) => Ok(Some((
                    m.subject.to_string(),
                    String::from_utf8_lossy(&m.payload).into_owned(),
                ))),
                None => Err(ClientError::connection(
                    "the subscription to the events ended: the NATS connection is closed",
                )),
            }
        })
    }
}

/// Subscribes to every event, confirmed by the server before it returns.
pub(crate) async fn subscribe_events(
    client: &Client,
    safe: &str,
) -> Result<Subscriber, ClientError> {
    let failed = |e: &dyn std::fmt::Display| {
        ClientError::connection(format!(
            "cannot subscribe to {} on NATS at {safe}: {e}",
            protocol::EVENTS_SUBJECT_WILDCARD
        ))
    };
    let subscriber = client
        .subscribe(protocol::EVENTS_SUBJECT_WILDCARD)
        .await
        .map_err(|e| failed(&e))?;
    client.flush().await.map_err(|e| failed(&e))?;
    Ok(subscriber)
}

/// Publishes `body` on `subject` and gathers every reply that arrives within `timeout`
/// (or until `expect` replies came).
pub(crate) async fn request_all(
    client: &Client,
    safe: &str,
    subject: String,
    body: String,
    timeout: Duration,
    expect: Option<usize>,
) -> Result<Vec<String>, ClientError> {
    let failed = |e: &dyn std::fmt::Display| {
        ClientError::connection(format!(
            "cannot send a request on {subject} to NATS at {safe}: {e}"
        ))
    };
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| failed(&e))?;
    client
        .publish_with_reply(subject.clone(), inbox, body.into())
        .await
        .map_err(|e| failed(&e))?;
    client.flush().await.map_err(|e| failed(&e))?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut answers = Vec::new();
    while expect.is_none_or(|n| answers.len() < n) {
        match tokio::time::timeout_at(deadline, replies.next()).await {
            Ok(Some(m)) => {
                // "No responders" is a status message without a body: nobody listens.
                if m.status
                    .is_some_and(|s| s == async_nats::StatusCode::NO_RESPONDERS)
                {
                    break;
                }
                answers.push(String::from_utf8_lossy(&m.payload).into_owned());
            }
            Ok(None) | Err(_) => break,
        }
    }
    let _ = replies.unsubscribe().await;
    Ok(answers)
}

/// Removes every message waiting in `queue` (all its priority levels) from the task stream;
/// returns how many.
pub(crate) async fn purge_queue(
    stream: &Stream,
    queue: &str,
    safe: &str,
) -> Result<u64, ClientError> {
    let mut purged = 0;
    // The default level is `dbtask.tasks.<queue>`, the others one token further.
    for subject in [
        protocol::task_subject(queue),
        format!("{}.>", protocol::task_subject(queue)),
    ] {
        let response = stream.purge().filter(subject.clone()).await.map_err(|e| {
            ClientError::connection(format!(
                "cannot purge {subject} from stream {} on NATS at {safe}: {e}",
                protocol::TASK_STREAM
            ))
            .because(e)
        })?;
        purged += response.purged;
    }
    Ok(purged)
}

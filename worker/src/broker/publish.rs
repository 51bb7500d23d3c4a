//! Publishing task messages: retries, tasks delivered before their eta, workflow steps. With
//! `dead.rs` (dead letters), the only places the worker writes to JetStream. Each publish
//! returns once JetStream stored the message, so the delivery that caused it is acked only
//! after. With a message key, each is signed here.

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;
use bytes::Bytes;
use dbtask_protocol::{now_unix, TaskMessage, Trace};

use super::{task_header_map, Broker};

/// One message of a batch: its task id (for the error), subject, headers and body.
pub struct Outgoing {
    pub id: String,
    pub subject: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Which message of a batch could not be published, and why.
#[derive(Debug, thiserror::Error)]
#[error("cannot publish task {id}: {source}")]
pub struct BatchError {
    pub id: String,
    pub source: PublishError,
}

impl Broker {
    /// Publishes `task` so that it runs at `task.eta` (at once when it is absent or past):
    /// a message schedule on `dbtask.sched.<queue>.<id>`, or the queue's subject directly.
    /// `msg_id` deduplicates a second publish (after a crash) within the stream's window;
    /// `trace`: the W3C trace context to carry (OpenTelemetry on).
    pub async fn publish_task(
        &self,
        queue: &str,
        task: &TaskMessage,
        msg_id: &str,
        trace: Option<&Trace>,
    ) -> Result<(), PublishError> {
        let route = task.route(queue, now_unix());
        let mut headers = task_header_map(task, &route, msg_id);
        dbtask_protocol::nats::add_trace(&mut headers, trace);
        let body = Bytes::from(task.encode());
        if let Some(key) = &self.message_key {
            key.sign_headers(&mut headers, &route.subject, &body);
        }
        self.js
            .publish_with_headers(route.subject, headers, body)
            .await?
            .await
            .map(|_| ())
    }

    /// Publishes every message, all sent first and then all confirmed; the first failure
    /// names its task.
    pub async fn publish_batch(&self, batch: &[Outgoing]) -> Result<(), BatchError> {
        let mut acks = Vec::with_capacity(batch.len());
        for m in batch {
            let mut headers = m.headers.clone();
            if let Some(key) = &self.message_key {
                key.sign_headers(&mut headers, &m.subject, &m.body);
            }
            let ack = self
                .js
                .send_publish(
                    m.subject.clone(),
                    PublishMessage::build()
                        .payload(m.body.clone())
                        .headers(headers),
                )
                .await
                .map_err(|source| BatchError {
                    id: m.id.clone(),
                    source,
                })?;
            acks.push((&m.id, ack));
        }
        for (id, ack) in acks {
            ack.await.map_err(|source| BatchError {
                id: id.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

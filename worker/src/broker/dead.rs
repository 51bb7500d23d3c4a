//! The dead-letter stream `DBTASK_DEAD` (subjects `dbtask.dead.<queue>`, limits retention):
//! where a message that exhausted its deliveries goes, with its original headers and body and
//! the reason, until an operator replays or purges it (`dbtask dead ...`).

use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::stream;
use async_nats::HeaderMap;
use bytes::Bytes;
use dbtask_protocol::{dead_subject, StreamSpec, DEAD_STREAM};
use tracing::info;

use super::Broker;

/// Why a dead letter could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("cannot create stream {DEAD_STREAM}: {0}")]
    Create(#[source] async_nats::jetstream::context::CreateStreamError),
    #[error("cannot publish to {DEAD_STREAM}: {0}")]
    Publish(#[source] PublishError),
}

/// Set once this process made sure the stream exists (it is created on first use).
static READY: AtomicBool = AtomicBool::new(false);

/// The dead-letter stream's configuration, with the replicas of the task stream. Only the
/// worker creates the stream (on its first dead letter); the `dbtask dead` command reads a
/// missing one as empty.
fn dead_stream_config(replicas: usize) -> stream::Config {
    super::stream_config(&StreamSpec::dead_letters().with_replicas(replicas))
}

impl Broker {
    /// Publishes a dead letter for `queue` and waits for JetStream to store it; returns its
    /// sequence in the dead-letter stream. `msg_id` deduplicates a second dead-lettering of the
    /// same message (a worker that died between this publish and its ack).
    pub async fn publish_dead(
        &self,
        queue: &str,
        msg_id: &str,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<u64, DeadLetterError> {
        headers.insert(dbtask_protocol::HEADER_MSG_ID, msg_id);
        let mut attempt = 0;
        loop {
            if !READY.load(Ordering::Relaxed) {
                let created = self
                    .js
                    .get_or_create_stream(dead_stream_config(
                        self.stream_replicas.load(Ordering::Relaxed),
                    ))
                    .await
                    .map_err(DeadLetterError::Create)?;
                if created.cached_info().state.messages == 0 {
                    info!(stream = DEAD_STREAM, "dead-letter stream ready");
                }
                READY.store(true, Ordering::Relaxed);
            }
            let result = match self
                .js
                .publish_with_headers(dead_subject(queue), headers.clone(), body.clone())
                .await
            {
                Ok(ack) => ack.await.map(|a| a.sequence),
                Err(e) => Err(e),
            };
            match result {
                Ok(sequence) => return Ok(sequence),
                // The stream may have been deleted since: create it again, once.
                Err(e) if attempt == 0 => {
                    tracing::debug!(error = %e, "dead-letter publish failed; checking the stream");
                    READY.store(false, Ordering::Relaxed);
                    attempt += 1;
                }
                Err(e) => return Err(DeadLetterError::Publish(e)),
            }
        }
    }
}

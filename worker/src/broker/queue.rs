//! The shared durable consumer of one queue: its pulls, bounded in bytes, and failing at once
//! while the connection is down.

use std::time::Duration;

use async_nats::jetstream::consumer;

use super::{Batch, BrokerError, Cause};

/// The shared durable consumer of one queue.
pub struct QueueConsumer {
    pub(super) queue: String,
    pub(super) url: String,
    pub(super) client: async_nats::Client,
    pub(super) consumer: consumer::PullConsumer,
    /// Bytes one pull may bring at most (see [`max_batch_bytes`]).
    pub(super) max_batch_bytes: usize,
}

/// What one pull may bring: 4 MiB, or one message of the largest size allowed (a message the
/// server cannot fit in a pull would never be delivered; headers add to the body, hence the
/// margin). The client reads a batch into one buffer and keeps that buffer's size for later
/// reads, so an unbounded batch of large messages (arguments of a megabyte) left tens of MiB
/// held for good; a batch of small messages is bounded by its count long before this.
pub fn max_batch_bytes(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_add(64 << 10).max(4 << 20)
}

impl QueueConsumer {
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// A pull while the connection is down fails at once: async-nats would otherwise hand back
    /// a batch that ends with an error, which a no-wait fetch cannot tell from "no messages",
    /// and the pull loop would count no failure, so never back off.
    fn check_connected(&self) -> Result<(), BrokerError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(self.failed(Cause::said(format!(
                "not connected to NATS ({state}); async-nats is reconnecting"
            )))),
        }
    }

    /// Asks for up to `max` messages; the request stays open on the server for `expires` and
    /// the batch yields each message as it arrives.
    pub async fn pull(&self, max: usize, expires: Duration) -> Result<Batch, BrokerError> {
        self.check_connected()?;
        self.consumer
            .batch()
            .max_messages(max)
            .max_bytes(self.max_batch_bytes)
            .expires(expires)
            .messages()
            .await
            .map_err(|e| self.failed(Cause::of(e)))
    }

    fn failed(&self, source: Cause) -> BrokerError {
        BrokerError::Pull {
            url: self.url.clone(),
            queue: self.queue.clone(),
            source,
        }
    }

    /// The error of a pull that got no answer within `after` (NATS unreachable, or the
    /// request or its answer lost in a reconnect).
    pub fn unanswered(&self, after: Duration) -> BrokerError {
        self.failed(Cause::said(format!(
            "no answer within {} s (is nats-server reachable?)",
            after.as_secs_f64()
        )))
    }

    /// Asks for up to `max` messages already waiting, without waiting for more: the batch
    /// ends as soon as the server has nothing more to give.
    pub async fn pull_now(&self, max: usize) -> Result<Batch, BrokerError> {
        self.check_connected()?;
        self.consumer
            .fetch()
            .max_messages(max)
            .max_bytes(self.max_batch_bytes)
            .messages()
            .await
            .map_err(|e| self.failed(Cause::of(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_always_fits_the_largest_message_allowed() {
        assert_eq!(max_batch_bytes(1 << 20), 4 << 20, "small messages: 4 MiB");
        assert!(
            max_batch_bytes(64 << 20) > 64 << 20,
            "room for the headers too"
        );
        assert_eq!(max_batch_bytes(usize::MAX), usize::MAX);
    }
}

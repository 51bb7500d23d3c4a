//! Lifecycle events on core NATS (`dbtask.events.>`, `--events`): published fire-and-forget,
//! stored nowhere, so nobody listening costs nothing beyond the publish.
//!
//! Events are made on the worker's thread, where a hook must not wait: each goes into a bounded
//! queue, and one task publishes what it holds. With NATS down and the queue full, new events
//! are dropped (and counted) rather than held: the tasks themselves never wait for events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_nats::Subject;
use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::Broker;

/// Events queued for publishing at most; past it, new ones are dropped.
pub const EVENT_QUEUE: usize = 16 * 1024;

/// Where events are queued for publishing. Cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct EventSink {
    /// `None`: the last event was sent; flush and stop.
    queue: mpsc::Sender<Option<(Subject, Bytes)>>,
    dropped: Arc<AtomicU64>,
}

impl EventSink {
    /// Queues one event; never waits.
    pub fn send(&self, subject: &Subject, payload: Vec<u8>) {
        if self
            .queue
            .try_send(Some((subject.clone(), Bytes::from(payload))))
            .is_err()
        {
            // Said once per thousand, with the total: a stream of warnings would not help.
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped % 1000 == 1 {
                warn!(
                    dropped,
                    "events dropped: NATS does not take them as fast as they come (is it reachable?)"
                );
            }
        }
    }

    /// Publishes what is queued, then flushes and stops the publishing task.
    pub async fn finish(&self) {
        let _ = self.queue.send(None).await;
    }
}

impl Broker {
    /// An event queue and the task that publishes it (run it until the sink is dropped).
    pub fn event_sink(&self) -> (EventSink, impl std::future::Future<Output = ()>) {
        let (tx, mut rx) = mpsc::channel::<Option<(Subject, Bytes)>>(EVENT_QUEUE);
        let client = self.client.clone();
        let publish = async move {
            let mut batch = Vec::with_capacity(64);
            while rx.recv_many(&mut batch, 64).await > 0 {
                for event in batch.drain(..) {
                    let Some((subject, payload)) = event else {
                        if let Err(e) = client.flush().await {
                            debug!(error = %e, "cannot flush the last events");
                        }
                        return;
                    };
                    if let Err(e) = client.publish(subject, payload).await {
                        debug!(error = %e, "cannot publish an event");
                    }
                }
            }
        };
        let sink = EventSink {
            queue: tx,
            dropped: Arc::default(),
        };
        (sink, publish)
    }
}

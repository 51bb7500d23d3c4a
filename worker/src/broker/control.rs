//! The NATS side of `dbtask inspect` / `dbtask control`: every worker registers as an instance
//! of the NATS service `dbtask-worker` (ADR-32: `nats micro ls` and `$SRV.PING` see it), with
//! one endpoint per command on `dbtask.control.<command>`.
//!
//! The service API puts endpoints in a queue group, so that one instance answers each request;
//! inspect needs every worker to answer (scatter-gather), so each worker uses a queue group of
//! its own. A caller then publishes one request and collects the replies until its timeout.

use std::collections::HashMap;

use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{consumer, ErrorCode};
use async_nats::service::{Request, Service, ServiceExt};
use dbtask_protocol::{
    control_subject, priority_consumer_name, CONTROL_COMMANDS, CONTROL_SERVICE, TASK_STREAM,
};
use futures::stream::{select_all, BoxStream};
use futures::StreamExt;

use super::Broker;

/// Requests of every command, as they come: (the command, the request to answer).
pub type Requests = BoxStream<'static, (&'static str, Request)>;

/// A queue consumer's figures: messages not yet delivered, and delivered but not acked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Pending {
    pub pending: u64,
    pub ack_pending: u64,
}

/// A queue group name unique to this worker (only `A-Z a-z 0-9 _ -`).
fn queue_group(worker: &str) -> String {
    let clean: String = worker
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("w_{clean}")
}

impl Broker {
    /// Registers this worker as an instance of the service and subscribes to every command.
    pub async fn control_service(
        &self,
        worker: &str,
        metadata: HashMap<String, String>,
    ) -> Result<(Service, Requests), async_nats::Error> {
        let service = self
            .client
            .service_builder()
            .description("dbtask worker: inspect and control (dbtask inspect, dbtask control)")
            .metadata(metadata)
            .queue_group(queue_group(worker))
            .start(CONTROL_SERVICE, env!("CARGO_PKG_VERSION"))
            .await?;
        let mut streams = Vec::with_capacity(CONTROL_COMMANDS.len());
        for command in CONTROL_COMMANDS {
            let endpoint = service
                .endpoint_builder()
                .name(command)
                .add(control_subject(command))
                .await?;
            streams.push(endpoint.map(move |request| (command, request)).boxed());
        }
        // Make sure the server has the subscriptions before the worker says it is ready.
        self.client.flush().await?;
        Ok((service, select_all(streams).boxed()))
    }

    /// The figures of the consumer of `queue`'s priority level; `None` if it does not exist.
    pub async fn level_pending(
        &self,
        queue: &str,
        priority: u8,
    ) -> Result<Option<Pending>, String> {
        let name = priority_consumer_name(queue, priority);
        match self
            .js
            .get_consumer_from_stream::<consumer::pull::Config, _, _>(&name, TASK_STREAM)
            .await
        {
            Ok(consumer) => {
                let info = consumer.cached_info();
                Ok(Some(Pending {
                    pending: info.num_pending,
                    ack_pending: info.num_ack_pending as u64,
                }))
            }
            Err(e)
                if matches!(e.kind(), ConsumerErrorKind::JetStream(ref err)
                    if err.error_code() == ErrorCode::CONSUMER_NOT_FOUND) =>
            {
                Ok(None)
            }
            Err(e) => Err(format!("cannot read consumer {name}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_worker_has_a_queue_group_of_its_own() {
        assert_eq!(super::queue_group("host.example:42"), "w_host_example_42");
        assert_ne!(super::queue_group("a:1"), super::queue_group("a:2"));
    }
}

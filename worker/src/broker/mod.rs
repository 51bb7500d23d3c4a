//! NATS JetStream: the connection, the server checks, the task stream and one durable pull
//! consumer per queue.
//!
//! Everything here is idempotent: several workers (and clients) may create or update the same
//! stream and consumers at the same moment.

mod control;
mod dead;
mod error;
mod events;
mod periodic;
mod publish;
mod queue;
mod security;
mod stream;

pub use control::{Pending, Requests};
pub use dbtask_protocol::nats::{stream_config, task_header_map};
use dbtask_protocol::signing::MessageKey;
pub use error::{BrokerError, Cause, Incompatible};
pub use events::EventSink;
pub use queue::{max_batch_bytes, QueueConsumer};
pub use security::{NatsSecurity, SecurityError};
pub use stream::{reconcile, task_spec, Change, Plan};

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_nats::ConnectErrorKind;
use dbtask_protocol::nats::is_tls_error;
use dbtask_protocol::{priority_consumer_name, priority_subject, DEFAULT_PRIORITY, TASK_STREAM};
use tracing::{debug, info, warn};

use crate::config::{redact_url, Config};
use crate::monitor::counts;

/// Oldest nats-server dbtask runs against (message schedules, atomic batches).
pub const MIN_NATS_VERSION: (u64, u64, u64) = (2, 12, 0);

/// A pull request of a queue's consumer: messages as the server delivers them.
pub type Batch = consumer::pull::Batch;

pub use periodic::PeriodicSetupError;
pub use publish::{BatchError, Outgoing};

/// A connection to NATS with JetStream, checked to be able to serve dbtask.
#[derive(Clone)]
pub struct Broker {
    client: async_nats::Client,
    js: jetstream::Context,
    /// The URL with its secrets hidden, for logs and errors.
    url: String,
    version: String,
    /// When the connection last came back after a loss (see [`Outages`]).
    outages: Arc<Outages>,
    /// `--message-key`: what this worker publishes is signed, what it runs must be.
    message_key: Option<Arc<MessageKey>>,
    /// `stream_replicas`, as [`Broker::ensure_stream`] last applied it: the dead-letter
    /// stream, made on the first dead letter, gets as many.
    stream_replicas: Arc<AtomicUsize>,
}

/// What the worker remembers of NATS outages. Acks sent while the connection is down are lost,
/// and a restarted server may also have lost its record of the latest deliveries: it hands
/// such messages out again as *first* deliveries, though their tasks ran and their outcomes
/// are stored. A first delivery of a message published before the connection came back is
/// therefore checked against the stored outcomes, like any redelivery.
#[derive(Default)]
struct Outages {
    /// Disconnected since the last (re)connection.
    down: AtomicBool,
    /// Unix milliseconds of the last reconnection after a loss; 0: none yet.
    back_at_ms: AtomicI64,
}

/// Server and worker clocks may differ by this much.
const CLOCK_MARGIN_MS: i64 = 5_000;

impl Broker {
    /// Connects, then checks the server's version and that JetStream is enabled. `nats_url`:
    /// one URL, or seed servers of a cluster separated by commas (see
    /// [`dbtask_protocol::seeds`]): any that answers will do, and async-nats moves to another
    /// server of the cluster when its own goes away. `name` identifies this connection in the
    /// server's monitoring (`hostname:pid`).
    pub async fn connect(nats_url: &str, name: &str) -> Result<Broker, BrokerError> {
        Broker::connect_with(nats_url, &NatsSecurity::default(), name).await
    }

    /// [`Broker::connect`] over TLS and with the credentials of `security`
    /// ([`Config::nats_security`]).
    pub async fn connect_with(
        nats_url: &str,
        security: &NatsSecurity,
        name: &str,
    ) -> Result<Broker, BrokerError> {
        let shown = redact_url(nats_url);
        let seeds = dbtask_protocol::seeds::seeds(nats_url).map_err(|e| BrokerError::BadUrl {
            url: shown.clone(),
            source: Cause::of(e),
        })?;
        let options = security
            .apply(seeds.options())
            .map_err(|source| BrokerError::Security {
                url: shown.clone(),
                source,
            })?;
        let event_url = shown.clone();
        let outages = Arc::new(Outages::default());
        let events = Arc::clone(&outages);
        let options = options
            .name(format!("dbtask-worker {name}"))
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let url = event_url.clone();
                let outages = Arc::clone(&events);
                async move {
                    use async_nats::Event;
                    match event {
                        Event::Connected => {
                            if outages.down.swap(false, Ordering::AcqRel) {
                                outages.back_at_ms.store(now_ms(), Ordering::Release);
                                counts::NATS.reconnect();
                            }
                            info!(url, "connected to NATS")
                        }
                        Event::Disconnected => {
                            outages.down.store(true, Ordering::Release);
                            counts::NATS.error();
                            warn!(url, "lost the connection to NATS; reconnecting")
                        }
                        // One per failed reconnect attempt: the warning above says it already.
                        Event::ClientError(e) => {
                            counts::NATS.error();
                            debug!(url, error = %e, "NATS client error")
                        }
                        Event::Closed | Event::Draining => {
                            debug!(url, event = %event, "NATS connection closing")
                        }
                        other => warn!(url, event = %other, "NATS connection event"),
                    }
                }
            });
        // async-nats tries every seed (in random order) before it gives up, and after a loss
        // every server it knows of, seeds and those the cluster announced.
        let client = options.connect(seeds.servers).await.map_err(|err| {
            let kind = err.kind();
            let reason = connect_reason(&err);
            // A server that checks client certificates closes the connection after the
            // handshake: with TLS asked for, a connection lost that way is a TLS failure too.
            let tls_failed = is_tls_error(&err)
                || (security.tls()
                    && kind == ConnectErrorKind::Io
                    && reason != "connection refused"
                    && reason != "timed out");
            let source = Cause::summarized(reason, err);
            if matches!(
                kind,
                ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation
            ) {
                BrokerError::Refused {
                    url: shown.clone(),
                    source,
                    hint: security.sign_in_hint(),
                }
            } else if tls_failed {
                BrokerError::Tls {
                    url: shown.clone(),
                    source,
                    hint: security.tls_hint(),
                }
            } else {
                BrokerError::Unreachable {
                    url: shown.clone(),
                    source,
                }
            }
        })?;
        let server = client.server_info();
        let version = server.version.clone();
        match parse_version(&version) {
            Some(v) if v >= MIN_NATS_VERSION => {}
            _ => {
                return Err(BrokerError::TooOld {
                    url: shown,
                    version,
                })
            }
        }
        if !server.jetstream {
            return Err(BrokerError::NoJetStream {
                url: shown,
                source: Cause::said("the server announces no JetStream"),
            });
        }
        let js = jetstream::new(client.clone());
        js.query_account()
            .await
            .map_err(|e| BrokerError::NoJetStream {
                url: shown.clone(),
                source: Cause::of(e),
            })?;
        Ok(Broker {
            client,
            js,
            url: shown,
            version,
            outages,
            message_key: None,
            stream_replicas: Arc::new(AtomicUsize::new(1)),
        })
    }

    /// Signs every task message this broker publishes with `key` (see
    /// [`dbtask_protocol::signing`]), and gives it to whoever checks deliveries.
    pub fn with_message_key(mut self, key: Option<MessageKey>) -> Broker {
        self.message_key = key.map(Arc::new);
        self
    }

    /// The key deliveries must be signed with, if any.
    pub fn message_key(&self) -> Option<&MessageKey> {
        self.message_key.as_deref()
    }

    /// Whether a message delivered for the first time may have been handled already, its ack
    /// lost to a NATS outage: it was published (`published_ms`, Unix milliseconds by the
    /// server's clock) before the connection last came back, or the connection is down now.
    /// Costs two atomic loads when there was no outage.
    pub fn maybe_handled_before_outage(&self, published_ms: impl FnOnce() -> Option<i64>) -> bool {
        if self.outages.down.load(Ordering::Acquire) {
            return true;
        }
        match self.outages.back_at_ms.load(Ordering::Acquire) {
            0 => false,
            back => published_ms().is_none_or(|at| at <= back + CLOCK_MARGIN_MS),
        }
    }

    /// Whether the connection is up now (async-nats reconnects a lost one by itself).
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Messages waiting to be delivered at each priority level `levels` of `queue` (the
    /// `num_pending` of each level's consumer), asked of the server now, all at once.
    pub async fn pending(&self, queue: &str, levels: &[u8]) -> Result<Vec<(u8, u64)>, BrokerError> {
        let stream =
            self.js
                .get_stream_no_info(TASK_STREAM)
                .await
                .map_err(|e| BrokerError::Stream {
                    stream: TASK_STREAM,
                    url: self.url.clone(),
                    source: Cause::of(e),
                })?;
        let asks = levels.iter().map(|&priority| {
            let stream = &stream;
            async move {
                let name = priority_consumer_name(queue, priority);
                stream
                    .consumer_info(&name)
                    .await
                    .map(|info| (priority, info.num_pending))
                    .map_err(|e| BrokerError::Consumer {
                        url: self.url.clone(),
                        consumer: name,
                        source: Cause::of(e),
                    })
            }
        });
        futures::future::try_join_all(asks).await
    }

    /// The server's version, e.g. `2.14.6`.
    pub fn server_version(&self) -> &str {
        &self.version
    }

    /// The server URL with secrets hidden.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The largest message the server accepts (its `max_payload`).
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// A core NATS subscription to every task published on `queue`'s subjects (any priority
    /// level), confirmed by the server before it returns: a wake-up for a worker waiting on
    /// empty levels. Confirming is best effort; an unconfirmed subscription is still returned,
    /// with a warning.
    pub async fn watch_queue(
        &self,
        queue: &str,
    ) -> Result<async_nats::Subscriber, async_nats::SubscribeError> {
        let subject = format!("{}.{queue}.*", dbtask_protocol::TASK_SUBJECT_PREFIX);
        let sub = self.client.subscribe(subject.clone()).await?;
        if let Err(e) = self.client.flush().await {
            warn!(queue, subject, error = %e, "cannot confirm the priority wake-up subscription; priority tasks may wait up to a few seconds on an idle worker");
        }
        Ok(sub)
    }

    /// Creates or updates the durable pull consumer of `queue` with the ack settings from
    /// `config`, and checks what the server stored.
    pub async fn ensure_consumer(
        &self,
        queue: &str,
        config: &Config,
    ) -> Result<QueueConsumer, BrokerError> {
        self.ensure_level_consumer(queue, DEFAULT_PRIORITY, config)
            .await
    }

    /// Same as [`Broker::ensure_consumer`] for one priority level of `queue`: the default
    /// level is the plain consumer `dbtask-<queue>`, the others `dbtask-<queue>-p<N>`.
    pub async fn ensure_level_consumer(
        &self,
        queue: &str,
        priority: u8,
        config: &Config,
    ) -> Result<QueueConsumer, BrokerError> {
        let name = priority_consumer_name(queue, priority);
        let subject = priority_subject(queue, priority);
        let description = if priority == DEFAULT_PRIORITY {
            format!("dbtask workers of queue {queue}")
        } else {
            format!("dbtask workers of queue {queue}, priority {priority}")
        };
        let wanted = consumer::pull::Config {
            durable_name: Some(name.clone()),
            description: Some(description),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: config.ack_wait(),
            max_deliver: consumer_max_deliver(config.max_deliver),
            max_ack_pending: config.max_ack_pending,
            filter_subject: subject.clone(),
            ..Default::default()
        };
        let error = |source: Cause| BrokerError::Consumer {
            url: self.url.clone(),
            consumer: name.clone(),
            source,
        };
        let consumer: consumer::PullConsumer = self
            .js
            .create_consumer_on_stream(wanted, TASK_STREAM)
            .await
            .map_err(|e| error(Cause::of(e)))?;
        let stored = &consumer.cached_info().config;
        if stored.ack_policy != consumer::AckPolicy::Explicit
            || stored.filter_subject != subject
            || stored.deliver_subject.is_some()
        {
            return Err(error(Cause::said(format!(
                "the server holds it with ack_policy={:?}, filter_subject={:?}, push={}; dbtask needs an explicit-ack pull consumer on {subject}",
                stored.ack_policy,
                stored.filter_subject,
                stored.deliver_subject.is_some()
            ))));
        }
        Ok(QueueConsumer {
            queue: queue.to_owned(),
            url: self.url.clone(),
            client: self.client.clone(),
            consumer,
            max_batch_bytes: max_batch_bytes(config.max_message_bytes),
        })
    }
}

/// The consumer's own `max_deliver` for the worker's `max_deliver`: unlimited, because the
/// worker decides (it dead-letters a message on its last delivery, counting only the
/// deliveries charged to it: see `runner/dead.rs`), except with 1, where no delivery may follow.
pub fn consumer_max_deliver(max_deliver: i64) -> i64 {
    if max_deliver > 1 {
        -1
    } else {
        max_deliver
    }
}

/// The most telling part of a connect error: "connection refused", "timed out", ...
fn connect_reason(err: &async_nats::ConnectError) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
                std::io::ErrorKind::TimedOut => "timed out".into(),
                _ => io.to_string(),
            };
        }
        source = e.source();
    }
    match err.kind() {
        ConnectErrorKind::TimedOut => "timed out".into(),
        _ => err.to_string(),
    }
}

/// `2.14.6`, `v2.12.0-beta.1` -> (2, 14, 6); `None` when there is no leading `x.y`.
pub fn parse_version(version: &str) -> Option<(u64, u64, u64)> {
    let core = version.trim().trim_start_matches('v');
    let core = core.split(['-', '+', ' ']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>());
    let major = parts.next()?.ok()?;
    let minor = parts.next()?.ok()?;
    let patch = parts.next().and_then(Result::ok).unwrap_or(0);
    Some((major, minor, patch))
}

/// Now, in Unix milliseconds.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_compare() {
        assert_eq!(parse_version("2.14.6"), Some((2, 14, 6)));
        assert_eq!(parse_version("v2.12.0-beta.1"), Some((2, 12, 0)));
        assert_eq!(parse_version("2.12"), Some((2, 12, 0)));
        assert_eq!(parse_version("garbage"), None);
        assert!(parse_version("2.9.25").unwrap() < MIN_NATS_VERSION);
        assert!(parse_version("2.12.0").unwrap() >= MIN_NATS_VERSION);
        assert!(parse_version("3.0.0").unwrap() >= MIN_NATS_VERSION);
    }
}

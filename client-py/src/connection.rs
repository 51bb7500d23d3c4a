//! The connection of a client process: one NATS connection (with its JetStream context), one
//! multiplexed Redis connection for commands and one Redis pub/sub connection for
//! notifications, shared by every call of the process; the task stream, created when missing;
//! and the count of publishes in progress that `close` waits for.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{ContextBuilder, CreateStreamErrorKind};
use async_nats::jetstream::ErrorCode;
use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr};
use dbtask_protocol as protocol;
use dbtask_protocol::nats::is_tls_error;
use dbtask_protocol::redis_conn::{
    self, Conn, Dialer, PubSubSource, Redial, RedisTls, SentinelMaster, ShardedSource, Target,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

use crate::error::{redact_url, ClientError};
use crate::notify::{Link, Notifier, Source};
use crate::security::NatsSecurity;
use dbtask_protocol::signing::MessageKey;

/// How long JetStream may take to confirm a publish (and to answer API requests).
pub(crate) const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Publishes awaiting their confirmation at once, per client; more wait for a slot.
const MAX_ACK_INFLIGHT: usize = 32_768;
/// Redis answers slower than this are an error (redis-rs's default of 500 ms is too short
/// for a large record on a busy server).
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Inner {
    pub(crate) nats: async_nats::Client,
    pub(crate) js: async_nats::jetstream::Context,
    pub(crate) redis: Conn,
    pub(crate) notifier: Notifier,
    /// The URLs as given (with secrets), only compared, never shown.
    pub(crate) nats_given: String,
    pub(crate) redis_given: String,
    /// The TLS and credential files it connected with (compared by `connected_to`).
    pub(crate) security: NatsSecurity,
    /// The Redis TLS files it connected with (compared by `connected_to`).
    pub(crate) redis_tls: RedisTls,
    /// `message_key=`: every task message published is signed with it.
    pub(crate) message_key: Option<MessageKey>,
    pub(crate) nats_safe: String,
    pub(crate) redis_safe: String,
    /// Replicas of the task stream when this client has to create it.
    pub(crate) stream_replicas: usize,
    pub(crate) closed: AtomicBool,
    /// Publishes in progress, and a wake-up for `close` when the last one ends.
    publishing: AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Counts one publish in progress for as long as it lives. Taken on the caller's thread,
/// before the work is handed to tokio, so that `close` cannot slip in between.
pub(crate) struct Publishing(Arc<Inner>);

impl Publishing {
    pub(crate) fn inner(&self) -> &Inner {
        &self.0
    }
}

impl Drop for Publishing {
    fn drop(&mut self) {
        if self.0.publishing.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

fn nats_options(
    url: &str,
    safe: &str,
    timeout: Duration,
    security: &NatsSecurity,
) -> Result<(ConnectOptions, Vec<ServerAddr>), ClientError> {
    // One URL or a comma-separated list of seeds; their credentials, the same for every seed,
    // go into the options (async-nats does not read them from a URL).
    let seeds = protocol::seeds::seeds(url)
        .map_err(|e| ClientError::value(format!("invalid NATS URL {safe}: {e}")).because(e))?;
    let options = security.apply(seeds.options())?;
    let options = options
        .name("dbtask-client")
        .connection_timeout(timeout)
        .client_capacity(16_384);
    Ok((options, seeds.servers))
}

/// The most telling cause of a connect error: the innermost I/O or TLS error's message.
fn connect_reason(e: &async_nats::ConnectError) -> String {
    let mut reason = e.to_string();
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(inner) = source {
        reason = inner.to_string();
        source = inner.source();
    }
    reason
}

pub(crate) async fn connect_nats(
    url: &str,
    safe: &str,
    timeout: Duration,
    security: &NatsSecurity,
) -> Result<async_nats::Client, ClientError> {
    let (options, servers) = nats_options(url, safe, timeout, security)?;
    // No retry_on_initial_connect: a closed port fails at once (after every seed of a list was
    // tried, in random order). Later disconnections are retried forever in the background, on
    // every server known (the seeds and those the cluster announced); publishes then wait up
    // to PUBLISH_TIMEOUT.
    options.connect(servers).await.map_err(|e| {
        match e.kind() {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                ClientError::connection(format!(
                    "NATS at {safe} refused the connection ({e}): {}",
                    security.sign_in_hint()
                ))
            }
            // A server that checks client certificates closes the connection after the
            // handshake: with TLS asked for, a connection lost that way is a TLS failure too.
            kind if is_tls_error(&e)
                || (security.tls()
                    && kind == ConnectErrorKind::Io
                    && !connect_reason(&e).contains("refused")) =>
            {
                ClientError::connection(format!(
                    "TLS with NATS at {safe} failed ({}): {}",
                    connect_reason(&e),
                    security.tls_hint()
                ))
            }
            ConnectErrorKind::TimedOut => ClientError::connection(format!(
                "cannot reach NATS at {safe} (no answer within {:.1} s): is nats-server running?",
                timeout.as_secs_f64()
            )),
            ConnectErrorKind::ServerParse => {
                ClientError::value(format!("invalid NATS URL {safe}: {e}"))
            }
            _ => ClientError::connection(format!(
                "cannot reach NATS at {safe} ({e}): is nats-server running?"
            )),
        }
        .because(e)
    })
}

/// Creates the task stream when it is missing, with `replicas` copies of each message
/// (`init(stream_replicas=...)`); an existing one is left as it is (the worker owns its
/// settings and brings the stream in line with its config when it starts, replicas included).
///
/// Why the client creates it at all rather than refusing until a worker has run: tasks may be
/// enqueued before any worker starts (a deploy that starts the web app first, a test that
/// publishes and then starts a worker), and JetStream keeps them until one does. The stream
/// is made from the same description as the worker's ([`protocol::StreamSpec::tasks`]) with
/// the same default limits, so a default worker finds nothing to change, and one configured
/// otherwise updates the window, the size and the replicas in place (a work queue keeps its
/// messages). The replica count is the one setting a client cannot leave to the worker: a
/// stream made with one replica on a cluster loses the tasks it holds with that server until a
/// worker starts, so a client on a cluster is told the count, as workers are.
pub(crate) async fn ensure_stream(
    js: &async_nats::jetstream::Context,
    safe: &str,
    replicas: usize,
) -> Result<(), ClientError> {
    let no_js = || {
        ClientError::connection(format!(
            "NATS at {safe} has no JetStream: start nats-server with -js (version 2.12 or later)"
        ))
    };
    let spec = protocol::StreamSpec::tasks().with_replicas(replicas);
    match js
        .get_or_create_stream(protocol::nats::stream_config(&spec))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let error = match e.kind() {
                // Created by a worker or another client between our lookup and our create.
                CreateStreamErrorKind::JetStream(err)
                    if err.error_code() == ErrorCode::STREAM_NAME_EXIST =>
                {
                    return Ok(())
                }
                CreateStreamErrorKind::JetStream(err)
                    if err.error_code() == ErrorCode::JETSTREAM_NOT_ENABLED
                        || err.error_code() == ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT =>
                {
                    no_js()
                }
                CreateStreamErrorKind::JetStreamUnavailable => no_js(),
                CreateStreamErrorKind::JetStream(err)
                    if replicas > 1
                        && (err.error_code() == ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED
                            || err.error_code() == ErrorCode::INSUFFICIENT_RESOURCES
                            || err.error_code() == ErrorCode::CLUSTER_NO_PEERS) =>
                {
                    ClientError::value(format!(
                        "cannot create the JetStream stream {} with {replicas} replicas on NATS \
                         at {safe} ({err}): stream_replicas={replicas} (init's keyword, or \
                         $DBTASK_STREAM_REPLICAS) needs a NATS cluster of at least {replicas} \
                         servers with JetStream, all up; on a single server use 1",
                        protocol::TASK_STREAM
                    ))
                }
                _ => ClientError::connection(format!(
                    "cannot create the JetStream stream {} on NATS at {safe}: {e}",
                    protocol::TASK_STREAM
                )),
            };
            Err(error.because(e))
        }
    }
}

pub(crate) fn redis_error(e: &redis::RedisError, safe: &str) -> ClientError {
    if e.is_timeout() {
        ClientError::connection(format!("Redis at {safe} did not answer in time ({e})"))
            .because(e.clone())
    } else {
        ClientError::connection(format!("Redis at {safe} failed: {e}")).because(e.clone())
    }
}

async fn connect_redis(
    url: &str,
    safe: &str,
    timeout: Duration,
    tls: &RedisTls,
) -> Result<(Source, Conn, Link), ClientError> {
    let invalid = |why: String| ClientError::value(format!("invalid Redis URL {safe}: {why}"));
    let target = Target::parse(url).map_err(invalid)?;
    let certs = tls.certificates().map_err(ClientError::value)?;
    if certs.is_some() && !target.tls() {
        return Err(ClientError::value(format!(
            "redis_ca, redis_cert and redis_key are for TLS: the Redis URL {safe} must start with \
             rediss:// (or rediss+cluster://, rediss+sentinel://)"
        )));
    }
    let unreachable = |e: String| {
        ClientError::connection(format!(
            "cannot reach Redis at {safe} ({e}): is redis-server running?"
        ))
    };
    let failed = |e: redis::RedisError| {
        if e.kind() == redis::ErrorKind::AuthenticationFailed
            || e.code().is_some_and(|c| c == "NOAUTH" || c == "WRONGPASS")
        {
            ClientError::connection(format!(
                "Redis at {safe} refused the password ({e}): check the password in the Redis URL \
                 (init's redis_url, or $DBTASK_REDIS_URL), as redis://:PASSWORD@host:port"
            ))
            .because(e)
        } else if target.tls() && is_tls_failure(&e) {
            ClientError::connection(format!(
                "TLS with Redis at {safe} failed ({e}): check that the server's certificate is \
                 signed by the CA given as redis_ca (or one of the system's), that the host \
                 name in the URL is one the certificate names, and for a server that checks \
                 clients, redis_cert and redis_key"
            ))
            .because(e)
        } else {
            unreachable(e.to_string()).because(e)
        }
    };
    let budget = timeout + Duration::from_secs(1);
    let sentinel = match &target {
        Target::Sentinel(s) => Some(Arc::new(
            SentinelMaster::open(s, certs.as_ref())
                .map_err(|e| invalid(e.to_string()).because(e))?,
        )),
        _ => None,
    };
    // Notifications: sharded on a cluster (see `notify.rs`), classic elsewhere.
    let source = match &target {
        Target::Cluster(nodes) => Source::Sharded(ShardedSource::new(
            nodes,
            certs.as_ref(),
            timeout,
            REDIS_RESPONSE_TIMEOUT,
        )),
        _ => Source::Classic(
            PubSubSource::new(&target, certs.as_ref(), sentinel.as_ref())
                .map_err(|e| invalid(e.to_string()).because(e))?,
        ),
    };
    let commands = async {
        let commands = tokio::time::timeout(budget, async {
            match &target {
                Target::Single(single) => {
                    let client = redis_conn::client(single, certs.as_ref())?;
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT))
                        // Reconnection attempts after a failure (the first connection is tried
                        // once more with these too, which keeps a closed port's error under a
                        // second).
                        .set_number_of_retries(2)
                        .set_max_delay(Duration::from_secs(2));
                    Ok(Conn::Managed(
                        ConnectionManager::new_with_config(client, config).await?,
                    ))
                }
                Target::Cluster(nodes) => Ok(Conn::Cluster(
                    redis_conn::connect_cluster(
                        nodes,
                        certs.as_ref(),
                        timeout,
                        REDIS_RESPONSE_TIMEOUT,
                    )
                    .await?,
                )),
                Target::Sentinel(_) => Ok(Conn::Redial(
                    Redial::connect(
                        Dialer::Sentinel(sentinel.clone().expect("made above for a Sentinel URL")),
                        timeout,
                        REDIS_RESPONSE_TIMEOUT,
                    )
                    .await?,
                )),
            }
        })
        .await
        .map_err(|_| unreachable("timed out".into()))?
        .map_err(failed)?;
        // A Redis that wants a password accepts the connection without one and refuses the
        // first command: ask now, so that init() says so rather than the first get().
        let mut ping = commands.clone();
        redis::cmd("PING")
            .query_async::<()>(&mut ping)
            .await
            .map_err(failed)?;
        if let Conn::Cluster(cluster) = &mut ping {
            redis_conn::check_sharded_pubsub(cluster)
                .await
                .map_err(|why| ClientError::connection(format!("Redis at {safe}: {why}")))?;
        }
        Ok(commands)
    };
    let pubsub = async {
        tokio::time::timeout(budget, source.connect())
            .await
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(failed)
    };
    let (commands, pubsub) = tokio::try_join!(commands, pubsub)?;
    Ok((source, commands, pubsub))
}

/// A TLS handshake or certificate failure, as opposed to a server that is not there.
fn is_tls_failure(e: &redis::RedisError) -> bool {
    if e.code().is_some() {
        return false; // a reply of the server: the connection worked
    }
    let text = e.to_string().to_ascii_lowercase();
    [
        "certificate",
        "tls",
        "handshake",
        "unknownissuer",
        "invalid peer",
    ]
    .iter()
    .any(|w| text.contains(w))
}

impl Inner {
    pub(crate) async fn connect(
        nats_url: String,
        redis_url: String,
        timeout: Duration,
        security: NatsSecurity,
        redis_tls: RedisTls,
        stream_replicas: usize,
    ) -> Result<Inner, ClientError> {
        let nats_safe = redact_url(&nats_url);
        let redis_safe = redact_url(&redis_url);
        let message_key = security.message_key()?;
        let (nats, (redis_client, redis, pubsub)) = tokio::try_join!(
            connect_nats(&nats_url, &nats_safe, timeout, &security),
            connect_redis(&redis_url, &redis_safe, timeout, &redis_tls)
        )?;
        let js = ContextBuilder::new()
            .timeout(PUBLISH_TIMEOUT)
            .max_ack_inflight(MAX_ACK_INFLIGHT)
            .backpressure_on_inflight(true)
            .build(nats.clone());
        ensure_stream(&js, &nats_safe, stream_replicas).await?;
        let notifier = Notifier::start(redis_client, pubsub, timeout, redis_safe.clone());
        Ok(Inner {
            nats,
            js,
            redis,
            notifier,
            nats_given: nats_url,
            redis_given: redis_url,
            security,
            redis_tls,
            message_key,
            nats_safe,
            redis_safe,
            stream_replicas,
            closed: AtomicBool::new(false),
            publishing: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
        })
    }

    pub(crate) fn check_open(&self) -> Result<(), ClientError> {
        if self.closed.load(Ordering::Acquire) {
            Err(ClientError::runtime(
                "this dbtask client is closed: call dbtask.init(...) again",
            ))
        } else {
            Ok(())
        }
    }

    /// Registers a publish; refused once the client is closed.
    pub(crate) fn start_publishing(self: &Arc<Self>) -> Result<Publishing, ClientError> {
        self.publishing.fetch_add(1, Ordering::SeqCst);
        let guard = Publishing(self.clone());
        self.check_open()?;
        Ok(guard)
    }

    pub(crate) async fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        // Publishes in progress get their confirmation (or their error) first.
        let deadline = Instant::now() + PUBLISH_TIMEOUT;
        loop {
            let idle = self.idle.notified();
            if self.publishing.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                break;
            }
        }
        let _ = tokio::time::timeout(PUBLISH_TIMEOUT, self.nats.flush()).await;
        let _ = self.nats.drain().await;
        self.notifier.close();
    }
}

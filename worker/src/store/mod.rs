//! Redis: result records (`dbtask:result:{<id>}`, with a TTL) and the done notifications
//! (`dbtask:done:{<id>}`: `PUBLISH`, or `SPUBLISH` on a Redis Cluster, where the channel's hash
//! tag keeps the notification on the shard that holds the record). Key and channel names come
//! from the protocol crate only.

mod canvas;
mod deliveries;
mod periodic;
mod rate;
mod revoke;
mod writer;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dbtask_protocol::redis_conn::{
    self, Conn, Dialer, PubSubSource, RedisTls, SentinelMaster, Target,
};
use dbtask_protocol::{
    done_channel, result_key, ResultRecord, DONE_CHANNEL_PREFIX, RESULT_KEY_PREFIX, TASK_TAG_END,
};
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, RedisWrite};
use tracing::{info, warn};

use crate::config::redact_url;

pub use deliveries::History;
pub use periodic::{TickClaim, TickRef};
pub use revoke::{Notices, RevocationFeed};
pub use writer::{Writer, WriterClosed, MAX_BATCH};

/// Why Redis could not do what was asked: what the worker was doing, at which (redacted)
/// URL, and the underlying error as the `source`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid Redis URL {url}: {source}")]
    BadUrl { url: String, source: Cause },
    #[error("cannot reach Redis at {url} ({source}): is redis-server running?")]
    Unreachable { url: String, source: Cause },
    #[error("Redis at {url} refused the connection ({source}): check the user and password in the Redis URL")]
    Refused { url: String, source: Cause },
    #[error("Redis at {url} failed: {source}")]
    Command { url: String, source: Cause },
    #[error("TLS with Redis at {url} failed ({source}): check that the server's certificate is signed by the CA of --redis-ca (or one of the system's), that the host in the URL is one the certificate names, and for a server that checks clients, --redis-cert and --redis-key")]
    Tls { url: String, source: Cause },
}

/// The error underneath a [`StoreError`], kept as it came (the Redis client's or the pool's),
/// with a short description for the common cases.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error("connection refused")]
    ConnectionRefused(#[source] redis::RedisError),
    #[error("timed out")]
    TimedOut(#[source] Option<redis::RedisError>),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    While {
        context: &'static str,
        source: redis::RedisError,
    },
}

/// One record to store, as the commands that store it: `SET dbtask:result:{<id>} json EX ttl`,
/// and for a ready state `PUBLISH dbtask:done:{<id>} json` (`SPUBLISH` on a cluster, see
/// [`Store::sharded`]). Built where the record is made: the
/// JSON is written once, straight into the SET command's buffer, and the writer only moves
/// the commands into its pipeline.
#[derive(Debug, Clone)]
pub struct RecordWrite {
    set: redis::Cmd,
    publish: Option<redis::Cmd>,
    /// About how many bytes the commands take on the wire (the JSON, once or twice).
    bytes: usize,
}

/// Room for a typical record's JSON in a command's buffer (more grows it).
const RECORD_JSON_HINT: usize = 320;

/// The command that publishes a notification: sharded on a cluster.
fn publish_command(sharded: bool) -> &'static str {
    if sharded {
        "SPUBLISH"
    } else {
        "PUBLISH"
    }
}

impl RecordWrite {
    pub fn new(record: &ResultRecord, ttl: u64, sharded: bool) -> Self {
        let id = record.id.as_bytes();
        let mut set = redis::Cmd::with_capacity(
            5,
            "SET".len()
                + RESULT_KEY_PREFIX.len()
                + id.len()
                + TASK_TAG_END.len()
                + RECORD_JSON_HINT
                + "EX".len()
                + 20,
        );
        set.arg("SET");
        write_parts(
            &mut set,
            &[RESULT_KEY_PREFIX.as_bytes(), id, TASK_TAG_END.as_bytes()],
        );
        record
            .encode_into(set.writer_for_next_arg())
            .expect("a ResultRecord always serializes");
        set.arg("EX").arg(ttl);
        let publish = record.state.is_ready().then(|| {
            // The JSON just written: the SET's third argument.
            let json = match set.args_iter().nth(2) {
                Some(redis::Arg::Simple(json)) => json,
                _ => unreachable!("SET key json: the third argument is the JSON"),
            };
            let command = publish_command(sharded);
            let mut publish = redis::Cmd::with_capacity(
                3,
                command.len() + DONE_CHANNEL_PREFIX.len() + id.len() + 1 + json.len(),
            );
            publish.arg(command);
            write_parts(
                &mut publish,
                &[DONE_CHANNEL_PREFIX.as_bytes(), id, TASK_TAG_END.as_bytes()],
            );
            publish.arg(json);
            publish
        });
        let json = match set.args_iter().nth(2) {
            Some(redis::Arg::Simple(json)) => json.len(),
            _ => 0,
        };
        let bytes = json * if publish.is_some() { 2 } else { 1 } + 64;
        RecordWrite {
            set,
            publish,
            bytes,
        }
    }
}

impl RecordWrite {
    /// A record whose JSON is already made (a task's own state, `update_state`): stored for
    /// `ttl` seconds and published, whatever its state, for `AsyncResult.progress()`.
    pub fn published(id: &str, json: &[u8], ttl: u64, sharded: bool) -> Self {
        let mut set = redis::Cmd::new();
        set.arg("SET")
            .arg(result_key(id))
            .arg(json)
            .arg("EX")
            .arg(ttl);
        let mut publish = redis::Cmd::new();
        publish
            .arg(publish_command(sharded))
            .arg(done_channel(id))
            .arg(json);
        RecordWrite {
            set,
            publish: Some(publish),
            bytes: 2 * json.len() + 64,
        }
    }
}

/// Appends one argument made of `parts`, without building it apart first.
fn write_parts(cmd: &mut redis::Cmd, parts: &[&[u8]]) {
    use std::io::Write;
    let mut arg = cmd.writer_for_next_arg();
    for part in parts {
        // Writing into the command's Vec cannot fail.
        let _ = arg.write_all(part);
    }
}

/// Redis for the worker: one multiplexed connection shared by every command, or for a Redis
/// Cluster the cluster connection (see `dbtask_protocol::redis_conn`).
///
/// A multiplexed connection serves concurrent commands by itself (they are pipelined), so the
/// store makes one connection, shares it, and drops it at the first connection error (or a
/// `READONLY` reply: a Sentinel failover demoted its server); the next command makes a fresh
/// one (for Sentinel, at the master the Sentinels name now).
#[derive(Clone)]
pub struct Store {
    backend: Arc<Backend>,
    /// Sentinel: Unix second until which writes do not wait for a replica (none was there).
    unreplicated_until: Arc<std::sync::atomic::AtomicU64>,
    shared: Arc<Mutex<Option<MultiplexedConnection>>>,
    /// A connection error dropped the shared connection: the next one is a reconnection.
    lost: Arc<std::sync::atomic::AtomicBool>,
    /// Sentinel: the address the shared connection was made to.
    dialed: Arc<Mutex<Option<redis::ConnectionAddr>>>,
    /// Where the revocation feed subscribes (see [`Store::pubsub_source`]).
    pubsub: PubSubSource,
    /// Notifications are sharded (see [`Store::sharded`]).
    sharded: bool,
    url: String,
    result_ttl: u64,
}

enum Backend {
    /// A single server or a Sentinel master.
    Dial(Dialer),
    /// A Redis Cluster (reconnects and follows slot moves by itself).
    Cluster(ClusterConnection),
}

/// How long a write to a Sentinel master waits for a replica to have it.
const REPLICA_WAIT: Duration = Duration::from_secs(2);
/// After a Sentinel master was found without a replica, how long writes do not wait for one.
const UNREPLICATED_RECHECK_SECS: u64 = 10;
/// How long making a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// redis-rs times a request out after 500 ms by default: too short for a result of several
/// megabytes on a busy server. Failures are retried by the callers anyway.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

impl Store {
    /// Connects (to a plain Redis, with the system's CA store for `rediss://`) and checks
    /// that Redis answers (PING).
    pub async fn connect(redis_url: &str, result_ttl: u64) -> Result<Store, StoreError> {
        Store::connect_with(redis_url, &RedisTls::default(), result_ttl).await
    }

    /// Connects to the Redis `redis_url` names (a server, a Sentinel group or a Cluster, see
    /// [`Target`]) with the TLS files `tls`, and checks that it answers (PING).
    pub async fn connect_with(
        redis_url: &str,
        tls: &RedisTls,
        result_ttl: u64,
    ) -> Result<Store, StoreError> {
        let url = redact_url(redis_url);
        let bad = |e: Cause| StoreError::BadUrl {
            url: url.clone(),
            source: e,
        };
        let target = Target::parse(redis_url).map_err(|why| bad(Cause::Invalid(why)))?;
        let certs = tls.certificates().map_err(|why| bad(Cause::Invalid(why)))?;
        let backend = match &target {
            Target::Single(single) => Backend::Dial(Dialer::Single(Box::new(
                redis_conn::client(single, certs.as_ref()).map_err(|e| bad(e.into()))?,
            ))),
            Target::Sentinel(sentinel) => Backend::Dial(Dialer::Sentinel(Arc::new(
                SentinelMaster::open(sentinel, certs.as_ref()).map_err(|e| bad(e.into()))?,
            ))),
            Target::Cluster(nodes) => {
                let conn = tokio::time::timeout(
                    CONNECT_TIMEOUT + Duration::from_secs(1),
                    redis_conn::connect_cluster(
                        nodes,
                        certs.as_ref(),
                        CONNECT_TIMEOUT,
                        RESPONSE_TIMEOUT,
                    ),
                )
                .await
                .map_err(|_| StoreError::Unreachable {
                    url: url.clone(),
                    source: Cause::TimedOut(None),
                })?
                .map_err(|e| classify(url.clone(), e))?;
                let mut checked = conn.clone();
                redis_conn::check_sharded_pubsub(&mut checked)
                    .await
                    .map_err(|why| StoreError::Command {
                        url: url.clone(),
                        source: Cause::Invalid(why),
                    })?;
                Backend::Cluster(conn)
            }
        };
        let sentinel = match &backend {
            Backend::Dial(Dialer::Sentinel(master)) => Some(master),
            _ => None,
        };
        let pubsub =
            PubSubSource::new(&target, certs.as_ref(), sentinel).map_err(|e| bad(e.into()))?;
        let store = Store {
            backend: Arc::new(backend),
            unreplicated_until: Arc::default(),
            dialed: Arc::default(),
            shared: Arc::default(),
            lost: Arc::default(),
            pubsub,
            sharded: redis_conn::sharded_notifications(&target),
            url,
            result_ttl,
        };
        let mut conn = store.conn().await?;
        redis::cmd("PING")
            .exec_async(&mut conn)
            .await
            .map_err(|e| store.redis_error(e))?;
        Ok(store)
    }

    /// Whether Redis answers a PING now, within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Result<(), StoreError> {
        let ping = async {
            let mut conn = self.conn().await?;
            redis::cmd("PING")
                .exec_async(&mut conn)
                .await
                .map_err(|e| self.redis_error(e))
        };
        tokio::time::timeout(timeout, ping)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unreachable {
                    url: self.url.clone(),
                    source: Cause::TimedOut(None),
                })
            })
    }

    /// Where the revocation feed subscribes (classic pub/sub): the same server, Sentinel
    /// master (followed through failovers with the store) or any node of the Cluster.
    pub(crate) fn pubsub_source(&self) -> &PubSubSource {
        &self.pubsub
    }

    /// True when notifications are sharded (`SPUBLISH`): on a Redis Cluster.
    pub fn sharded(&self) -> bool {
        self.sharded
    }

    /// How long records are kept, in seconds.
    pub fn result_ttl(&self) -> u64 {
        self.result_ttl
    }

    /// The URL with its secrets hidden.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `redis_version` from `INFO server`.
    pub async fn server_version(&self) -> Result<String, StoreError> {
        let mut conn = self.conn().await?;
        // A cluster asks every node and answers with a map of node to text: take any node's.
        let info: redis::Value = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        let text = match info {
            redis::Value::Map(nodes) => nodes.into_iter().next().map(|(_, text)| text),
            other => Some(other),
        };
        let info: String = text
            .and_then(|text| redis::from_redis_value(text).ok())
            .unwrap_or_default();
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("unknown")
            .trim()
            .to_owned())
    }

    /// The stored record of a task, `None` when there is none (PENDING) or it is unreadable.
    pub async fn get(&self, task_id: &str) -> Result<Option<ResultRecord>, StoreError> {
        let mut conn = self.conn().await?;
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(result_key(task_id))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        Ok(raw.and_then(|bytes| match ResultRecord::decode(&bytes) {
            Ok(record) => Some(record),
            Err(e) => {
                warn!(task_id, error = %e, "ignoring an unreadable result record in Redis");
                None
            }
        }))
    }

    /// Runs a pipeline of record writes (see [`Writer`]) in one round trip.
    pub async fn put(&self, pipe: &redis::Pipeline) -> Result<(), StoreError> {
        if pipe.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        // No command is marked ignored: a server error still fails the whole call, and the
        // replies (OK and subscriber counts) are dropped unread.
        pipe.exec_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        self.replicated(&mut conn).await
    }

    /// With Sentinel, waits until a replica has what this connection wrote, so that a
    /// failover to that replica keeps it. A master that a failover already replaced accepts
    /// writes for a moment before it is demoted, and no replica gets them: then this fails,
    /// the caller writes again, and the write reaches the new master. A master without any
    /// replica (its replica is down) is trusted as it is. Nothing for other kinds of Redis.
    pub(crate) async fn replicated(&self, conn: &mut Conn) -> Result<(), StoreError> {
        if !matches!(self.backend.as_ref(), Backend::Dial(Dialer::Sentinel(_))) {
            return Ok(());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if now
            < self
                .unreplicated_until
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(());
        }
        let acked: i64 = redis::cmd("WAIT")
            .arg(1)
            .arg(REPLICA_WAIT.as_millis() as u64)
            .query_async(conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        if acked > 0 {
            return Ok(());
        }
        // No replica has it. Either this master has none (its replica is down), or a failover
        // promoted the replica and this server is a master no longer (the Sentinels demote
        // it a few seconds later, and it loses what it took meanwhile): ask the Sentinels.
        let Backend::Dial(Dialer::Sentinel(sentinels)) = self.backend.as_ref() else {
            return Ok(());
        };
        let now_master = sentinels
            .master_addr()
            .await
            .map_err(|e| self.redis_error(e))?;
        let dialed = self
            .dialed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(ToString::to_string);
        if dialed.as_deref() == Some(now_master.to_string().as_str()) {
            // No replica: do not wait for one on every write; look again in a while.
            warn!(
                url = self.url,
                "the Redis master has no replica that confirms writes: a failover now would lose the latest results"
            );
            self.unreplicated_until.store(
                now + UNREPLICATED_RECHECK_SECS,
                std::sync::atomic::Ordering::Relaxed,
            );
            return Ok(());
        }
        self.lock_shared().take();
        Err(StoreError::Command {
            url: self.url.clone(),
            source: Cause::Invalid(format!(
                "the Sentinels moved the master to {now_master} before a replica had the write (a failover): writing again to the new master"
            )),
        })
    }

    /// Runs `op` until it succeeds, backing off from 100 ms to 5 s between attempts and logging
    /// each failure: a Redis outage delays acks, it never loses a message.
    pub async fn retrying<T, F, Fut>(&self, what: &'static str, mut op: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut delay = Duration::from_millis(100);
        let mut failures = 0u32;
        loop {
            match op().await {
                Ok(value) => {
                    if failures > 0 {
                        info!(url = self.url, operation = what, failures, "Redis is back");
                    }
                    return value;
                }
                Err(e) => {
                    failures += 1;
                    warn!(
                        url = self.url,
                        operation = what,
                        error = %e,
                        failures,
                        retry_in_ms = delay.as_millis() as u64,
                        "Redis failed; retrying (messages stay unacked meanwhile)"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// The connection to use (see [`Store`]); made when there is none.
    pub(crate) async fn conn(&self) -> Result<Conn, StoreError> {
        let dialer = match self.backend.as_ref() {
            Backend::Cluster(cluster) => return Ok(Conn::Cluster(cluster.clone())),
            Backend::Dial(dialer) => dialer,
        };
        if let Some(conn) = self.lock_shared().as_ref() {
            return Ok(Conn::Multiplexed(conn.clone()));
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let (fresh, addr) = tokio::time::timeout(
            CONNECT_TIMEOUT + Duration::from_secs(1),
            dialer.connect_to(&config),
        )
        .await
        .map_err(|_| StoreError::Unreachable {
            url: self.url.clone(),
            source: Cause::TimedOut(None),
        })?
        .map_err(|e| self.redis_error(e))?;
        if self.lost.swap(false, std::sync::atomic::Ordering::Relaxed) {
            crate::monitor::counts::REDIS.reconnect();
        }
        let mut shared = self.lock_shared();
        if shared.is_none() {
            *self.dialed.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
        }
        Ok(Conn::Multiplexed(shared.get_or_insert(fresh).clone()))
    }

    fn lock_shared(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        // Never held across an await, and nothing in it can panic: recover regardless.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns a command's error into a [`StoreError`]; after a connection error the shared
    /// connection is dropped, so that the next command takes a fresh one.
    fn redis_error(&self, e: redis::RedisError) -> StoreError {
        if Conn::is_stale(&e) {
            self.lock_shared().take();
            self.lost.store(true, std::sync::atomic::Ordering::Relaxed);
            crate::monitor::counts::REDIS.error();
        }
        classify(self.url.clone(), e)
    }
}

/// A TLS handshake or certificate failure, as opposed to a server that is not there.
fn is_tls_failure(e: &redis::RedisError) -> bool {
    if e.code().is_some() {
        return false; // a reply of the server: the connection worked
    }
    let text = e.to_string().to_ascii_lowercase();
    ["certificate", "tls", "handshake", "unknownissuer"]
        .iter()
        .any(|w| text.contains(w))
}

/// A Redis error as a [`StoreError`] for `url`.
fn classify(url: String, e: redis::RedisError) -> StoreError {
    if is_tls_failure(&e) {
        StoreError::Tls {
            url,
            source: e.into(),
        }
    } else if e.is_connection_refusal() {
        StoreError::Unreachable {
            url,
            source: Cause::ConnectionRefused(e),
        }
    } else if e.is_timeout() {
        StoreError::Unreachable {
            url,
            source: Cause::TimedOut(Some(e)),
        }
    } else if e.kind() == redis::ErrorKind::AuthenticationFailed
        || e.code().is_some_and(|c| c == "NOAUTH" || c == "WRONGPASS")
    {
        StoreError::Refused {
            url,
            source: e.into(),
        }
    } else if e.is_io_error() || e.is_connection_dropped() {
        StoreError::Unreachable {
            url,
            source: e.into(),
        }
    } else {
        StoreError::Command {
            url,
            source: e.into(),
        }
    }
}

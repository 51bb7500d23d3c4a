//! Redis: result records (`dbtask:result:<id>`, with a TTL) and the done notifications
//! (`dbtask:done:<id>`). Key and channel names come from the protocol crate only.

mod canvas;
mod deliveries;
mod periodic;
mod rate;
mod revoke;
mod writer;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dbtask_protocol::{
    done_channel, result_key, ResultRecord, DONE_CHANNEL_PREFIX, RESULT_KEY_PREFIX,
};
use deadpool_redis::{Manager, Pool, PoolError, Runtime};
use redis::aio::MultiplexedConnection;
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
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Build(#[from] deadpool_redis::BuildError),
    #[error("{context}: {source}")]
    While {
        context: &'static str,
        source: redis::RedisError,
    },
}

/// One record to store, as the commands that store it: `SET dbtask:result:<id> json EX ttl`,
/// and for a ready state `PUBLISH dbtask:done:<id> json`. Built where the record is made: the
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

impl RecordWrite {
    pub fn new(record: &ResultRecord, ttl: u64) -> Self {
        let id = record.id.as_bytes();
        let mut set = redis::Cmd::with_capacity(
            5,
            "SET".len() + RESULT_KEY_PREFIX.len() + id.len() + RECORD_JSON_HINT + "EX".len() + 20,
        );
        set.arg("SET");
        write_parts(&mut set, &[RESULT_KEY_PREFIX.as_bytes(), id]);
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
            let mut publish = redis::Cmd::with_capacity(
                3,
                "PUBLISH".len() + DONE_CHANNEL_PREFIX.len() + id.len() + json.len(),
            );
            publish.arg("PUBLISH");
            write_parts(&mut publish, &[DONE_CHANNEL_PREFIX.as_bytes(), id]);
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
    pub fn published(id: &str, json: &[u8], ttl: u64) -> Self {
        let mut set = redis::Cmd::new();
        set.arg("SET")
            .arg(result_key(id))
            .arg(json)
            .arg("EX")
            .arg(ttl);
        let mut publish = redis::Cmd::new();
        publish.arg("PUBLISH").arg(done_channel(id)).arg(json);
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

/// Redis for the worker: a pool of multiplexed connections, of which one is kept out and
/// shared by every command.
///
/// A multiplexed connection serves concurrent commands by itself (they are pipelined), and
/// taking one from the pool costs a round trip each time (deadpool-redis checks it with a
/// PING): every batch of results and every chord count would pay two round trips instead of
/// one. So the store takes one connection from the pool (checked then), shares it, and drops
/// it at the first connection error; the next command takes a fresh one from the pool.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    shared: Arc<Mutex<Option<MultiplexedConnection>>>,
    /// A connection error dropped the shared connection: the next one is a reconnection.
    lost: Arc<std::sync::atomic::AtomicBool>,
    url: String,
    result_ttl: u64,
}

impl Store {
    /// Builds the pool and checks that Redis answers (PING).
    pub async fn connect(redis_url: &str, result_ttl: u64) -> Result<Store, StoreError> {
        let url = redact_url(redis_url);
        let bad = |e: redis::RedisError| StoreError::BadUrl {
            url: url.clone(),
            source: e.into(),
        };
        // redis-rs times a request out after 500 ms by default: too short for a result of
        // several megabytes on a busy server. Failures are retried by the callers anyway.
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        let manager = Manager::new_with_config(redis_url, connection).map_err(bad)?;
        let pool = Pool::builder(manager)
            .max_size(8)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(6)))
            .wait_timeout(Some(Duration::from_secs(15)))
            .build()
            .map_err(|e| StoreError::BadUrl {
                url: url.clone(),
                source: e.into(),
            })?;
        let store = Store {
            pool,
            shared: Arc::default(),
            lost: Arc::default(),
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
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
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
            .map_err(|e| self.redis_error(e))
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

    /// The shared connection (see [`Store`]); taken from the pool when there is none.
    async fn conn(&self) -> Result<MultiplexedConnection, StoreError> {
        if let Some(conn) = self.lock_shared().as_ref() {
            return Ok(conn.clone());
        }
        let fresh = deadpool_redis::Connection::take(self.pooled().await?);
        if self.lost.swap(false, std::sync::atomic::Ordering::Relaxed) {
            crate::monitor::counts::REDIS.reconnect();
        }
        Ok(self.lock_shared().get_or_insert(fresh).clone())
    }

    fn lock_shared(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        // Never held across an await, and nothing in it can panic: recover regardless.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn pooled(&self) -> Result<deadpool_redis::Connection, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => self.redis_error(e),
            PoolError::Timeout(_) => StoreError::Unreachable {
                url: self.url.clone(),
                source: Cause::TimedOut(None),
            },
            other => StoreError::Command {
                url: self.url.clone(),
                source: other.into(),
            },
        })
    }

    /// Turns a command's error into a [`StoreError`]; after a connection error the shared
    /// connection is dropped, so that the next command takes a fresh one.
    fn redis_error(&self, e: redis::RedisError) -> StoreError {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error()
        {
            self.lock_shared().take();
            self.lost.store(true, std::sync::atomic::Ordering::Relaxed);
            crate::monitor::counts::REDIS.error();
        }
        let url = self.url.clone();
        if e.is_connection_refusal() {
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
}

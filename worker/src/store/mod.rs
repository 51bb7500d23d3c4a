//! Redis: result records (`dbtask:result:<id>`, with a TTL) and the done notifications
//! (`dbtask:done:<id>`). Key and channel names come from the protocol crate only.

mod rate;
mod writer;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dbtask_protocol::{done_channel, result_key, ResultRecord};
use deadpool_redis::{Manager, Pool, PoolError, Runtime};
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tracing::{info, warn};

use crate::config::redact_url;

pub use writer::{Writer, WriterClosed, MAX_BATCH};

/// Why Redis could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid Redis URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot reach Redis at {url} ({reason}): is redis-server running?")]
    Unreachable { url: String, reason: String },
    #[error("Redis at {url} refused the connection ({reason}): check the user and password in the Redis URL")]
    Refused { url: String, reason: String },
    #[error("Redis at {url} failed: {reason}")]
    Command { url: String, reason: String },
}

/// One record to store: its JSON is both the value of the result key and, for a ready state,
/// the message published on the done channel.
#[derive(Debug, Clone)]
pub struct RecordWrite {
    pub id: String,
    pub json: Vec<u8>,
    pub ready: bool,
}

impl RecordWrite {
    pub fn new(record: &ResultRecord) -> Self {
        RecordWrite {
            id: record.id.clone(),
            json: record.encode(),
            ready: record.state.is_ready(),
        }
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
    url: String,
    result_ttl: u64,
}

impl Store {
    /// Builds the pool and checks that Redis answers (PING).
    pub async fn connect(redis_url: &str, result_ttl: u64) -> Result<Store, StoreError> {
        let url = redact_url(redis_url);
        let bad = |e: redis::RedisError| StoreError::BadUrl {
            url: url.clone(),
            reason: e.to_string(),
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
                reason: e.to_string(),
            })?;
        let store = Store {
            pool,
            shared: Arc::default(),
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

    /// Stores records in one pipeline: `SET key json EX result_ttl` for each, plus
    /// `PUBLISH dbtask:done:<id> json` right after the SET of each ready state.
    pub async fn put(&self, writes: &[&RecordWrite]) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for w in writes {
            pipe.set_ex(result_key(&w.id), w.json.as_slice(), self.result_ttl)
                .ignore();
            if w.ready {
                pipe.publish(done_channel(&w.id), w.json.as_slice())
                    .ignore();
            }
        }
        let mut conn = self.conn().await?;
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
    pub(crate) async fn conn(&self) -> Result<MultiplexedConnection, StoreError> {
        if let Some(conn) = self.lock_shared().as_ref() {
            return Ok(conn.clone());
        }
        let fresh = deadpool_redis::Connection::take(self.pooled().await?);
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
                reason: "timed out".into(),
            },
            other => StoreError::Command {
                url: self.url.clone(),
                reason: other.to_string(),
            },
        })
    }

    /// Turns a command's error into a [`StoreError`]; after a connection error the shared
    /// connection is dropped, so that the next command takes a fresh one.
    pub(crate) fn redis_error(&self, e: redis::RedisError) -> StoreError {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error()
        {
            self.lock_shared().take();
        }
        let url = self.url.clone();
        if e.is_connection_refusal() {
            StoreError::Unreachable {
                url,
                reason: "connection refused".into(),
            }
        } else if e.is_timeout() {
            StoreError::Unreachable {
                url,
                reason: "timed out".into(),
            }
        } else if e.kind() == redis::ErrorKind::AuthenticationFailed
            || e.code().is_some_and(|c| c == "NOAUTH" || c == "WRONGPASS")
        {
            StoreError::Refused {
                url,
                reason: e.to_string(),
            }
        } else if e.is_io_error() || e.is_connection_dropped() {
            StoreError::Unreachable {
                url,
                reason: e.to_string(),
            }
        } else {
            StoreError::Command {
                url,
                reason: e.to_string(),
            }
        }
    }
}

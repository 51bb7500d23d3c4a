//! The cluster-wide rate limiter of `@task(rate_limit=...)`: one Lua script (GCRA with
//! reservations) on `dbtask:rate:<task>`, so every worker of every queue shares one budget.

use dbtask_protocol::{rate_key, Rate};

use super::{Store, StoreError};

/// Reserves the next start slot of a task and returns the microseconds to wait for it (0: now).
///
/// KEYS[1]: the limiter key; ARGV[1]: microseconds between two starts. The key holds the
/// time (Redis clock, microseconds) from which the next start is allowed; each call takes the
/// slot at `max(that, now)` and moves it one interval on, so callers never retry and never
/// busy-loop: they sleep until their own slot.
const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local next_at = tonumber(redis.call('GET', KEYS[1]) or '0')
if next_at < now then next_at = now end
redis.call('SET', KEYS[1], string.format('%.0f', next_at + interval), 'PX', math.ceil((next_at + interval - now) / 1000) + 1000)
return string.format('%.0f', next_at - now)
"#;

impl Store {
    /// Reserves a start slot for `task` under `rate`; the result is how long to wait for it.
    pub async fn reserve_rate_slot(
        &self,
        task: &str,
        rate: Rate,
    ) -> Result<std::time::Duration, StoreError> {
        let mut conn = self.conn().await?;
        // EVAL (not EVALSHA): Redis caches the compiled script by its text's hash anyway.
        let wait: String = redis::cmd("EVAL")
            .arg(RESERVE)
            .arg(1)
            .arg(rate_key(task))
            .arg(rate.interval_micros())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        let micros: u64 = wait.parse().unwrap_or(0);
        Ok(std::time::Duration::from_micros(micros))
    }
}

impl Store {
    /// The rate limits set with `dbtask control rate-limit` (task name -> rate text, `"0"`
    /// for none), which win over the tasks' own.
    pub async fn rate_overrides(
        &self,
    ) -> Result<std::collections::HashMap<String, String>, StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("HGETALL")
            .arg(dbtask_protocol::RATE_OVERRIDES_KEY)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))
    }

    /// Keeps `task`'s rate limit override (`"0"`: no limit) for every worker, present and future.
    pub async fn set_rate_override(&self, task: &str, rate: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("HSET")
            .arg(dbtask_protocol::RATE_OVERRIDES_KEY)
            .arg(task)
            .arg(rate)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))
    }
}

//! The Redis side of periodic ticks (see `runner/tick.rs`): one script claims a tick for the
//! delivered message that runs it, takes the schedule's running mark (`skip_if_running`) and
//! notes the tick as the schedule's last; another gives the running mark back.

use dbtask_protocol::periodic::{periodic_key, periodic_running_key, tick_claim_key};

use super::{Store, StoreError};

/// How long a tick stays claimed by the message that first took it: copies of the tick (a
/// `dbtask schedule run` in the same second, a server firing it twice) that arrive within it
/// are dropped. Far longer than any copy takes to arrive; the keys are tiny.
const CLAIM_TTL_SECS: u64 = 3600;

/// KEYS: the tick's claim, the schedule's running mark, the schedule's hash.
/// ARGV: the message's stream sequence, the tick id, the claim's TTL, the running mark's TTL
/// (0: none), the tick time, the next tick time ('' if unknown).
const ADMIT: &str = r#"
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return {'duplicate', owner} end
if tonumber(ARGV[4]) > 0 then
  local running = redis.call('GET', KEYS[2])
  if running and running ~= ARGV[2] then return {'running', running} end
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[4])
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('HSET', KEYS[3], 'last_id', ARGV[2], 'last_at', ARGV[5])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[3], 'next_at', ARGV[6]) end
return {'run', ''}
"#;

/// KEYS: the running mark; ARGV: the tick id that holds it.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// What the store says of a delivered tick.
#[derive(Debug, PartialEq, Eq)]
pub enum TickClaim {
    /// Claimed for this message: run it.
    Run,
    /// Another message of the same tick claimed it (its stream sequence): drop this copy.
    Duplicate(String),
    /// `skip_if_running`, and this earlier tick still runs.
    PreviousRunning(String),
}

/// A delivered tick, as the store needs it.
pub struct TickRef<'a> {
    pub schedule: &'a str,
    pub id: &'a str,
    pub stream_seq: u64,
    pub time: i64,
    pub next: Option<f64>,
    /// Seconds the running mark lasts at most; `None`: ticks may overlap.
    pub running_ttl: Option<u64>,
}

impl Store {
    /// Claims `tick` for its message (see [`TickClaim`]).
    pub async fn claim_tick(&self, tick: &TickRef<'_>) -> Result<TickClaim, StoreError> {
        let mut conn = self.conn().await?;
        let (verdict, other): (String, String) = redis::cmd("EVAL")
            .arg(ADMIT)
            .arg(3)
            .arg(tick_claim_key(tick.schedule, tick.id))
            .arg(periodic_running_key(tick.schedule))
            .arg(periodic_key(tick.schedule))
            .arg(tick.stream_seq)
            .arg(tick.id)
            .arg(CLAIM_TTL_SECS)
            .arg(tick.running_ttl.unwrap_or(0))
            .arg(tick.time)
            .arg(tick.next.map(|n| n.to_string()).unwrap_or_default())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        Ok(match verdict.as_str() {
            "duplicate" => TickClaim::Duplicate(other),
            "running" => TickClaim::PreviousRunning(other),
            _ => TickClaim::Run,
        })
    }

    /// Gives back schedule `schedule`'s running mark if tick `id` holds it.
    pub async fn release_tick(&self, schedule: &str, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: i64 = redis::cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(periodic_running_key(schedule))
            .arg(id)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        Ok(())
    }
}

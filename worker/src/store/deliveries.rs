//! Deliveries of a task message that should not count against `max_deliver`: lost while the
//! message waited in a worker that died or stopped, never run. Read only when a message
//! reaches its last allowed delivery, so they cost nothing on the way there.

use dbtask_protocol::deliveries_key;

use super::{Store, StoreError};

/// How long a message's history is kept: far longer than its redeliveries take.
const HISTORY_TTL_SECS: u64 = 86_400;

/// What Redis knows of a message's lost deliveries.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct History {
    /// Deliveries lost while it waited without running (not charged).
    pub idle: i64,
    /// Deliveries whose run a dying worker cut short.
    pub lost: i64,
    /// How the last worker that died while running it died.
    pub cause: Option<String>,
}

impl History {
    /// Of `delivered` deliveries (this one included), those that count against `max_deliver`.
    pub fn charged(&self, delivered: i64) -> i64 {
        (delivered - self.idle.max(0)).max(1)
    }
}

impl Store {
    /// Records what a dead worker held: `idle` messages were not running (their delivery is
    /// not charged), `running` ones were (cut short by `cause`). One round trip.
    pub async fn record_crash(
        &self,
        idle: &[u64],
        running: &[u64],
        cause: &str,
    ) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for seq in idle {
            let key = deliveries_key(*seq);
            pipe.hincr(&key, "idle", 1).ignore();
            pipe.expire(&key, HISTORY_TTL_SECS as i64).ignore();
        }
        for seq in running {
            let key = deliveries_key(*seq);
            pipe.hincr(&key, "lost", 1).ignore();
            pipe.hset(&key, "cause", cause).ignore();
            pipe.expire(&key, HISTORY_TTL_SECS as i64).ignore();
        }
        self.put(&pipe).await
    }

    /// A message handed back without having run (a shutdown): its next delivery is not
    /// charged.
    pub async fn record_idle_delivery(&self, seq: u64) -> Result<(), StoreError> {
        self.record_crash(&[seq], &[], "").await
    }

    /// The lost deliveries of the message at stream sequence `seq`.
    pub async fn delivery_history(&self, seq: u64) -> Result<History, StoreError> {
        let mut conn = self.conn().await?;
        let (idle, lost, cause): (Option<i64>, Option<i64>, Option<String>) = redis::cmd("HMGET")
            .arg(deliveries_key(seq))
            .arg(&["idle", "lost", "cause"])
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        Ok(History {
            idle: idle.unwrap_or(0),
            lost: lost.unwrap_or(0),
            cause: cause.filter(|c| !c.is_empty()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::History;

    #[test]
    fn only_deliveries_lost_while_running_are_charged() {
        let none = History::default();
        assert_eq!(none.charged(10), 10);
        let waited = History {
            idle: 4,
            ..History::default()
        };
        assert_eq!(waited.charged(10), 6);
        assert_eq!(waited.charged(3), 1, "this delivery always counts");
    }
}

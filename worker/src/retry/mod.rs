//! Retries and delayed runs: a task's retry policy, the delay of its next attempt, and the
//! message that carries a task to a later time.
//!
//! A task waiting for a later time (countdown, eta, retry) lives in JetStream as a NATS message
//! schedule (ADR-51, nats-server 2.12+) on `dbtask.sched.<queue>.<id>`: at its time the server
//! publishes it to `dbtask.tasks.<queue>`. Nothing waits in the worker's memory.

use async_nats::jetstream;
use async_nats::HeaderMap;
use dbtask_protocol::{now_unix, TaskMessage, HEADER_MSG_ID, HEADER_TASK, HEADER_TASK_ID};

/// Defaults, as documented in the README (Celery's `max_retries` default; a shorter delay).
pub const DEFAULT_MAX_RETRIES: u32 = 3;
pub const DEFAULT_RETRY_DELAY: f64 = 1.0;
pub const DEFAULT_RETRY_BACKOFF_MAX: f64 = 600.0;

/// A task's retry options (`@task(max_retries=..., retry_delay=..., ...)`).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    /// Seconds before a retry (the first one, with a backoff).
    pub retry_delay: f64,
    /// `Some(factor)`: the delay is `factor * 2**retries` seconds.
    pub retry_backoff: Option<f64>,
    pub retry_backoff_max: f64,
    /// With a backoff: a random delay between 0 and the backoff delay ("full jitter").
    pub retry_jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: DEFAULT_MAX_RETRIES,
            retry_delay: DEFAULT_RETRY_DELAY,
            retry_backoff: None,
            retry_backoff_max: DEFAULT_RETRY_BACKOFF_MAX,
            retry_jitter: true,
        }
    }
}

impl RetryPolicy {
    /// Seconds until retry number `retries + 1`, given `retries` retries so far.
    pub fn delay(&self, retries: u32) -> f64 {
        match self.retry_backoff {
            None => self.retry_delay.max(0.0),
            Some(factor) => {
                let full = (factor * 2f64.powi(retries.min(62) as i32))
                    .min(self.retry_backoff_max)
                    .max(0.0);
                if self.retry_jitter {
                    full * random_unit()
                } else {
                    full
                }
            }
        }
    }
}

/// A number in [0, 1), good enough for jitter (no crate needed).
fn random_unit() -> f64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Publishes `task` so that it runs at `task.eta` (at once when it is absent or past):
/// a message schedule on `dbtask.sched.<queue>.<id>`, or the queue's subject directly.
/// `msg_id` deduplicates a second publish (after a crash) within the stream's window.
/// Returns once JetStream has stored it.
pub async fn publish_at(
    js: &jetstream::Context,
    queue: &str,
    task: &TaskMessage,
    msg_id: &str,
) -> Result<(), String> {
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_MSG_ID, msg_id);
    headers.insert(HEADER_TASK_ID, task.id.as_str());
    headers.insert(HEADER_TASK, task.task.as_str());
    let route = task.route(queue, now_unix());
    for (name, value) in route.headers() {
        headers.insert(name, value);
    }
    let ack = js
        .publish_with_headers(route.subject, headers, task.encode().into())
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map(|_| ()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_follow_the_policy() {
        let fixed = RetryPolicy {
            retry_delay: 2.0,
            ..Default::default()
        };
        assert_eq!(fixed.delay(0), 2.0);
        assert_eq!(fixed.delay(5), 2.0);
        let backoff = RetryPolicy {
            retry_backoff: Some(1.0),
            retry_backoff_max: 10.0,
            retry_jitter: false,
            ..Default::default()
        };
        assert_eq!(
            (0..5).map(|r| backoff.delay(r)).collect::<Vec<_>>(),
            vec![1.0, 2.0, 4.0, 8.0, 10.0]
        );
        let jitter = RetryPolicy {
            retry_jitter: true,
            ..backoff
        };
        for r in 0..6 {
            let d = jitter.delay(r);
            assert!(
                (0.0..=10.0).contains(&d) && d <= 2f64.powi(r as i32),
                "{r}: {d}"
            );
        }
    }
}

//! Retries and delayed runs: a task's retry policy, the decision whether a failed call runs
//! again and when, and the message that carries a task to a later time. The Python side only
//! reads a raised `dbtask.Retry`'s fields and a task's options (`python/retry.rs`); what they
//! mean is decided here.
//!
//! A task waiting for a later time (countdown, eta, retry) lives in JetStream as a NATS message
//! schedule (ADR-51, nats-server 2.12+) on `dbtask.sched.<queue>.<id>`: at its time the server
//! publishes it to `dbtask.tasks.<queue>`. Nothing waits in the worker's memory.

use async_nats::jetstream::context::PublishError;
use dbtask_protocol::{error_types, retry_msg_id, TaskError, TaskMessage, Trace};

use crate::broker::Broker;

/// Defaults, as documented in docs/retries.md (Celery's `max_retries` default; a shorter delay).
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

/// A task's request to run again: `raise dbtask.Retry(...)`, `self.retry()`, or an exception
/// listed in its `autoretry_for`.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Seconds until the next attempt; `None`: the task's policy decides.
    pub countdown: Option<f64>,
    /// Overrides the task's `max_retries` for this decision.
    pub max_retries: Option<u32>,
    /// The error recorded (RETRY now, FAILURE when no retry is left).
    pub error: TaskError,
    /// A bare `Retry` without `exc`: its error is only a request, not a task failure.
    pub explicit: bool,
}

/// What becomes of a retry request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run again in `delay` seconds (>= 0) as retry number `retries`; record RETRY with `error`.
    Again {
        retries: u32,
        delay: f64,
        max_retries: u32,
        error: TaskError,
    },
    /// No retry left: record FAILURE with `error`.
    Exhausted { max_retries: u32, error: TaskError },
}

/// Decides a retry request of a call that had `retries` retries before it.
pub fn decide(policy: &RetryPolicy, retries: u32, request: Request) -> Decision {
    let max = request.max_retries.unwrap_or(policy.max_retries);
    if retries >= max {
        let error = if request.explicit {
            TaskError::new(
                error_types::MAX_RETRIES_EXCEEDED,
                format!(
                    "the task asked for a retry after {retries} retries, its max_retries is {max}"
                ),
            )
        } else {
            request.error
        };
        return Decision::Exhausted {
            max_retries: max,
            error,
        };
    }
    Decision::Again {
        retries: retries + 1,
        delay: request
            .countdown
            .unwrap_or_else(|| policy.delay(retries))
            .max(0.0),
        max_retries: max,
        error: request.error,
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

/// Publishes the next attempt of a task that asked for a retry: its message as it came, as
/// retry number `retries`, due at `eta` (at once when `None`). Deduplicated per retry number,
/// so that a redelivery of the failed attempt that publishes it again schedules it once.
pub async fn publish_retry(
    broker: &Broker,
    queue: &str,
    mut task: TaskMessage,
    retries: u32,
    eta: Option<f64>,
    trace: Option<&Trace>,
) -> Result<(), PublishError> {
    task.retries = retries;
    task.eta = eta;
    let msg_id = retry_msg_id(&task.id, retries);
    broker.publish_task(queue, &task, &msg_id, trace).await
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

    fn request(countdown: Option<f64>, max_retries: Option<u32>, explicit: bool) -> Request {
        Request {
            countdown,
            max_retries,
            error: TaskError::new("ValueError", "boom"),
            explicit,
        }
    }

    #[test]
    fn a_retry_is_granted_while_retries_are_left() {
        let policy = RetryPolicy {
            max_retries: 2,
            retry_delay: 3.0,
            ..Default::default()
        };
        assert_eq!(
            decide(&policy, 1, request(None, None, false)),
            Decision::Again {
                retries: 2,
                delay: 3.0,
                max_retries: 2,
                error: TaskError::new("ValueError", "boom"),
            }
        );
        // The task's countdown wins over the policy; a negative one means now.
        let Decision::Again { delay, .. } = decide(&policy, 0, request(Some(-5.0), None, true))
        else {
            panic!("a retry is left")
        };
        assert_eq!(delay, 0.0);
    }

    #[test]
    fn no_retry_left_fails_with_the_error_or_max_retries_exceeded() {
        let policy = RetryPolicy::default();
        // An exception (autoretry_for, or Retry(exc=...)) fails as itself.
        assert_eq!(
            decide(&policy, 3, request(None, None, false)),
            Decision::Exhausted {
                max_retries: 3,
                error: TaskError::new("ValueError", "boom"),
            }
        );
        // A bare Retry request fails as MaxRetriesExceeded; its max_retries overrides.
        let Decision::Exhausted { max_retries, error } =
            decide(&policy, 1, request(Some(1.0), Some(1), true))
        else {
            panic!("no retry left")
        };
        assert_eq!(max_retries, 1);
        assert_eq!(error.exc_type, error_types::MAX_RETRIES_EXCEEDED);
    }
}

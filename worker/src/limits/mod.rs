//! Time limits and termination of a running task: timers on the worker's tokio thread
//! around [`PythonRuntime::call`], no polling.
//!
//! - Soft limit: `dbtask.SoftTimeLimitExceeded` is raised in the task, which may catch it and
//!   return; the call goes on.
//! - Hard limit: the call is given up at once, recorded FAILURE `dbtask.TimeLimitExceeded`,
//!   and its slot released; the task is cancelled (`async def`) or gets `TimeLimitExceeded`
//!   raised in its thread, which is abandoned and replaced (see `python::pool`).
//! - Revoked with terminate: the same, recorded REVOKED.

use std::time::Duration;

use dbtask_protocol::{error_types, TaskError};
use tokio::time::Instant;
use tracing::warn;

use crate::config::Config;
use crate::python::{Burst, CallOutcome, Interrupt, Job, PythonRuntime, TaskInfo};
use crate::revoke::Revocations;

/// The limits of one call; `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub soft: Option<Duration>,
    pub hard: Option<Duration>,
}

impl Limits {
    /// The task's own limits, else the worker's defaults (0 in the config: none).
    pub fn of(task: Option<&TaskInfo>, config: &Config) -> Limits {
        let pick = |own: Option<f64>, default: f64| {
            own.or((default > 0.0).then_some(default))
                .filter(|s| *s > 0.0 && s.is_finite())
                .map(Duration::from_secs_f64)
        };
        Limits {
            soft: pick(task.and_then(|t| t.soft_time_limit), config.soft_time_limit),
            hard: pick(task.and_then(|t| t.time_limit), config.time_limit),
        }
    }
}

/// How a limited call ended.
#[derive(Debug)]
pub enum Ended {
    /// The task returned or raised.
    Done(CallOutcome),
    /// Given up at the hard time limit.
    TimedOut(TaskError),
    /// Revoked: before it started (`started` false) or terminated while running.
    Revoked { started: bool },
}

async fn at(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Runs `job` (task `task`, id `id`) within `limits`, watching for a revocation with
/// terminate.
pub async fn call(
    python: &PythonRuntime,
    revocations: &Revocations,
    job: Job,
    task: &str,
    id: &str,
    limits: Limits,
    burst: Burst,
) -> Ended {
    // The watch also sees a terminate that arrives between this check and the call.
    let mut watch = revocations.watch(id);
    if revocations.is_revoked(id) {
        return Ended::Revoked { started: false };
    }
    let start = Instant::now();
    let soft_at = limits.soft.map(|d| start + d);
    let hard_at = limits.hard.map(|d| start + d);
    let call = python.call_in(job, burst);
    tokio::pin!(call);
    let mut soft_sent = soft_at.is_none();
    loop {
        tokio::select! {
            biased;
            outcome = &mut call => return Ended::Done(outcome),
            _ = watch.terminated() => {
                warn!(task_id = %id, task = %task, "task revoked with terminate: stopping it");
                python.interrupt(task, id, Interrupt::Terminate);
                return Ended::Revoked { started: true };
            }
            _ = at(hard_at) => {
                let secs = limits.hard.unwrap_or_default().as_secs_f64();
                warn!(task_id = %id, task = %task, time_limit_secs = secs, "task ran past its hard time limit: abandoning it");
                python.interrupt(task, id, Interrupt::Hard);
                return Ended::TimedOut(TaskError::new(
                    error_types::TIME_LIMIT,
                    format!("the task ran past its hard time limit of {secs} s and was stopped (raise time_limit, or catch dbtask.SoftTimeLimitExceeded to finish early)"),
                ));
            }
            _ = at(soft_at), if !soft_sent => {
                soft_sent = true;
                warn!(task_id = %id, task = %task, soft_time_limit_secs = limits.soft.unwrap_or_default().as_secs_f64(), "task ran past its soft time limit: raising SoftTimeLimitExceeded in it");
                python.interrupt(task, id, Interrupt::Soft);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(soft: Option<f64>, hard: Option<f64>) -> TaskInfo {
        TaskInfo {
            name: "t".into(),
            is_async: false,
            queue: "default".into(),
            track_started: None,
            time_limit: hard,
            soft_time_limit: soft,
            retry: Default::default(),
            rate_limit: None,
        }
    }

    #[test]
    fn task_limits_win_over_worker_defaults() {
        let config = Config {
            time_limit: 60.0,
            soft_time_limit: 0.0,
            ..Config::default()
        };
        let none = Limits::of(None, &config);
        assert_eq!(none.hard, Some(Duration::from_secs(60)));
        assert_eq!(none.soft, None);
        let own = Limits::of(Some(&info(Some(1.5), Some(3.0))), &config);
        assert_eq!(own.soft, Some(Duration::from_secs_f64(1.5)));
        assert_eq!(own.hard, Some(Duration::from_secs(3)));
        assert_eq!(Limits::of(None, &Config::default()), Limits::default());
    }

    #[test]
    fn negative_or_infinite_worker_limits_are_refused() {
        for bad in [-1.0, f64::INFINITY, f64::NAN] {
            let config = Config {
                apps: vec!["tasks".into()],
                soft_time_limit: bad,
                ..Config::default()
            };
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("soft_time_limit"), "{err}");
        }
    }
}

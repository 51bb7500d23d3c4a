//! Time limits and termination of a running task: timers on the worker's tokio thread
//! around [`PythonRuntime::dispatch`], no polling.
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
use crate::python::{
    Arguments, CallOutcome, Dispatch, Interrupt, Job, JobState, PythonRuntime, TaskInfo,
};
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
/// terminate. The job's arguments come back when the task returned or raised.
///
/// With a [`Handover`](crate::python::Handover) (a sync job queued before its slot is free),
/// the limits count from the moment a Python thread starts the job, and until then any
/// revocation, with terminate or not, cancels it: it never runs, as for a task still waiting
/// for its slot.
pub async fn call(
    python: &PythonRuntime,
    revocations: &Revocations,
    job: Job,
    task: &str,
    id: &str,
    limits: Limits,
    how: Dispatch,
) -> (Ended, Option<Arguments>) {
    // The watch also sees a terminate that arrives between this check and the call.
    let watch = revocations.watch(id);
    if revocations.is_revoked(id) {
        return (Ended::Revoked { started: false }, None);
    }
    let state = how.handover.as_ref().map(|h| h.state.clone());
    let start = Instant::now();
    let mut soft_at = limits.soft.map(|d| start + d);
    let mut hard_at = limits.hard.map(|d| start + d);
    let call = python.dispatch(job, how);
    tokio::pin!(call);
    let mut soft_sent = soft_at.is_none();
    // Until its thread starts it, a handed-over job may still be cancelled.
    let mut cancellable = state.is_some();
    let ended = loop {
        tokio::select! {
            biased;
            returned = &mut call => return (Ended::Done(returned.outcome), returned.arguments),
            terminate = watch.revoked(cancellable) => {
                // Not started yet: it never will, whatever kind of revocation this is.
                if state.as_ref().is_some_and(|s| s.cancel()) {
                    break Ended::Revoked { started: false };
                }
                if !terminate {
                    // Started: a revocation without terminate no longer stops it.
                    cancellable = false;
                    continue;
                }
                warn!(task_id = %id, task = %task, "task revoked with terminate: stopping it");
                python.interrupt(task, id, Interrupt::Terminate);
                break Ended::Revoked { started: true };
            }
            _ = at(hard_at) => {
                if let Some(later) = not_yet(state.as_deref(), limits.hard) {
                    hard_at = Some(later);
                    continue;
                }
                let secs = limits.hard.unwrap_or_default().as_secs_f64();
                warn!(task_id = %id, task = %task, time_limit_secs = secs, "task ran past its hard time limit: abandoning it");
                python.interrupt(task, id, Interrupt::Hard);
                break Ended::TimedOut(TaskError::new(
                    error_types::TIME_LIMIT,
                    format!("the task ran past its hard time limit of {secs} s and was stopped (raise time_limit, or catch dbtask.SoftTimeLimitExceeded to finish early)"),
                ));
            }
            _ = at(soft_at), if !soft_sent => {
                if let Some(later) = not_yet(state.as_deref(), limits.soft) {
                    soft_at = Some(later);
                    continue;
                }
                soft_sent = true;
                warn!(task_id = %id, task = %task, soft_time_limit_secs = limits.soft.unwrap_or_default().as_secs_f64(), "task ran past its soft time limit: raising SoftTimeLimitExceeded in it");
                python.interrupt(task, id, Interrupt::Soft);
            }
        }
    };
    // Given up on: its slot is free now, whether its thread ever returns or not.
    if let Some(state) = &state {
        state.release();
    }
    (ended, None)
}

/// For a handed-over job whose limit timer fired: the time its limit really ends, when that
/// is still ahead (it started after the timer was set, or has not started yet); `None`: the
/// limit is reached.
fn not_yet(state: Option<&JobState>, limit: Option<Duration>) -> Option<Instant> {
    let (state, limit) = (state?, limit?);
    let now = Instant::now();
    match state.started_at() {
        None => Some(now + limit),
        Some(started) => Some(started + limit).filter(|end| *end > now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(soft: Option<f64>, hard: Option<f64>) -> TaskInfo {
        TaskInfo {
            name: "t".into(),
            executor: crate::python::Executor::Threads,
            queue: "default".into(),
            track_started: None,
            time_limit: hard,
            soft_time_limit: soft,
            retry: Default::default(),
            rate_limit: None,
            results: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_handed_over_job_is_timed_from_its_start() {
        use crate::python::Handover;
        let second = Some(Duration::from_secs(1));
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
        let handover = Handover::new(slots.clone(), crate::journal::Mark::default());
        let queued = not_yet(Some(&handover.state), second).expect("not started: not yet");
        assert!(
            queued > Instant::now(),
            "the limit is counted again from now"
        );
        let permit = slots.clone().try_acquire_owned().unwrap();
        assert!(handover.state.start(permit));
        let started = handover.state.started_at().unwrap();
        assert_eq!(
            not_yet(Some(&handover.state), second),
            Some(started + Duration::from_secs(1))
        );
        assert_eq!(
            not_yet(Some(&handover.state), Some(Duration::ZERO)),
            None,
            "a limit that has run out fires"
        );
        assert_eq!(
            not_yet(None, second),
            None,
            "a job with its slot is timed from the call"
        );
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

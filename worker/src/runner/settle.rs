//! Settlement: how a call ended (a value, an exception, a retry request, the hard time limit,
//! a terminate) and the task's policy decide the record to store and the next attempt to
//! publish, if any. A pure function: no NATS, no Redis, no clock (the caller passes `now`).

use dbtask_protocol::{error_types, ResultRecord, TaskError, TaskState};

use crate::limits::Ended;
use crate::python::CallOutcome;
use crate::retry::{self, Decision, RetryPolicy};

pub(super) const REVOKED_BEFORE_START: &str = "the task was revoked before it started";
const TERMINATED: &str = "the task was revoked with terminate=True while it ran";

/// What settles a call besides its ending.
pub(super) struct Policy<'a> {
    pub retry: &'a RetryPolicy,
    /// `max_result_bytes`: a bigger result is a failure.
    pub max_result_bytes: usize,
}

/// The next attempt of a task that asked for a retry, published before its RETRY record is
/// stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct NextAttempt {
    /// Its message's `retries`.
    pub retries: u32,
    /// Seconds from now (>= 0).
    pub delay: f64,
    /// When it is due; `None`: at once.
    pub eta: Option<f64>,
    pub max_retries: u32,
}

/// How a message was settled: what the follow-ups do, the log says and the hooks hear.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum How {
    Succeeded,
    /// Raised, ran past its hard time limit, or returned too big a result.
    Failed,
    /// Asked for a retry with none left: FAILURE.
    Exhausted {
        max_retries: u32,
    },
    /// Runs again: publish this attempt, then store RETRY.
    Retry(NextAttempt),
    /// Revoked before it started, terminated, or expired.
    Revoked,
    /// Refused before it ran (unknown task, unreadable message).
    Rejected,
    /// An earlier delivery stored this record already: nothing to store.
    AlreadyFinished,
}

/// The record that settles a message, and how.
#[derive(Debug)]
pub(super) struct Settled {
    pub record: ResultRecord,
    pub how: How,
}

/// Settles a call that `ended`. `record` is the call's record as if it succeeded (its dates,
/// its arguments with `result_extended`); `now` is the time it ended.
pub(super) fn settle(
    mut record: ResultRecord,
    ended: Ended,
    policy: &Policy<'_>,
    now: f64,
) -> Settled {
    let outcome = match ended {
        Ended::Done(outcome) => outcome,
        Ended::TimedOut(error) => CallOutcome::Failure(error),
        Ended::Revoked { started } => {
            let why = if started {
                TERMINATED
            } else {
                REVOKED_BEFORE_START
            };
            // Recorded as a task revoked before it ran: no start, no arguments.
            record.date_started = None;
            record.args = None;
            record.kwargs = None;
            return fail(record, TaskState::Revoked, error_types::REVOKED, why, now);
        }
    };
    match outcome {
        CallOutcome::Success(result) if result.get().len() > policy.max_result_bytes => {
            let why = format!(
                "the result is {} bytes of JSON, more than max_result_bytes ({}): return a smaller value, or store it elsewhere and return a reference",
                result.get().len(),
                policy.max_result_bytes
            );
            fail(record, TaskState::Failure, error_types::TOO_LARGE, why, now)
        }
        CallOutcome::Success(result) => {
            record.result = Some(result);
            Settled {
                record,
                how: How::Succeeded,
            }
        }
        CallOutcome::Failure(error) => ended_with(record, TaskState::Failure, error, How::Failed),
        CallOutcome::Retry(request) => match retry::decide(policy.retry, record.retries, request) {
            Decision::Exhausted { max_retries, error } => ended_with(
                record,
                TaskState::Failure,
                error,
                How::Exhausted { max_retries },
            ),
            Decision::Again {
                retries,
                delay,
                max_retries,
                error,
            } => {
                let eta = now + delay;
                record.state = TaskState::Retry;
                record.error = Some(error);
                record.eta = Some(eta);
                record.date_done = None;
                Settled {
                    record,
                    how: How::Retry(NextAttempt {
                        retries,
                        delay,
                        eta: (delay > 0.0).then_some(eta),
                        max_retries,
                    }),
                }
            }
        },
    }
}

fn fail(
    mut record: ResultRecord,
    state: TaskState,
    exc_type: &str,
    why: impl Into<String>,
    now: f64,
) -> Settled {
    record.date_done = Some(now);
    let how = if state == TaskState::Revoked {
        How::Revoked
    } else {
        How::Failed
    };
    ended_with(record, state, TaskError::new(exc_type, why), how)
}

fn ended_with(mut record: ResultRecord, state: TaskState, error: TaskError, how: How) -> Settled {
    record.state = state;
    record.error = Some(error);
    Settled { record, how }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::Request;
    use serde_json::value::RawValue;

    const NOW: f64 = 1000.0;

    fn ran(retries: u32) -> ResultRecord {
        let mut record = ResultRecord::new("id", TaskState::Success);
        record.retries = retries;
        record.date_started = Some(NOW - 1.0);
        record.date_done = Some(NOW);
        record.args = Some(RawValue::from_string("[1]".into()).unwrap());
        record
    }

    fn settle_with(ended: Ended, retries: u32) -> Settled {
        let retry = RetryPolicy {
            max_retries: 2,
            retry_delay: 5.0,
            ..Default::default()
        };
        let policy = Policy {
            retry: &retry,
            max_result_bytes: 8,
        };
        settle(ran(retries), ended, &policy, NOW)
    }

    fn value(json: &str) -> Ended {
        Ended::Done(CallOutcome::Success(
            RawValue::from_string(json.into()).unwrap(),
        ))
    }

    fn retry(countdown: Option<f64>, explicit: bool) -> Ended {
        Ended::Done(CallOutcome::Retry(Request {
            countdown,
            max_retries: None,
            error: TaskError::new("OSError", "down"),
            explicit,
        }))
    }

    #[test]
    fn a_value_succeeds_unless_it_is_too_big() {
        let ok = settle_with(value("[1,2]"), 0);
        assert_eq!(ok.how, How::Succeeded);
        assert_eq!(ok.record.state, TaskState::Success);
        assert_eq!(ok.record.result.unwrap().get(), "[1,2]");
        assert_eq!(ok.record.date_done, Some(NOW));

        let big = settle_with(value("\"0123456789\""), 0);
        assert_eq!(big.how, How::Failed);
        assert_eq!(big.record.state, TaskState::Failure);
        assert_eq!(big.record.error.unwrap().exc_type, error_types::TOO_LARGE);
        assert!(big.record.result.is_none());
    }

    #[test]
    fn an_exception_or_the_time_limit_fails() {
        let raised = settle_with(
            Ended::Done(CallOutcome::Failure(TaskError::new("ValueError", "bad"))),
            0,
        );
        assert_eq!(raised.how, How::Failed);
        assert_eq!(raised.record.state, TaskState::Failure);
        assert_eq!(
            raised.record.error,
            Some(TaskError::new("ValueError", "bad"))
        );
        assert_eq!(raised.record.date_started, Some(NOW - 1.0));

        let late = settle_with(
            Ended::TimedOut(TaskError::new(error_types::TIME_LIMIT, "late")),
            0,
        );
        assert_eq!(late.how, How::Failed);
        assert_eq!(late.record.error.unwrap().exc_type, error_types::TIME_LIMIT);
    }

    #[test]
    fn a_retry_request_publishes_the_next_attempt_while_retries_are_left() {
        let again = settle_with(retry(None, false), 1);
        assert_eq!(
            again.how,
            How::Retry(NextAttempt {
                retries: 2,
                delay: 5.0,
                eta: Some(NOW + 5.0),
                max_retries: 2,
            })
        );
        assert_eq!(again.record.state, TaskState::Retry);
        assert_eq!(again.record.eta, Some(NOW + 5.0));
        assert_eq!(again.record.date_done, None);
        assert_eq!(again.record.error.unwrap().exc_type, "OSError");

        // A zero countdown runs the next attempt at once: no schedule.
        let Settled { how, .. } = settle_with(retry(Some(0.0), true), 0);
        let How::Retry(next) = how else {
            panic!("{how:?}")
        };
        assert_eq!((next.retries, next.eta), (1, None));

        // None left: FAILURE with the error, or MaxRetriesExceeded for a bare request.
        let last = settle_with(retry(None, false), 2);
        assert_eq!(last.how, How::Exhausted { max_retries: 2 });
        assert_eq!(last.record.state, TaskState::Failure);
        assert_eq!(last.record.error.unwrap().exc_type, "OSError");
        let bare = settle_with(retry(None, true), 2);
        assert_eq!(
            bare.record.error.unwrap().exc_type,
            error_types::MAX_RETRIES_EXCEEDED
        );
    }

    #[test]
    fn a_revoked_call_is_recorded_as_never_started() {
        for (started, why) in [(false, REVOKED_BEFORE_START), (true, TERMINATED)] {
            let revoked = settle_with(Ended::Revoked { started }, 0);
            assert_eq!(revoked.how, How::Revoked);
            let record = revoked.record;
            assert_eq!(record.state, TaskState::Revoked);
            assert_eq!(
                record.error,
                Some(TaskError::new(error_types::REVOKED, why))
            );
            assert_eq!((record.date_started, record.args.is_none()), (None, true));
            assert_eq!(record.date_done, Some(NOW));
        }
    }
}

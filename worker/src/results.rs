//! What is kept of a task's outcome: `ignore_result`, `store_errors_even_if_ignored` and
//! `result_ttl`, from the task's options and the message (`apply_async(ignore_result=...)`).
//! Pure: the runner asks [`ResultOptions::keeps`] before it writes a record and takes the
//! record's time to live from [`ResultOptions::ttl`].

use dbtask_protocol::{TaskMessage, TaskState};

/// A task's result options, read from its `options` at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultOptions {
    /// Store no record when the task succeeds (nor its RECEIVED and STARTED records).
    pub ignore_result: bool,
    /// With `ignore_result`: still record FAILURE, RETRY and REVOKED.
    pub store_errors: bool,
    /// Seconds the task's records live; `None`: the worker's `result_ttl`.
    pub ttl: Option<u64>,
}

impl Default for ResultOptions {
    fn default() -> Self {
        ResultOptions {
            ignore_result: false,
            store_errors: true,
            ttl: None,
        }
    }
}

impl ResultOptions {
    /// These options for one message: its `ignore_result`, when it sets one, wins.
    pub fn for_message(self, msg: &TaskMessage) -> ResultOptions {
        ResultOptions {
            ignore_result: msg.ignore_result.unwrap_or(self.ignore_result),
            ..self
        }
    }

    /// Whether a record in `state` is written.
    pub fn keeps(self, state: TaskState) -> bool {
        if !self.ignore_result {
            return true;
        }
        match state {
            TaskState::Failure | TaskState::Retry | TaskState::Revoked => self.store_errors,
            _ => false,
        }
    }

    /// The records' time to live, given the worker's default.
    pub fn ttl(self, default: u64) -> u64 {
        self.ttl.unwrap_or(default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_results_keep_only_errors_unless_told_otherwise() {
        let all = ResultOptions::default();
        let ignored = ResultOptions {
            ignore_result: true,
            ..all
        };
        let silent = ResultOptions {
            store_errors: false,
            ..ignored
        };
        use TaskState::*;
        for state in [Received, Started, Retry, Success, Failure, Revoked, Custom] {
            assert!(all.keeps(state), "{state}");
            assert!(!silent.keeps(state), "{state}");
        }
        for state in [Received, Started, Success, Custom] {
            assert!(!ignored.keeps(state), "{state}");
        }
        for state in [Retry, Failure, Revoked] {
            assert!(ignored.keeps(state), "{state}");
        }
    }

    #[test]
    fn the_message_overrides_the_task_and_the_task_the_worker_ttl() {
        let mut msg = TaskMessage::decode(br#"{"id": "t1", "task": "add"}"#).unwrap();
        let task = ResultOptions {
            ignore_result: true,
            ttl: Some(60),
            ..ResultOptions::default()
        };
        assert!(task.for_message(&msg).ignore_result);
        msg.ignore_result = Some(false);
        assert!(!task.for_message(&msg).ignore_result);
        assert_eq!(task.ttl(86_400), 60);
        assert_eq!(ResultOptions::default().ttl(86_400), 86_400);
    }
}

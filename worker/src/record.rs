//! Every result record this worker writes is built here, whatever path writes it (RECEIVED,
//! STARTED, an outcome, a refusal, a revocation, a dead letter, a workflow step that can never
//! run), so that they all carry the same fields the same way.

use dbtask_protocol::{now_unix, ResultRecord, TaskError, TaskState};

/// Who writes a record, and for which delivery: the fields every record shares.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// `hostname:pid` of this worker.
    pub worker: Option<&'a str>,
    /// The queue the message came from.
    pub queue: Option<&'a str>,
    /// Deliveries of this message (1 on the first); 0 for a task that never got a message.
    pub attempt: u32,
    /// When this worker received the message.
    pub received: Option<f64>,
}

impl<'a> Origin<'a> {
    /// A message delivered `attempt` times, received at `received`.
    pub fn delivery(worker: &'a str, queue: &'a str, attempt: u32, received: f64) -> Self {
        Origin {
            worker: Some(worker),
            queue: Some(queue),
            attempt,
            received: Some(received),
        }
    }

    /// Workflow steps that fail with the task that precedes them, written by `worker`: they
    /// were never delivered.
    pub fn workflow(worker: Option<&'a str>) -> Self {
        Origin {
            worker,
            queue: None,
            attempt: 0,
            received: None,
        }
    }

    /// A record of `state` for task `id` (named `task`), `retries` retries after its first run.
    pub fn record(
        &self,
        id: impl Into<String>,
        task: Option<&str>,
        state: TaskState,
        retries: u32,
    ) -> ResultRecord {
        let mut record = ResultRecord::new(id, state);
        record.task = task.map(str::to_owned);
        // Deliveries of this task id: earlier retries each ran once (at least), plus this one.
        record.attempts = self.attempt.saturating_add(retries);
        record.retries = retries;
        record.worker = self.worker.map(str::to_owned);
        record.queue = self.queue.map(str::to_owned);
        record.date_received = self.received;
        record
    }

    /// A final record that ends with `error` now (FAILURE, REVOKED).
    pub fn ended(
        &self,
        id: impl Into<String>,
        task: Option<&str>,
        state: TaskState,
        retries: u32,
        error: TaskError,
    ) -> ResultRecord {
        let mut record = self.record(id, task, state, retries);
        record.date_done = Some(now_unix());
        record.error = Some(error);
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_carry_their_origin() {
        let origin = Origin::delivery("host:1", "default", 2, 10.0);
        let r = origin.record("id1", Some("add"), TaskState::Started, 3);
        assert_eq!(r.id, "id1");
        assert_eq!(r.task.as_deref(), Some("add"));
        assert_eq!((r.attempts, r.retries), (5, 3));
        assert_eq!(r.worker.as_deref(), Some("host:1"));
        assert_eq!(r.queue.as_deref(), Some("default"));
        assert_eq!(r.date_received, Some(10.0));
        assert_eq!(r.date_done, None);

        let failed = Origin::workflow(Some("host:1")).ended(
            "id2",
            None,
            TaskState::Failure,
            0,
            TaskError::new("E", "m"),
        );
        assert_eq!(
            (failed.attempts, failed.queue, failed.date_received),
            (0, None, None)
        );
        assert!(failed.date_done.is_some());
        assert_eq!(failed.error, Some(TaskError::new("E", "m")));
    }
}

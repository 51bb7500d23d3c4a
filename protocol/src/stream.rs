//! The JetStream streams dbtask uses, described once as plain values. The worker creates the
//! task stream from [`StreamSpec::tasks`] (with its configured limits and replicas) and brings
//! an existing one in line with it; the client creates the same stream, with the default
//! limits and the replicas of its own `stream_replicas` setting, when it finds none. Both map a
//! description onto async-nats' `stream::Config` with the one `nats::stream_config` (feature
//! `nats`).

use std::time::Duration;

use crate::{
    DEAD_STREAM, DEAD_SUBJECT_WILDCARD, SCHEDULE_SUBJECT_WILDCARD, TASK_STREAM,
    TASK_SUBJECT_WILDCARD,
};

/// How long JetStream remembers a `Nats-Msg-Id` in the task stream unless the worker is
/// configured otherwise (`duplicate_window`): a publish retried within it is dropped.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Largest task message the task stream takes unless the worker is configured otherwise
/// (`max_message_bytes`).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// When a stream lets a message go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Once a consumer acked it: each task is taken by one worker.
    WorkQueue,
    /// Only at the stream's limits (or when an operator removes it).
    Limits,
}

/// Where a stream keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    File,
    Memory,
}

/// A stream's settings, as plain values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: &'static str,
    pub description: &'static str,
    pub subjects: &'static [&'static str],
    pub retention: Retention,
    pub storage: Storage,
    /// Message schedules (`Nats-Schedule`, nats-server 2.12+): countdowns, etas and retries
    /// wait in the stream as schedules.
    pub allow_msg_schedules: bool,
    /// How long a `Nats-Msg-Id` is remembered; `None`: the server's default.
    pub duplicate_window: Option<Duration>,
    /// Largest message in bytes; `None`: no limit of the stream's own.
    pub max_msg_size: Option<usize>,
    /// Copies of every message on the servers of a NATS cluster (`stream_replicas`): 1 on a
    /// single server; 3 lets a cluster lose one server without losing a task.
    pub replicas: usize,
}

impl StreamSpec {
    /// The task stream `DBTASK_TASKS` with the default limits: a file-backed work queue over
    /// `dbtask.tasks.>` (queues and priority levels) and `dbtask.sched.>` (schedules).
    pub const fn tasks() -> StreamSpec {
        StreamSpec {
            name: TASK_STREAM,
            description: "dbtask: queued task messages",
            subjects: &[TASK_SUBJECT_WILDCARD, SCHEDULE_SUBJECT_WILDCARD],
            retention: Retention::WorkQueue,
            storage: Storage::File,
            allow_msg_schedules: true,
            duplicate_window: Some(DEFAULT_DUPLICATE_WINDOW),
            max_msg_size: Some(DEFAULT_MAX_MESSAGE_BYTES),
            replicas: 1,
        }
    }

    /// The dead-letter stream `DBTASK_DEAD` (created by the worker on first use): messages
    /// that exhausted their deliveries, kept until an operator replays or purges them.
    pub const fn dead_letters() -> StreamSpec {
        StreamSpec {
            name: DEAD_STREAM,
            description: "dbtask: dead letters (messages that exhausted their deliveries)",
            subjects: &[DEAD_SUBJECT_WILDCARD],
            retention: Retention::Limits,
            storage: Storage::File,
            allow_msg_schedules: false,
            duplicate_window: None,
            max_msg_size: None,
            replicas: 1,
        }
    }

    /// The same stream with `replicas` copies of each message.
    pub const fn with_replicas(self, replicas: usize) -> StreamSpec {
        StreamSpec { replicas, ..self }
    }

    /// `max_msg_size` as JetStream counts it: a signed 32-bit size, -1 for no limit.
    pub fn max_msg_size_i32(&self) -> i32 {
        self.max_msg_size
            .map_or(-1, |n| i32::try_from(n).unwrap_or(i32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_task_stream_has_limits_and_schedules_and_the_dead_letters_have_neither() {
        let tasks = StreamSpec::tasks();
        assert_eq!(tasks.subjects, ["dbtask.tasks.>", "dbtask.sched.>"]);
        assert_eq!(tasks.max_msg_size_i32(), 1024 * 1024);
        assert_eq!(tasks.duplicate_window, Some(Duration::from_secs(120)));
        let dead = StreamSpec::dead_letters();
        assert_eq!(dead.max_msg_size_i32(), -1);
        assert!(!dead.allow_msg_schedules && dead.retention == Retention::Limits);
        assert_eq!((tasks.replicas, dead.replicas), (1, 1));
        assert_eq!(dead.with_replicas(3).replicas, 3);
    }
}

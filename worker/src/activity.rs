//! What this worker holds right now and what it has done, for `dbtask inspect` and the
//! heartbeat events: the tasks waiting for a slot (reserved) or running (active), and how many
//! tasks ended in each state since start.
//!
//! Only with `control` (the default) or `--events`: the runner then enters each admitted task
//! with [`Activity::track`], whose guard takes it out again however its handling ends (stored,
//! handed back, cancelled), so nothing is left behind. The counts come from the [`Hook`]
//! events. One uncontended lock per change: everything but a request runs on the worker's one
//! tokio thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use dbtask_protocol::{now_unix, TaskError};
use serde::Serialize;

use crate::events::{Hook, TaskRef};
use crate::python::Handover;

/// The tasks held and the counts of ended ones. Cheap to clone.
#[derive(Clone, Default)]
pub struct Activity(Arc<Inner>);

#[derive(Default)]
struct Inner {
    /// By a number drawn for each admitted message (a task id may be held twice at once: a
    /// redelivery while the first delivery still runs).
    tasks: Mutex<Tasks>,
    counts: Counts,
}

#[derive(Default)]
struct Tasks {
    next: u64,
    held: HashMap<u64, Entry>,
}

struct Entry {
    id: String,
    task: String,
    queue: String,
    attempt: u32,
    /// Unix seconds when this worker admitted it.
    received: f64,
    /// When it was handed to its executor (Unix seconds, and the clock to measure from).
    started: Option<(f64, Instant)>,
    /// Handed to the Python threads before a slot was free: running only once a thread took it.
    handover: Option<Handover>,
}

impl Entry {
    /// When its code started running, if it has.
    fn running_since(&self) -> Option<(f64, Instant)> {
        let (at, clock) = self.started?;
        match &self.handover {
            None => Some((at, clock)),
            Some(handover) => handover.state.started_at().map(|taken| {
                let taken = taken.into_std();
                (
                    at + taken.saturating_duration_since(clock).as_secs_f64(),
                    taken,
                )
            }),
        }
    }
}

/// Tasks ended in each state since the worker started.
#[derive(Default, Debug, Serialize)]
pub struct Counts {
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    pub revoked: AtomicU64,
    pub rejected: AtomicU64,
    pub dead_lettered: AtomicU64,
}

/// The counts as plain numbers, plus their sum (`processed`).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Processed {
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub retried: u64,
    pub revoked: u64,
    pub rejected: u64,
    pub dead_lettered: u64,
}

/// A task as `dbtask inspect active` / `reserved` show it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HeldTask {
    pub id: String,
    pub task: String,
    pub queue: String,
    pub attempt: u32,
    /// Unix seconds when this worker admitted it.
    pub received: f64,
    /// Unix seconds when it started running (active only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started: Option<f64>,
    /// Seconds it has been running (active only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<f64>,
}

/// Takes its task out of the [`Activity`] when dropped: when its handling ends, however.
pub struct Tracked {
    activity: Activity,
    key: u64,
}

impl Tracked {
    /// The task is handed to its executor; `handover`: without a slot yet (it runs once a
    /// Python thread takes it).
    pub fn started(&self, handover: Option<&Handover>) {
        if let Some(entry) = self.activity.lock().held.get_mut(&self.key) {
            entry.started = Some((now_unix(), Instant::now()));
            entry.handover = handover.cloned();
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.activity.lock().held.remove(&self.key);
    }
}

impl Activity {
    fn lock(&self) -> MutexGuard<'_, Tasks> {
        // A panic while holding it cannot leave the map half-changed: keep going.
        self.0.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enters an admitted task (reserved until [`Tracked::started`]).
    pub fn track(&self, task: TaskRef<'_>) -> Tracked {
        let entry = Entry {
            id: task.id.to_owned(),
            task: task.task.to_owned(),
            queue: task.queue.to_owned(),
            attempt: task.attempt,
            received: now_unix(),
            started: None,
            handover: None,
        };
        let mut tasks = self.lock();
        let key = tasks.next;
        tasks.next += 1;
        tasks.held.insert(key, entry);
        Tracked {
            activity: self.clone(),
            key,
        }
    }

    /// Seconds task `id` has been running, if it is. A scan of the held tasks (a few hundred
    /// at most): asked only for the events of tasks that failed, retried or were revoked.
    pub fn runtime_of(&self, id: &str) -> Option<f64> {
        let tasks = self.lock();
        let entry = tasks.held.values().find(|e| e.id == id)?;
        let (_, since) = entry.running_since()?;
        Some(since.elapsed().as_secs_f64())
    }

    /// Tasks running (`true`) or waiting to (`false`), oldest first.
    pub fn held(&self, running: bool) -> Vec<HeldTask> {
        let tasks = self.lock();
        let mut held: Vec<HeldTask> = tasks
            .held
            .values()
            .filter_map(|entry| {
                let since = entry.running_since();
                (since.is_some() == running).then(|| HeldTask {
                    id: entry.id.clone(),
                    task: entry.task.clone(),
                    queue: entry.queue.clone(),
                    attempt: entry.attempt,
                    received: entry.received,
                    started: since.map(|(at, _)| at),
                    runtime: since.map(|(_, clock)| clock.elapsed().as_secs_f64()),
                })
            })
            .collect();
        held.sort_by(|a, b| a.received.total_cmp(&b.received));
        held
    }

    /// How many tasks are running and how many wait for a slot.
    pub fn load(&self) -> (usize, usize) {
        let tasks = self.lock();
        let running = tasks
            .held
            .values()
            .filter(|e| e.running_since().is_some())
            .count();
        (running, tasks.held.len() - running)
    }

    pub fn processed(&self) -> Processed {
        let c = &self.0.counts;
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let mut p = Processed {
            total: 0,
            succeeded: get(&c.succeeded),
            failed: get(&c.failed),
            retried: get(&c.retried),
            revoked: get(&c.revoked),
            rejected: get(&c.rejected),
            dead_lettered: get(&c.dead_lettered),
        };
        p.total = p.succeeded + p.failed + p.retried + p.revoked + p.rejected + p.dead_lettered;
        p
    }
}

fn bump(n: &AtomicU64) {
    n.fetch_add(1, Ordering::Relaxed);
}

/// Counts the ended tasks.
impl Hook for Activity {
    fn succeeded(&self, _: TaskRef<'_>, _: f64) {
        bump(&self.0.counts.succeeded);
    }
    fn failed(&self, _: TaskRef<'_>, _: &TaskError) {
        bump(&self.0.counts.failed);
    }
    fn retried(&self, _: TaskRef<'_>, _: &TaskError, _: f64) {
        bump(&self.0.counts.retried);
    }
    fn revoked(&self, _: TaskRef<'_>, _: &TaskError) {
        bump(&self.0.counts.revoked);
    }
    fn rejected(&self, _: TaskRef<'_>, _: &TaskError) {
        bump(&self.0.counts.rejected);
    }
    fn dead_lettered(&self, _: TaskRef<'_>, _: &str) {
        bump(&self.0.counts.dead_lettered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str) -> TaskRef<'_> {
        TaskRef {
            id,
            task: "add",
            queue: "default",
            attempt: 1,
            parent_id: None,
            root_id: None,
        }
    }

    #[test]
    fn a_task_is_reserved_then_active_then_gone() {
        let activity = Activity::default();
        let tracked = activity.track(task("t1"));
        assert_eq!(activity.load(), (0, 1));
        assert_eq!(activity.held(false)[0].id, "t1");
        assert!(activity.held(true).is_empty());
        assert_eq!(activity.runtime_of("t1"), None);
        tracked.started(None);
        assert_eq!(activity.load(), (1, 0));
        let active = activity.held(true);
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].task, "add");
        assert!(active[0].runtime.is_some() && active[0].started.is_some());
        assert!(activity.runtime_of("t1").is_some());
        // The same id held twice (a redelivery): each delivery leaves on its own.
        let again = activity.track(task("t1"));
        drop(tracked);
        assert_eq!(activity.load(), (0, 1));
        drop(again);
        assert_eq!(activity.load(), (0, 0));
    }

    #[test]
    fn a_handed_over_job_is_reserved_until_a_thread_takes_it() {
        let activity = Activity::default();
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let handover = Handover::new(slots.clone(), crate::journal::Mark::default());
        let tracked = activity.track(task("t2"));
        tracked.started(Some(&handover));
        assert_eq!(
            activity.load(),
            (0, 1),
            "queued for a thread: still waiting"
        );
        assert!(handover.state.start(slots.try_acquire_owned().unwrap()));
        assert_eq!(activity.load(), (1, 0));
        handover.state.release();
    }

    #[test]
    fn ended_tasks_are_counted_by_state() {
        let activity = Activity::default();
        let error = TaskError::new("ValueError", "bad");
        activity.succeeded(task("a"), 0.1);
        activity.succeeded(task("b"), 0.1);
        activity.failed(task("c"), &error);
        activity.dead_lettered(task("d"), "exhausted");
        let p = activity.processed();
        assert_eq!(
            (p.total, p.succeeded, p.failed, p.dead_lettered),
            (4, 2, 1, 1)
        );
    }
}

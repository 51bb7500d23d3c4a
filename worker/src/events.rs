//! Lifecycle events of the tasks this worker handles (received, started, succeeded, failed,
//! retried, revoked, rejected, dead-lettered), for whoever listens: metrics, an events
//! stream. Nobody listens by default, and then an event costs one branch on an `Option`: no
//! allocation, no clone, no lock.

use std::sync::Arc;

use dbtask_protocol::TaskError;

/// The task an event is about. Borrowed: building one copies nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskRef<'a> {
    pub id: &'a str,
    /// The registered task name (`?` when a message did not say).
    pub task: &'a str,
    pub queue: &'a str,
    /// Deliveries of its message (1 on the first).
    pub attempt: u32,
    /// In a workflow: the step whose outcome published this task (its `request.parent_id`)
    /// and the workflow's first task. Given with `received` only.
    pub parent_id: Option<&'a str>,
    pub root_id: Option<&'a str>,
}

/// Receives lifecycle events; every method does nothing unless overridden. Called on the
/// worker's tokio thread, in the order things happen to a task: return quickly, never block.
#[allow(unused_variables)]
pub trait Hook: Send + Sync {
    /// The message is decoded and holds a slot (or waits for one in the Python threads' queue).
    fn received(&self, task: TaskRef<'_>) {}
    /// The job is handed to its executor. Not yet proof that its code runs: a job handed over
    /// to the Python threads' queue may still be revoked before a thread takes it (then
    /// `revoked` follows), or handed back at shutdown (then nothing follows for this delivery).
    fn started(&self, task: TaskRef<'_>) {}
    /// Its function ran and ended (returned, raised, or was interrupted): it started
    /// `queued_secs` after its message became due (stored in its queue, or its eta) and ran
    /// `runtime_secs`. Called before the outcome is settled, so before any of the outcome
    /// events below; not for a job handed back unrun.
    fn ran(&self, task: TaskRef<'_>, queued_secs: f64, runtime_secs: f64) {}
    /// SUCCESS is stored.
    fn succeeded(&self, task: TaskRef<'_>, runtime_secs: f64) {}
    /// FAILURE is stored for a task that ran (an exception, a time limit, no retry left).
    fn failed(&self, task: TaskRef<'_>, error: &TaskError) {}
    /// RETRY is stored and its next attempt published, due in `delay_secs`.
    fn retried(&self, task: TaskRef<'_>, error: &TaskError, delay_secs: f64) {}
    /// REVOKED is stored: revoked before it started, terminated, or expired.
    fn revoked(&self, task: TaskRef<'_>, error: &TaskError) {}
    /// FAILURE is stored for a message refused without running (unknown task, unreadable).
    fn rejected(&self, task: TaskRef<'_>, error: &TaskError) {}
    /// The message went to the dead-letter stream.
    fn dead_lettered(&self, task: TaskRef<'_>, reason: &str) {}
}

/// Where events go: nowhere (the default) or one [`Hook`]. Cheap to clone.
#[derive(Clone, Default)]
pub struct Hooks(Option<Arc<dyn Hook>>);

impl Hooks {
    pub fn new(hook: Arc<dyn Hook>) -> Hooks {
        Hooks(Some(hook))
    }

    /// These hooks plus `hook`: each event reaches the hooks already here first, then `hook`.
    /// Metrics and the events stream each add theirs; with one listener an event still costs
    /// one branch, with two one more virtual call.
    pub fn with(self, hook: Arc<dyn Hook>) -> Hooks {
        match self.0 {
            None => Hooks(Some(hook)),
            Some(first) => Hooks(Some(Arc::new(Both(first, hook)))),
        }
    }

    /// Whether anyone listens; callers need not check before emitting.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    #[inline]
    pub fn received(&self, task: TaskRef<'_>) {
        if let Some(hook) = &self.0 {
            hook.received(task);
        }
    }

    #[inline]
    pub fn started(&self, task: TaskRef<'_>) {
        if let Some(hook) = &self.0 {
            hook.started(task);
        }
    }

    #[inline]
    pub fn ran(&self, task: TaskRef<'_>, queued_secs: f64, runtime_secs: f64) {
        if let Some(hook) = &self.0 {
            hook.ran(task, queued_secs, runtime_secs);
        }
    }

    #[inline]
    pub fn succeeded(&self, task: TaskRef<'_>, runtime_secs: f64) {
        if let Some(hook) = &self.0 {
            hook.succeeded(task, runtime_secs);
        }
    }

    #[inline]
    pub fn failed(&self, task: TaskRef<'_>, error: &TaskError) {
        if let Some(hook) = &self.0 {
            hook.failed(task, error);
        }
    }

    #[inline]
    pub fn retried(&self, task: TaskRef<'_>, error: &TaskError, delay_secs: f64) {
        if let Some(hook) = &self.0 {
            hook.retried(task, error, delay_secs);
        }
    }

    #[inline]
    pub fn revoked(&self, task: TaskRef<'_>, error: &TaskError) {
        if let Some(hook) = &self.0 {
            hook.revoked(task, error);
        }
    }

    #[inline]
    pub fn rejected(&self, task: TaskRef<'_>, error: &TaskError) {
        if let Some(hook) = &self.0 {
            hook.rejected(task, error);
        }
    }

    #[inline]
    pub fn dead_lettered(&self, task: TaskRef<'_>, reason: &str) {
        if let Some(hook) = &self.0 {
            hook.dead_lettered(task, reason);
        }
    }
}

/// Two hooks heard in order; nested for more.
struct Both(Arc<dyn Hook>, Arc<dyn Hook>);

impl Hook for Both {
    fn received(&self, task: TaskRef<'_>) {
        self.0.received(task);
        self.1.received(task);
    }
    fn started(&self, task: TaskRef<'_>) {
        self.0.started(task);
        self.1.started(task);
    }
    fn ran(&self, task: TaskRef<'_>, queued_secs: f64, runtime_secs: f64) {
        self.0.ran(task, queued_secs, runtime_secs);
        self.1.ran(task, queued_secs, runtime_secs);
    }
    fn succeeded(&self, task: TaskRef<'_>, runtime_secs: f64) {
        self.0.succeeded(task, runtime_secs);
        self.1.succeeded(task, runtime_secs);
    }
    fn failed(&self, task: TaskRef<'_>, error: &TaskError) {
        self.0.failed(task, error);
        self.1.failed(task, error);
    }
    fn retried(&self, task: TaskRef<'_>, error: &TaskError, delay_secs: f64) {
        self.0.retried(task, error, delay_secs);
        self.1.retried(task, error, delay_secs);
    }
    fn revoked(&self, task: TaskRef<'_>, error: &TaskError) {
        self.0.revoked(task, error);
        self.1.revoked(task, error);
    }
    fn rejected(&self, task: TaskRef<'_>, error: &TaskError) {
        self.0.rejected(task, error);
        self.1.rejected(task, error);
    }
    fn dead_lettered(&self, task: TaskRef<'_>, reason: &str) {
        self.0.dead_lettered(task, reason);
        self.1.dead_lettered(task, reason);
    }
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_empty() {
            "Hooks(none)"
        } else {
            "Hooks(some)"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Seen(Mutex<Vec<String>>);

    impl Hook for Seen {
        fn received(&self, task: TaskRef<'_>) {
            self.0.lock().unwrap().push(format!("received {}", task.id));
        }
        fn failed(&self, task: TaskRef<'_>, error: &TaskError) {
            self.0
                .lock()
                .unwrap()
                .push(format!("failed {} {}", task.id, error.exc_type));
        }
        fn ran(&self, task: TaskRef<'_>, queued_secs: f64, runtime_secs: f64) {
            self.0
                .lock()
                .unwrap()
                .push(format!("ran {} {queued_secs} {runtime_secs}", task.id));
        }
    }

    #[test]
    fn events_reach_the_hook_and_nothing_else_is_needed() {
        let task = TaskRef {
            id: "t1",
            task: "add",
            queue: "default",
            attempt: 1,
            parent_id: None,
            root_id: None,
        };
        let error = TaskError::new("ValueError", "bad");
        // Nobody listening: every event is a no-op.
        let none = Hooks::default();
        assert!(none.is_empty());
        none.received(task);
        none.failed(task, &error);

        let seen = Arc::new(Seen::default());
        let hooks = Hooks::new(seen.clone());
        hooks.received(task);
        hooks.started(task); // not overridden: ignored
        hooks.failed(task, &error);
        assert_eq!(
            *seen.0.lock().unwrap(),
            vec!["received t1".to_owned(), "failed t1 ValueError".to_owned()]
        );

        // A second listener hears every event too, after the first.
        let other = Arc::new(Seen::default());
        let both = hooks.with(other.clone());
        both.received(task);
        both.ran(task, 0.5, 0.25);
        assert_eq!(seen.0.lock().unwrap().len(), 4);
        assert_eq!(
            *other.0.lock().unwrap(),
            vec!["received t1".to_owned(), "ran t1 0.5 0.25".to_owned()]
        );
    }
}

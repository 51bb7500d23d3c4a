//! Sync jobs handed to the pool before a slot is free, so that a Python thread that finishes
//! one task finds the next one already decoded and queued instead of waiting for the tokio
//! thread to hand it over.
//!
//! Such a job waits in the pool's queue without a slot. The thread that takes it first takes a
//! slot (a permit of the worker's slot semaphore, shared with the tasks that wait for theirs on
//! the tokio side), and only then marks the job started: the job counts as running, and its
//! time limits run, from that moment. Until then the caller may still cancel it (a revocation,
//! a shutdown): [`JobState`] decides under one lock which of the two came first, so a job is
//! either run or cancelled, never both.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::journal::Mark;

/// What a job handed over without a slot needs: where its slot comes from, and its state.
#[derive(Clone)]
pub struct Handover {
    pub slots: Arc<Semaphore>,
    pub state: Arc<JobState>,
}

impl Handover {
    /// `mark`: where the job's run is entered in the crash journal.
    pub fn new(slots: Arc<Semaphore>, mark: Mark) -> Handover {
        Handover {
            slots,
            state: Arc::new(JobState {
                inner: Mutex::default(),
                mark,
            }),
        }
    }
}

pub struct JobState {
    inner: Mutex<Inner>,
    mark: Mark,
}

#[derive(Default)]
struct Inner {
    phase: Phase,
    /// The slot, held from the start until the job returns or its caller gives up on it.
    permit: Option<OwnedSemaphorePermit>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    #[default]
    Queued,
    Started(Instant),
    Cancelled,
}

impl JobState {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while the lock is held; recover the data regardless.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The Python thread starts the job under `permit`; false (the permit is dropped) if the
    /// caller cancelled it first.
    pub(crate) fn start(&self, permit: OwnedSemaphorePermit) -> bool {
        let mut inner = self.lock();
        if inner.phase != Phase::Queued {
            return false;
        }
        inner.phase = Phase::Started(Instant::now());
        inner.permit = Some(permit);
        self.mark.running();
        true
    }

    /// Cancels the job if it has not started: true when it never will.
    pub fn cancel(&self) -> bool {
        let mut inner = self.lock();
        match inner.phase {
            Phase::Queued | Phase::Cancelled => {
                inner.phase = Phase::Cancelled;
                true
            }
            Phase::Started(_) => false,
        }
    }

    /// When the job started, if it has.
    pub fn started_at(&self) -> Option<Instant> {
        match self.lock().phase {
            Phase::Started(at) => Some(at),
            _ => None,
        }
    }

    /// Frees the job's slot: the job returned, or its caller gave up on it (a hard time limit,
    /// a terminate) and its thread is retired.
    pub fn release(&self) {
        let permit = self.lock().permit.take();
        self.mark.returned();
        drop(permit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_job_is_either_started_or_cancelled() {
        let slots = Arc::new(Semaphore::new(1));
        let run = Handover::new(slots.clone(), Mark::default());
        assert_eq!(run.state.started_at(), None);
        assert!(run.state.start(slots.clone().try_acquire_owned().unwrap()));
        assert!(run.state.started_at().is_some());
        assert!(!run.state.cancel(), "a started job cannot be cancelled");
        assert_eq!(slots.available_permits(), 0, "it holds its slot");
        run.state.release();
        assert_eq!(slots.available_permits(), 1);

        let cancelled = Handover::new(slots.clone(), Mark::default());
        assert!(cancelled.state.cancel());
        assert!(!cancelled
            .state
            .start(slots.clone().try_acquire_owned().unwrap()));
        assert_eq!(
            slots.available_permits(),
            1,
            "a cancelled job gives its slot back"
        );
        assert_eq!(cancelled.state.started_at(), None);
    }
}

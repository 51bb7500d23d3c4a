//! The hand-over queue between tokio (producers, never holding the GIL) and Python threads.
//!
//! Only one thread can run Python at a time, so waking a sleeping thread per job (as a plain
//! condvar queue does) mostly buys context switches: the woken threads queue up on the GIL.
//! Instead at most one *spare* thread is woken at a time: it takes the GIL, takes a job, and
//! before running it wakes the next spare if more jobs wait. A burst of short jobs then runs
//! on one thread with one spare waiting on the GIL, and jobs that block (and release the GIL)
//! still start one after the other on fresh threads, a wake-up apart.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

pub(crate) struct JobQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    /// How many items are queued, readable without the lock.
    len: AtomicUsize,
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
    /// Consumers asleep in `wait_for_work` / `pop_blocking`.
    sleeping: usize,
    /// A consumer was woken for the queued jobs and has not taken one (or gone back to
    /// sleep) yet: no need to wake another.
    spare: bool,
}

impl<T> Default for JobQueue<T> {
    fn default() -> Self {
        JobQueue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
                sleeping: 0,
                spare: false,
            }),
            ready: Condvar::new(),
            len: AtomicUsize::new(0),
        }
    }
}

impl<T> JobQueue<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic never happens while the lock is held; recover the data regardless.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an item and wakes a sleeping consumer unless one is already on its way; gives
    /// the item back once the queue is closed.
    pub fn push(&self, item: T) -> Result<(), T> {
        let mut state = self.lock();
        if state.closed {
            return Err(item);
        }
        state.items.push_back(item);
        self.len.store(state.items.len(), Ordering::Relaxed);
        let wake = Self::want_spare(&mut state);
        drop(state);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Adds an item like [`JobQueue::push`], but leaves the wake-up owed, if one is, to the
    /// caller: `Ok(true)` means a spare is marked as woken and the caller must call
    /// [`JobQueue::wake_spare`] soon (until then later pushes wake nobody). Lets a producer
    /// that queues several items in a row wake a consumer once for all of them.
    pub fn push_owing(&self, item: T) -> Result<bool, T> {
        let mut state = self.lock();
        if state.closed {
            return Err(item);
        }
        state.items.push_back(item);
        self.len.store(state.items.len(), Ordering::Relaxed);
        Ok(Self::want_spare(&mut state))
    }

    /// Wakes the spare owed by [`JobQueue::push_owing`].
    pub fn wake_spare(&self) {
        self.ready.notify_one();
    }

    /// True (and the spare marked as woken) when jobs wait, no spare is awake, and a
    /// consumer sleeps.
    fn want_spare(state: &mut State<T>) -> bool {
        if !state.spare && state.sleeping > 0 && !state.items.is_empty() {
            state.spare = true;
            true
        } else {
            false
        }
    }

    /// Sleeps until an item is queued: `true`, or `false` once the queue is closed and empty.
    /// The item is taken afterwards with [`JobQueue::take`] (by a Python thread, once it holds
    /// the GIL), so that a thread never holds a job while it waits for the GIL.
    pub fn wait_for_work(&self) -> bool {
        let mut state = self.lock();
        let mut slept = false;
        loop {
            if !state.items.is_empty() {
                return true;
            }
            if state.closed {
                return false;
            }
            if slept {
                // Woken for a job someone else took: no spare is awake any more.
                state.spare = false;
            }
            state.sleeping += 1;
            state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
            state.sleeping -= 1;
            slept = true;
        }
    }

    /// The next item if one is waiting; wakes a spare consumer when more are queued.
    /// `woken`: the caller just returned from [`JobQueue::wait_for_work`] (it was the spare).
    pub fn take(&self, woken: bool) -> Option<T> {
        let mut state = self.lock();
        if woken {
            state.spare = false;
        }
        let item = state.items.pop_front();
        self.len.store(state.items.len(), Ordering::Relaxed);
        let wake = item.is_some() && Self::want_spare(&mut state);
        drop(state);
        if wake {
            self.ready.notify_one();
        }
        item
    }

    /// The next item, waiting for one; `None` once the queue is closed and empty.
    #[cfg(test)]
    pub fn pop_blocking(&self) -> Option<T> {
        loop {
            if !self.wait_for_work() {
                return None;
            }
            if let Some(item) = self.take(true) {
                return Some(item);
            }
        }
    }

    /// The next item if one is waiting.
    #[cfg(test)]
    pub fn try_pop(&self) -> Option<T> {
        let mut state = self.lock();
        let item = state.items.pop_front();
        self.len.store(state.items.len(), Ordering::Relaxed);
        item
    }

    /// Items queued now (a snapshot).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Every waiting item, and whether the queue is closed (then no item will follow).
    pub fn take_all(&self) -> (VecDeque<T>, bool) {
        let mut state = self.lock();
        self.len.store(0, Ordering::Relaxed);
        (std::mem::take(&mut state.items), state.closed)
    }

    /// Refuses new items; consumers still get the ones already queued.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::JobQueue;

    #[test]
    fn hands_over_in_order_until_closed_and_empty() {
        let q = JobQueue::default();
        q.push(1).unwrap();
        q.push(2).unwrap();
        assert_eq!(q.try_pop(), Some(1));
        q.close();
        assert_eq!(q.push(3), Err(3));
        assert_eq!(q.pop_blocking(), Some(2));
        assert_eq!(q.pop_blocking(), None);
        assert_eq!(q.take_all(), (Default::default(), true));
    }

    #[test]
    fn wakes_a_waiting_consumer() {
        let q = std::sync::Arc::new(JobQueue::default());
        let consumer = {
            let q = q.clone();
            std::thread::spawn(move || (q.pop_blocking(), q.pop_blocking()))
        };
        q.push("job").unwrap();
        q.close();
        assert_eq!(consumer.join().unwrap(), (Some("job"), None));
    }

    /// A burst of pushes owes one wake-up, for the first; once it is done, the woken consumer
    /// takes every job of the burst.
    #[test]
    fn a_burst_owes_one_wake_up() {
        use std::sync::Arc;
        let q = Arc::new(JobQueue::default());
        let consumer = {
            let q = q.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                while q.wait_for_work() {
                    let mut next = q.take(true);
                    while let Some(job) = next {
                        got.push(job);
                        next = q.take(false);
                    }
                }
                got
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while q.lock().sleeping == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the consumer never slept"
            );
            std::thread::yield_now();
        }
        assert_eq!(q.push_owing(1), Ok(true));
        assert_eq!(q.push_owing(2), Ok(false));
        assert_eq!(q.push_owing(3), Ok(false));
        q.wake_spare();
        while !q.lock().items.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the woken consumer took nothing"
            );
            std::thread::yield_now();
        }
        q.close();
        assert_eq!(consumer.join().unwrap(), vec![1, 2, 3]);
    }

    /// Jobs queued while every consumer sleeps are all taken, by a chain of spares: none is
    /// left behind however the pushes and wake-ups interleave.
    #[test]
    fn spares_take_every_job() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let q = Arc::new(JobQueue::default());
        let done = Arc::new(AtomicUsize::new(0));
        let consumers: Vec<_> = (0..4)
            .map(|_| {
                let (q, done) = (q.clone(), done.clone());
                std::thread::spawn(move || {
                    while q.wait_for_work() {
                        let mut next = q.take(true);
                        while let Some(job) = next {
                            if job % 7 == 0 {
                                // A job that blocks: the others must go on without it.
                                std::thread::sleep(std::time::Duration::from_millis(2));
                            }
                            done.fetch_add(1, Ordering::SeqCst);
                            next = q.take(false);
                        }
                    }
                })
            })
            .collect();
        for round in 0..50 {
            for job in 0..40 {
                q.push(round * 40 + job).unwrap();
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while done.load(Ordering::SeqCst) < 2000 {
            assert!(
                std::time::Instant::now() < deadline,
                "jobs left behind: {} of 2000 done",
                done.load(Ordering::SeqCst)
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        q.close();
        for c in consumers {
            c.join().unwrap();
        }
    }
}

//! The hand-over queue between tokio (producers, never holding the GIL) and Python threads.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

pub(crate) struct JobQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

impl<T> Default for JobQueue<T> {
    fn default() -> Self {
        JobQueue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        }
    }
}

impl<T> JobQueue<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic never happens while the lock is held; recover the data regardless.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an item and wakes one waiting consumer; gives it back once the queue is closed.
    pub fn push(&self, item: T) -> Result<(), T> {
        let mut state = self.lock();
        if state.closed {
            return Err(item);
        }
        state.items.push_back(item);
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// The next item, waiting for one; `None` once the queue is closed and empty.
    pub fn pop_blocking(&self) -> Option<T> {
        let mut state = self.lock();
        loop {
            if let Some(item) = state.items.pop_front() {
                return Some(item);
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The next item if one is waiting.
    pub fn try_pop(&self) -> Option<T> {
        self.lock().items.pop_front()
    }

    /// Every waiting item, and whether the queue is closed (then no item will follow).
    pub fn take_all(&self) -> (VecDeque<T>, bool) {
        let mut state = self.lock();
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
}

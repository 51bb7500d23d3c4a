//! Giving freed heap memory back to the OS once the worker is idle.
//!
//! glibc's malloc returns only the top of its heap to the OS by itself; memory freed below a
//! block still in use stays in the process. A burst of tasks leaves megabytes of it (handler
//! futures, message and pipeline buffers of the tasks in flight), and start-up leaves some (the
//! imports). `malloc_trim(0)` gives every free page back. It walks the heap holding its locks,
//! so the worker calls it only when idle: after start-up, then once after each burst, when a
//! whole period went by without a task finishing. Elsewhere than glibc it does nothing.

use std::time::{Duration, Instant};

use crate::python::FinishedCalls;

/// How often the worker checks whether it went idle.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Decides when to trim, from the count of finished tasks sampled every [`CHECK_EVERY`].
#[derive(Debug, Default)]
pub struct IdleTrim {
    seen: u64,
    trimmed: bool,
}

impl IdleTrim {
    /// `finished`: tasks finished so far. True when the heap should be trimmed now: no task
    /// finished since the previous sample, and some did (or start-up ran) since the last trim.
    pub fn sample(&mut self, finished: u64) -> bool {
        if finished != self.seen {
            self.seen = finished;
            self.trimmed = false;
            return false;
        }
        !std::mem::replace(&mut self.trimmed, true)
    }
}

/// Allocations from this size up get their own mapping, unmapped when freed.
const MMAP_THRESHOLD: usize = 256 << 10;

/// Sets malloc up so that large buffers go back to the OS as soon as they are freed. Call it
/// first thing, before any thread exists.
///
/// glibc raises its mmap threshold each time a mapped block is freed, up to 32 MiB: after a
/// few tasks with arguments of a megabyte, such buffers came from the heaps of the Python
/// threads instead, and the heaps stayed large (a burst of 60 tasks with 0.6-0.9 MB arguments
/// left a worker 29 MiB above its idle size, after trimming). A fixed threshold keeps blocks
/// of 256 KiB and more in their own mappings, which `free` returns at once; the few such
/// allocations a task makes cost one `mmap`/`munmap` each.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes malloc's parameters; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
        }
    }
}

/// Gives the heap's free pages back to the OS; true if any was.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks and trims malloc's own arenas, under their locks.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Trims the heap each time the worker goes idle (see the module doc); never returns.
pub async fn trim_when_idle(finished: FinishedCalls) {
    let mut idle = IdleTrim::default();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + CHECK_EVERY, CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if idle.sample(finished.get()) {
            let before = rss_kib();
            let started = Instant::now();
            let released = trim();
            tracing::debug!(
                released,
                rss_before_kib = before,
                rss_after_kib = rss_kib(),
                micros = started.elapsed().as_micros() as u64,
                "worker idle: gave freed heap memory back to the OS"
            );
        }
    }
}

/// Resident memory of this process in KiB (0 if unknown).
pub fn rss_kib() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a system setting.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096) / 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_after_start_up_then_once_after_each_burst() {
        let mut idle = IdleTrim::default();
        assert!(idle.sample(0), "idle after start-up: trim");
        assert!(!idle.sample(0), "still idle: already trimmed");
        assert!(
            !idle.sample(5),
            "tasks finished since the last sample: busy"
        );
        assert!(!idle.sample(9), "still busy");
        assert!(idle.sample(9), "a whole period without a task: trim");
        assert!(!idle.sample(9));
        assert!(!idle.sample(9));
        assert!(!idle.sample(10), "one more task: busy again");
        assert!(idle.sample(10));
    }

    #[test]
    fn trimming_leaves_the_heap_usable() {
        let blocks: Vec<Vec<u8>> = (0..1000).map(|i| vec![i as u8; 4096]).collect();
        let kept: Vec<Vec<u8>> = blocks.into_iter().step_by(2).collect();
        trim();
        assert!(kept
            .iter()
            .enumerate()
            .all(|(i, b)| b.iter().all(|&x| x == (2 * i) as u8)));
        let again = vec![7u8; 1 << 20];
        assert_eq!(again.iter().map(|&x| x as usize).sum::<usize>(), 7 << 20);
    }
}

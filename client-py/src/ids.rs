//! Task ids: random (v4) UUIDs, drawn from a per-thread buffer of OS randomness.
//!
//! `Uuid::new_v4()` makes one `getrandom` syscall per id, that is per task; here one call
//! fills [`POOL_BYTES`] bytes, enough for 256 ids. The bytes come from the same source
//! (the kernel's CSPRNG), so ids are exactly as unpredictable as before.
//!
//! A forked child would inherit the buffer of the forking thread and hand out the ids its
//! parent hands out too (JetStream would then drop one of the two messages as a duplicate):
//! [`after_fork_in_child`] bumps a generation that makes every buffer refill first.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

const POOL_BYTES: usize = 4096;

static GENERATION: AtomicU64 = AtomicU64::new(0);

struct Pool {
    generation: u64,
    used: usize,
    bytes: [u8; POOL_BYTES],
}

thread_local! {
    // Boxed: the thread-local itself must stay small, or loading the extension can fail
    // with "cannot allocate memory in static TLS block".
    static POOL: RefCell<Box<Pool>> = RefCell::new(Box::new(Pool {
        generation: u64::MAX,
        used: POOL_BYTES,
        bytes: [0; POOL_BYTES],
    }));
}

/// A new random task id, `xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`.
pub fn new_task_id() -> String {
    let mut random = [0u8; 16];
    POOL.with_borrow_mut(|pool| {
        let generation = GENERATION.load(Ordering::Acquire);
        if pool.generation != generation || pool.used + 16 > POOL_BYTES {
            // Without OS randomness there is no safe id to give: as Uuid::new_v4 does, panic
            // (PyO3 turns it into a Python exception).
            getrandom::fill(&mut pool.bytes).expect("cannot read random bytes from the OS");
            pool.generation = generation;
            pool.used = 0;
        }
        random.copy_from_slice(&pool.bytes[pool.used..pool.used + 16]);
        // Each id's bytes are used once, and not left behind for a later reader of memory.
        pool.bytes[pool.used..pool.used + 16].fill(0);
        pool.used += 16;
    });
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Builder::from_random_bytes(random)
        .into_uuid()
        .hyphenated()
        .encode_lower(&mut text)
        .to_owned()
}

/// Called in a forked child: no buffer inherited from the parent is used again.
pub fn after_fork_in_child() {
    GENERATION.fetch_add(1, Ordering::AcqRel);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v4_uuids_and_distinct_across_refills() {
        let ids: Vec<String> = (0..1000).map(|_| new_task_id()).collect();
        for id in &ids {
            let parsed = uuid::Uuid::parse_str(id).expect("a UUID");
            assert_eq!(parsed.get_version_num(), 4, "{id}");
            assert_eq!(parsed.hyphenated().to_string(), *id);
        }
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }

    #[test]
    fn a_fork_refills_the_buffer() {
        let before = new_task_id();
        let used = POOL.with_borrow(|p| p.used);
        assert!(used > 0);
        after_fork_in_child();
        let _ = new_task_id();
        // Refilled: the next id came from a fresh buffer, not from where `before` left off.
        assert_eq!(POOL.with_borrow(|p| p.used), 16);
        assert_ne!(new_task_id(), before);
    }
}

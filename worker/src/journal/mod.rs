//! The crash journal: which task messages this worker holds, and which of them are running,
//! in a small file mapped into memory.
//!
//! When a worker process dies (a task's segfault or `os._exit`, the OOM killer, SIGKILL), NATS
//! redelivers every message it held, and each redelivery counts towards `max_deliver`: without
//! more knowledge, a task that kills its worker would take a delivery from every task waiting
//! in the prefetch with it, and dead-letter innocent tasks. The journal is that knowledge.
//! Each held message has an entry (its stream sequence and whether its code runs); writing one
//! is a store to memory, no system call. The kernel keeps the pages of a dead process's shared
//! file mapping, so the next worker to start with the same servers (see [`recover`]) reads what
//! was running at the moment of death, tells Redis which deliveries were lost by tasks that
//! never ran (not charged) and which by running ones (charged, with the cause), and removes
//! the file. The dead-letter decision then counts only charged deliveries (see
//! `runner/dead.rs`).
//!
//! A file survives a crash of the process, not of the machine: after a reboot (or with a state
//! directory that a container does not keep) every held message is charged, as NATS counts.

mod fatal;
pub mod recover;

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub use recover::Crashed;

const MAGIC: [u8; 8] = *b"DBTJRNL1";

/// The file's first bytes.
#[repr(C)]
struct Header {
    magic: [u8; 8],
    /// Which servers the worker used (see [`identity`]): only a worker of the same deployment
    /// recovers a journal.
    identity: u64,
    pid: u32,
    slots: u32,
    /// The fatal signal the process took (`fatal.rs`), 0 if none was seen.
    signal: AtomicU32,
    _reserved: [u8; 36],
}

const HEADER_BYTES: usize = std::mem::size_of::<Header>();
const _: () = assert!(HEADER_BYTES == 64);

/// What an entry says of its message. An entry is one `u64`: the stream sequence shifted left
/// by two, and the state in the low bits (0: free entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Received, its code not started (waiting for a slot, or being admitted).
    Held = 1,
    /// Its code runs.
    Running = 2,
    /// Its code returned; the outcome is being stored and acked.
    Ran = 3,
}

impl State {
    fn of(entry: u64) -> Option<(u64, State)> {
        let state = match entry & 3 {
            1 => State::Held,
            2 => State::Running,
            3 => State::Ran,
            _ => return None,
        };
        Some((entry >> 2, state))
    }
}

fn entry(seq: u64, state: State) -> u64 {
    (seq << 2) | state as u64
}

/// Where the code of one held message says that it starts and that it returned, from any
/// thread. Does nothing when the journal had no entry for it. An entry given to another
/// message meanwhile is left alone (a thread abandoned after a hard time limit returns late).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mark(Option<(&'static AtomicU64, u64)>);

impl Mark {
    /// The task's code starts.
    #[inline]
    pub fn running(self) {
        self.exchange(State::Held, State::Running);
    }

    /// The task's code returned (or raised).
    #[inline]
    pub fn returned(self) {
        self.exchange(State::Running, State::Ran);
    }

    fn exchange(self, from: State, to: State) {
        if let Some((slot, seq)) = self.0 {
            let _ = slot.compare_exchange(
                entry(seq, from),
                entry(seq, to),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }
}

/// This worker's journal: the mapped entries, and which are free (used on the runner thread
/// only).
pub struct Journal {
    entries: &'static [AtomicU64],
    free: RefCell<Vec<u32>>,
    /// The file, locked for as long as this worker lives; `None` for a journal in memory only.
    file: Option<(PathBuf, File)>,
}

impl Journal {
    /// A journal with `slots` entries kept in memory only: entries work, a crash is not
    /// recovered (no state directory could be used).
    pub fn in_memory(slots: usize) -> io::Result<Journal> {
        let map = map(None, bytes_for(slots))?;
        Ok(Journal::over(map, slots, 0, None))
    }

    /// Creates this worker's journal file in `dir` for the servers of `identity`: created under
    /// a temporary name, locked, then renamed, so that a worker scanning the directory never
    /// takes a live journal for a dead one.
    pub fn create(dir: &Path, identity: u64, slots: usize) -> io::Result<Journal> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "{}-{}-{stamp:08x}.bin",
            prefix(identity),
            std::process::id()
        );
        let path = dir.join(&name);
        let temporary = dir.join(format!(".{name}.new"));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temporary)?;
        let created = (|| {
            file.set_len(bytes_for(slots) as u64)?;
            recover::lock(&file)?;
            let map = map(Some(&file), bytes_for(slots))?;
            std::fs::rename(&temporary, &path)?;
            Ok(map)
        })();
        match created {
            Ok(map) => Ok(Journal::over(map, slots, identity, Some((path, file)))),
            Err(e) => {
                let _ = std::fs::remove_file(&temporary);
                Err(e)
            }
        }
    }

    fn over(
        map: &'static mut [u8],
        slots: usize,
        identity: u64,
        file: Option<(PathBuf, File)>,
    ) -> Journal {
        let (head, rest) = map.split_at_mut(HEADER_BYTES);
        // SAFETY: the mapping is page-aligned, zero-filled and lives for the rest of the
        // process (never unmapped); `Header` is plain data whose every bit pattern is valid.
        let header = unsafe { &mut *(head.as_mut_ptr() as *mut Header) };
        header.magic = MAGIC;
        header.identity = identity;
        header.pid = std::process::id();
        header.slots = slots as u32;
        let header: &'static Header = header;
        // SAFETY: as above; `rest` holds `slots` aligned u64s (the header is 64 bytes).
        let entries =
            unsafe { std::slice::from_raw_parts(rest.as_ptr() as *const AtomicU64, slots) };
        if file.is_some() {
            fatal::record_into(&header.signal);
        }
        Journal {
            entries,
            free: RefCell::new((0..slots as u32).rev().collect()),
            file,
        }
    }

    /// The file, if this journal has one.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|(p, _)| p.as_path())
    }

    /// Enters the message at stream sequence `seq`, held from now until the returned guard
    /// is dropped. Without a free entry (more messages than the worker ever holds) the
    /// message goes unrecorded: after a crash it would be charged, as NATS counts.
    pub fn hold(&self, seq: u64) -> Held<'_> {
        // Sequence 0: a message whose metadata did not parse, nothing to find it by later.
        let index = if seq == 0 {
            None
        } else {
            self.free.borrow_mut().pop()
        };
        if let Some(i) = index {
            self.entries[i as usize].store(entry(seq, State::Held), Ordering::Relaxed);
        }
        Held {
            journal: self,
            index,
            seq,
        }
    }

    /// A clean exit: nothing is held any more, the file goes.
    pub fn close(&self) {
        fatal::record_into_nothing();
        if let Some((path, _file)) = &self.file {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::debug!(path = %path.display(), error = %e, "cannot remove the crash journal");
            }
        }
    }
}

/// A message's entry in the journal, freed when dropped (the message was acked or handed
/// back).
pub struct Held<'a> {
    journal: &'a Journal,
    index: Option<u32>,
    seq: u64,
}

impl Held<'_> {
    /// For whoever runs the message's code.
    pub fn mark(&self) -> Mark {
        Mark(
            self.index
                .map(|i| (&self.journal.entries[i as usize], self.seq)),
        )
    }

    /// Where the message stands; `None` when it has no entry.
    pub fn state(&self) -> Option<State> {
        let i = self.index?;
        State::of(self.journal.entries[i as usize].load(Ordering::Relaxed))
            .filter(|(seq, _)| *seq == self.seq)
            .map(|(_, state)| state)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.index {
            self.journal.entries[i as usize].store(0, Ordering::Relaxed);
            self.journal.free.borrow_mut().push(i);
        }
    }
}

/// The servers a worker uses, as one number: the NATS and Redis addresses as shown in logs
/// (passwords masked, so that a rotated password keeps the identity). FNV-1a: stable across
/// builds and processes, unlike the standard library's hasher.
pub fn identity(nats_url: &str, redis_url: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in nats_url.bytes().chain([0]).chain(redis_url.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The file name prefix of the journals of `identity`.
fn prefix(identity: u64) -> String {
    format!("journal-{identity:016x}")
}

fn bytes_for(slots: usize) -> usize {
    HEADER_BYTES + slots * std::mem::size_of::<u64>()
}

/// Maps `len` bytes of `file` (shared: the kernel keeps what was written when the process
/// dies), or anonymous memory; never unmapped.
fn map(file: Option<&File>, len: usize) -> io::Result<&'static mut [u8]> {
    let (flags, fd) = match file {
        Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
        None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
    };
    // SAFETY: a fresh mapping of `len` bytes, checked for failure; nothing else refers to it.
    unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        );
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(std::slice::from_raw_parts_mut(ptr as *mut u8, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_follow_a_message_and_ignore_a_late_thread() {
        let journal = Journal::in_memory(2).unwrap();
        let a = journal.hold(41);
        assert_eq!(a.state(), Some(State::Held));
        let mark = a.mark();
        mark.running();
        assert_eq!(a.state(), Some(State::Running));
        mark.returned();
        assert_eq!(a.state(), Some(State::Ran));
        drop(a);
        // The entry now belongs to another message: the old mark must not touch it.
        let b = journal.hold(42);
        mark.running();
        mark.returned();
        assert_eq!(b.state(), Some(State::Held));
        let c = journal.hold(43);
        let d = journal.hold(44);
        assert_eq!(d.state(), None, "no room: unrecorded, never a shared entry");
        d.mark().running();
        assert_eq!(c.state(), Some(State::Held));
    }

    #[test]
    fn identity_is_stable_and_tells_servers_apart() {
        let a = identity("nats://127.0.0.1:4222", "redis://127.0.0.1:6379");
        assert_eq!(
            a,
            identity("nats://127.0.0.1:4222", "redis://127.0.0.1:6379")
        );
        assert_ne!(
            a,
            identity("nats://127.0.0.1:4223", "redis://127.0.0.1:6379")
        );
        assert_ne!(
            a,
            identity("nats://127.0.0.1:4222", "redis://127.0.0.1:6380")
        );
    }
}

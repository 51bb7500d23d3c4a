//! Finding the journals of workers that died: files of the same servers' identity whose lock
//! nobody holds (a live worker holds its own until it exits; the kernel releases a dead one's).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{prefix, State, HEADER_BYTES, MAGIC};

/// What a dead worker held when it died. Its file stays locked by this value until
/// [`Crashed::discard`] (once Redis knows) or until dropped (then another worker may try).
pub struct Crashed {
    path: PathBuf,
    _lock: File,
    pub pid: u32,
    /// The fatal signal it took, if it saw one.
    pub signal: Option<i32>,
    /// Stream sequences of messages whose code was running.
    pub running: Vec<u64>,
    /// Stream sequences of messages it held without running them (waiting for a slot, or
    /// already returned and being stored).
    pub idle: Vec<u64>,
}

impl Crashed {
    /// How the worker died, as far as it is known.
    pub fn cause(&self) -> String {
        match self.signal {
            Some(signo) => format!("the worker process (pid {}) was killed by {}", self.pid, signal_name(signo)),
            None => format!(
                "the worker process (pid {}) ended without a trace: SIGKILL (the OOM killer?), os._exit() or a crash on a thread's overflowed stack; the service manager's log has its exit status",
                self.pid
            ),
        }
    }

    /// The journal is accounted for: remove it.
    pub fn discard(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a recovered crash journal; it may be counted again");
        }
    }
}

/// A dead worker's journal of other servers untouched this long is removed: its messages
/// were redelivered long ago.
const STALE: Duration = Duration::from_secs(7 * 86_400);

/// The journals in `dir` of dead workers of `identity`, locked for the caller.
pub fn find(dir: &Path, identity: u64) -> io::Result<Vec<Crashed>> {
    let prefix = prefix(identity);
    let mut found = Vec::new();
    for dirent in std::fs::read_dir(dir)? {
        let Ok(dirent) = dirent else { continue };
        let name = dirent.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with("journal-") && name.ends_with(".bin")) {
            continue;
        }
        if !name.starts_with(&prefix) {
            remove_if_stale(&dirent.path());
            continue;
        }
        match open(&dirent.path(), identity) {
            Ok(Some(crashed)) => found.push(crashed),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(path = %dirent.path().display(), error = %e, "cannot read a crash journal; skipping it")
            }
        }
    }
    Ok(found)
}

fn remove_if_stale(path: &Path) {
    let old = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE));
    if old {
        if let Ok(file) = File::open(path) {
            if try_lock(&file).unwrap_or(false) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Opens a journal if its worker is dead: `None` if it is alive, or if another worker took
/// the file first (it is locked, or already removed).
fn open(path: &Path, identity: u64) -> io::Result<Option<Crashed>> {
    let mut file = File::options().read(true).write(true).open(path)?;
    if !try_lock(&file)? {
        return Ok(None);
    }
    if file.metadata()?.nlink() == 0 {
        return Ok(None); // recovered and removed by another worker between open and lock
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let parsed = parse(&bytes, identity).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "not a dbtask journal of these servers",
        )
    })?;
    Ok(Some(Crashed {
        path: path.to_owned(),
        _lock: file,
        pid: parsed.pid,
        signal: parsed.signal,
        running: parsed.running,
        idle: parsed.idle,
    }))
}

/// The fields of a journal's bytes (the path and lock left for the caller).
struct Parsed {
    pid: u32,
    signal: Option<i32>,
    running: Vec<u64>,
    idle: Vec<u64>,
}

fn parse(bytes: &[u8], identity: u64) -> Option<Parsed> {
    let (head, rest) = bytes.split_at_checked(HEADER_BYTES)?;
    let u32_at = |at: usize| u32::from_ne_bytes(head[at..at + 4].try_into().unwrap());
    if head[..8] != MAGIC || u64::from_ne_bytes(head[8..16].try_into().unwrap()) != identity {
        return None;
    }
    let (pid, slots, signal) = (u32_at(16), u32_at(20) as usize, u32_at(24));
    let mut parsed = Parsed {
        pid,
        signal: (signal != 0).then_some(signal as i32),
        running: Vec::new(),
        idle: Vec::new(),
    };
    for chunk in rest.chunks_exact(8).take(slots) {
        let value = u64::from_ne_bytes(chunk.try_into().unwrap());
        match State::of(value) {
            Some((seq, State::Running)) => parsed.running.push(seq),
            Some((seq, State::Held | State::Ran)) => parsed.idle.push(seq),
            None => {}
        }
    }
    Some(parsed)
}

/// Takes the file's exclusive lock, waiting for nobody: false if another process holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on an open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Takes the lock of this worker's own new journal (nobody else can hold it yet).
pub(super) fn lock(file: &File) -> io::Result<()> {
    if try_lock(file)? {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "the new journal is locked by another process",
        ))
    }
}

fn signal_name(signo: i32) -> String {
    let name = match signo {
        libc::SIGSEGV => "SIGSEGV (a segmentation fault)",
        libc::SIGBUS => "SIGBUS (a bus error)",
        libc::SIGILL => "SIGILL (an illegal instruction)",
        libc::SIGFPE => "SIGFPE (an arithmetic error)",
        libc::SIGABRT => "SIGABRT (abort(), e.g. a failed assertion in C code)",
        _ => return format!("signal {signo}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::super::{identity, Journal};
    use super::*;

    #[test]
    fn a_dead_workers_journal_says_what_ran_and_what_waited() {
        let dir = tempfile::tempdir().unwrap();
        let id = identity("nats://a", "redis://b");
        let journal = Journal::create(dir.path(), id, 8).unwrap();
        let running = journal.hold(7);
        running.mark().running();
        let waiting = journal.hold(8);
        let returned = journal.hold(9);
        returned.mark().running();
        returned.mark().returned();
        let gone = journal.hold(10);
        drop(gone);
        // Alive: locked, so nobody takes it.
        assert!(find(dir.path(), id).unwrap().is_empty());
        // Another identity's journals are never read.
        assert!(find(dir.path(), id + 1).unwrap().is_empty());

        // Dying keeps the entries; only the lock goes (the file descriptor closes).
        let path = journal.path().unwrap().to_owned();
        std::mem::forget((running, waiting, returned));
        let (_, file) = journal.file.as_ref().unwrap();
        // SAFETY: releases the lock as the kernel would at exit.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        let mut found = find(dir.path(), id).unwrap();
        assert_eq!(found.len(), 1);
        let crashed = found.pop().unwrap();
        assert_eq!(crashed.running, vec![7]);
        assert_eq!(crashed.idle, vec![8, 9]);
        assert_eq!(crashed.signal, None);
        assert!(
            crashed.cause().contains("without a trace"),
            "{}",
            crashed.cause()
        );
        // Held by the finder until discarded: a second finder skips it.
        assert!(find(dir.path(), id).unwrap().is_empty());
        crashed.discard();
        assert!(!path.exists());
    }
}

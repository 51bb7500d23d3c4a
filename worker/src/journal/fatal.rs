//! Which fatal signal killed the worker, written into its journal as it dies, so that the task
//! that was running can be recorded with the real cause (`killed by SIGSEGV`).
//!
//! The handler only stores the signal's number (one atomic store, safe in a signal handler),
//! puts back the handler it replaced (the default action, or Rust's stack-overflow report) and
//! returns: a fault happens again at once and that handler decides; a signal sent or raised
//! (`abort()`, `kill -SEGV`) is raised again. SIGKILL (the OOM killer) and `os._exit` leave no
//! trace: the cause is then said to be unknown.

use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::sync::OnceLock;

const FATAL: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
];

/// The journal field the handler writes to (null: none).
static TARGET: AtomicPtr<AtomicU32> = AtomicPtr::new(ptr::null_mut());

/// The handlers in place before ours, by signal.
static PREVIOUS: OnceLock<Vec<(libc::c_int, libc::sigaction)>> = OnceLock::new();

/// From now on a fatal signal is written to `signal` (a field of a journal that is never
/// unmapped). Installs the handlers on first use.
pub(super) fn record_into(signal: &'static AtomicU32) {
    TARGET.store(ptr::from_ref(signal).cast_mut(), Ordering::Release);
    if PREVIOUS.get().is_none() && PREVIOUS.set(previous_actions()).is_ok() {
        install();
    }
}

/// A clean exit is under way: nothing to record any more.
pub(super) fn record_into_nothing() {
    TARGET.store(ptr::null_mut(), Ordering::Release);
}

/// The actions in place for the fatal signals that are not ignored.
fn previous_actions() -> Vec<(libc::c_int, libc::sigaction)> {
    let mut previous = Vec::with_capacity(FATAL.len());
    for signo in FATAL {
        // SAFETY: reads the current action into a zeroed struct.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signo, ptr::null(), &mut old) != 0 {
                continue;
            }
            // Leave alone a signal someone chose to ignore.
            if old.sa_sigaction == libc::SIG_IGN {
                continue;
            }
            previous.push((signo, old));
        }
    }
    previous
}

/// Installs ours over those of [`PREVIOUS`], set first so that the handler always finds them.
fn install() {
    for (signo, _) in PREVIOUS.get().into_iter().flatten() {
        // SAFETY: a fully initialised action; the handler only does async-signal-safe things
        // (atomic loads and stores, sigaction, raise).
        unsafe {
            let mut ours: libc::sigaction = std::mem::zeroed();
            ours.sa_sigaction = on_fatal as *const () as usize;
            ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut ours.sa_mask);
            libc::sigaction(*signo, &ours, ptr::null_mut());
        }
    }
}

extern "C" fn on_fatal(signo: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let target = TARGET.load(Ordering::Acquire);
    if !target.is_null() {
        // SAFETY: TARGET points into a mapping that is never unmapped.
        unsafe { (*target).store(signo as u32, Ordering::Relaxed) };
    }
    let previous = PREVIOUS
        .get()
        .and_then(|p| p.iter().find(|(s, _)| *s == signo));
    // SAFETY: sigaction and raise are async-signal-safe; `info` is the kernel's.
    unsafe {
        match previous {
            Some((_, old)) => libc::sigaction(signo, old, ptr::null_mut()),
            None => libc::signal(signo, libc::SIG_DFL) as libc::c_int,
        };
        // Sent or raised rather than a fault: the fault would not happen again by itself.
        if info.is_null() || (*info).si_code <= 0 {
            libc::raise(signo);
        }
    }
}

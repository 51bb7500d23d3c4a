//! `epoll_wait` with a timeout in nanoseconds, for the asyncio thread's selector (support.py's
//! `new_loop`): Python's own epoll takes whole milliseconds and rounds up, so asyncio timers
//! fired up to 1 ms late.

use std::io;
use std::os::raw::c_int;

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

/// Most events taken per wait, whatever the number of registered fds.
const MAX_EVENTS: usize = 4096;

/// Waits on epoll instance `epfd` for at most `timeout` seconds (`None`: no limit, `0`: just
/// look) and returns up to `max_events` `(fd, events)` pairs, with the GIL released meanwhile.
/// An interrupted wait returns no event, as the stdlib's selector does. Raises `OSError`
/// (ENOSYS) on a kernel without epoll_pwait2 (before Linux 5.11).
#[pyfunction]
#[pyo3(signature = (epfd, timeout, max_events))]
pub(crate) fn epoll_wait_ns(
    py: Python<'_>,
    epfd: c_int,
    timeout: Option<f64>,
    max_events: usize,
) -> PyResult<Vec<(c_int, u32)>> {
    // Ready fds beyond `max` are reported by the next wait (epoll is level-triggered here).
    let max = max_events.clamp(1, MAX_EVENTS);
    let timeout = match timeout {
        None => None,
        Some(t) if t.is_nan() => {
            return Err(PyOSError::new_err("epoll timeout is NaN"));
        }
        Some(t) => Some(timespec(t)),
    };
    let mut events: Vec<libc::epoll_event> = Vec::with_capacity(max);
    let n = py.detach(|| {
        let ts = timeout
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `events` has room for `max` entries; the timespec outlives the call; a null
        // sigmask leaves the signal mask alone (sigsetsize is then ignored).
        let n = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                epfd,
                events.as_mut_ptr(),
                max as c_int,
                ts,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    });
    let n = match n {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
        Err(e) => return Err(e.into()),
    };
    // SAFETY: the kernel wrote `n` (at most `max`) entries.
    unsafe { events.set_len(n) };
    Ok(events
        .iter()
        .map(|e| {
            // Python's epoll registers each fd as `data.fd`, the union's first 4 bytes.
            let data = e.u64.to_ne_bytes();
            let fd = c_int::from_ne_bytes([data[0], data[1], data[2], data[3]]);
            (fd, e.events)
        })
        .collect())
}

/// `secs` (finite or infinite, negative meaning zero) as a timespec, rounded up to the
/// nanosecond so that a wait never ends before the timer it waits for is due.
fn timespec(secs: f64) -> libc::timespec {
    let secs = secs.max(0.0).min(i32::MAX as f64);
    let whole = secs.trunc();
    let mut nanos = ((secs - whole) * 1e9).ceil() as libc::c_long;
    let mut whole = whole as libc::time_t;
    if nanos >= 1_000_000_000 {
        whole += 1;
        nanos -= 1_000_000_000;
    }
    libc::timespec {
        tv_sec: whole,
        tv_nsec: nanos,
    }
}

#[cfg(test)]
mod tests {
    use super::timespec;

    #[test]
    fn timeouts_round_up_to_the_nanosecond_and_stay_in_range() {
        let t = timespec(0.0123456789);
        assert_eq!((t.tv_sec, t.tv_nsec), (0, 12_345_679));
        let t = timespec(2.5);
        assert_eq!((t.tv_sec, t.tv_nsec), (2, 500_000_000));
        let t = timespec(-1.0);
        assert_eq!((t.tv_sec, t.tv_nsec), (0, 0));
        let t = timespec(f64::INFINITY);
        assert_eq!((t.tv_sec, t.tv_nsec), (i32::MAX as libc::time_t, 0));
        let t = timespec(0.9999999999);
        assert_eq!((t.tv_sec, t.tv_nsec), (1, 0));
    }
}

//! Starting a pool process, and the end of one: telling it to exit, describing how it ended,
//! and reading its memory.

use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Instant;

use tokio::io::BufReader;
use tracing::{debug, warn};

use super::child::{ChildSpec, CHILD_ENV};
use super::wire::{self, FromChild};
use super::{Child, Shared, EXIT_GRACE};

impl Shared {
    /// Starts a child and waits until it has imported the task modules.
    pub(super) async fn spawn_child(&self) -> Result<Child, String> {
        let began = Instant::now();
        let pair = || {
            std::os::unix::net::UnixStream::pair()
                .map_err(|e| format!("cannot create a socket pair: {e}"))
        };
        let (ours, theirs) = pair()?;
        let (control, their_control) = pair()?;
        let (fd, control_fd) = (theirs.as_raw_fd(), their_control.as_raw_fd());
        let spec = ChildSpec {
            fd,
            control_fd,
            python: self.python.clone(),
            apps: self.apps.clone(),
            django: self.django.clone(),
            sys_path: self.sys_path.clone(),
            log_level: self.options.log_level.clone(),
            log_format: self.options.log_format,
        };
        let spec = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
        let parent = std::process::id();
        let mut command = tokio::process::Command::new("/proc/self/exe");
        command
            .env(CHILD_ENV, spec)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Dies with the thread that started it (the pool's thread, which lives as long
                // as the pool)...
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // ...including when the worker died before the line above.
                if libc::getppid() != parent as libc::pid_t {
                    libc::_exit(1);
                }
                // The sockets are the descriptors the child inherits.
                for fd in [fd, control_fd] {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut process = command.spawn().map_err(|e| {
            format!(
                "cannot start {} again as a pool process: {e}",
                "dbtask-worker"
            )
        })?;
        drop(theirs);
        drop(their_control);
        let pid = process.id().unwrap_or_default();
        let tokio_stream = |socket: std::os::unix::net::UnixStream| {
            socket
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(socket))
                .map_err(|e| format!("cannot use the pool process's socket: {e}"))
        };
        let stream = tokio_stream(ours)?;
        let control = tokio_stream(control)?;
        let (reader, writer) = stream.into_split();
        let mut reader = BufReader::new(reader);
        let mut frame = Vec::new();
        let first = wire::read(&mut reader, &mut frame).await;
        match first.map(|more| more.then(|| serde_json::from_slice::<FromChild>(&frame))) {
            Ok(Some(Ok(FromChild::Ready))) => {}
            Ok(Some(Ok(FromChild::Failed(why)))) => {
                let _ = process.wait().await;
                return Err(why);
            }
            _ => {
                let how = process
                    .wait()
                    .await
                    .map_or_else(|e| e.to_string(), describe_exit);
                return Err(format!("it {how} before it was ready"));
            }
        }
        debug!(
            pid,
            start_ms = began.elapsed().as_millis() as u64,
            "pool process started"
        );
        Ok(Child {
            process,
            pid,
            reader,
            writer,
            control,
            tasks: 0,
        })
    }
}

/// Tells an idle child to exit (its socket closes) and reaps it; kills it if it is still
/// there after [`EXIT_GRACE`].
pub(super) async fn stop(child: Child) {
    let Child {
        mut process,
        writer,
        reader,
        control,
        ..
    } = child;
    drop((writer, reader, control));
    if tokio::time::timeout(EXIT_GRACE, process.wait())
        .await
        .is_err()
    {
        warn!(
            pid = process.id(),
            "a pool process did not exit when told to: killing it"
        );
        let _ = process.kill().await;
    }
}

/// "exited with code 1", "was killed by signal 11 (SIGSEGV: a segmentation fault)".
pub(super) fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with code {code}");
    }
    match status.signal() {
        Some(signal) => {
            let name = match signal {
                libc::SIGKILL => " (SIGKILL: the kernel's OOM killer, or kill -9)",
                libc::SIGSEGV => " (SIGSEGV: a segmentation fault)",
                libc::SIGABRT => " (SIGABRT: aborted)",
                libc::SIGBUS => " (SIGBUS: a bus error)",
                libc::SIGFPE => " (SIGFPE: an arithmetic fault)",
                libc::SIGILL => " (SIGILL: an illegal instruction)",
                libc::SIGTERM => " (SIGTERM)",
                _ => "",
            };
            format!("was killed by signal {signal}{name}")
        }
        None => format!("ended ({status})"),
    }
}

/// Resident memory of process `pid`, from `/proc/<pid>/statm`.
pub(super) fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf is always safe to call.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described_for_people() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(1 << 8)),
            "exited with code 1"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(libc::SIGSEGV)),
            "was killed by signal 11 (SIGSEGV: a segmentation fault)"
        );
        assert!(describe_exit(ExitStatus::from_raw(libc::SIGKILL)).contains("OOM"));
    }

    #[test]
    fn this_process_has_a_resident_size() {
        assert!(resident_bytes(std::process::id()).is_some_and(|b| b > 0));
        assert_eq!(resident_bytes(u32::MAX), None);
    }
}

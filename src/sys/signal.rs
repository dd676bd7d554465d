//! The signal self-pipe: handlers installed through signal-hook-registry (so they chain with handlers installed
//! before and after, by the application, the `ctrlc` crate or `tokio::signal`) that write the signal number into
//! a pipe a thread reads.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::{pipe, set_nonblocking};

/// The write end, kept open for the life of the process once installed.
static SIGNAL_PIPE_WRITE: OnceLock<OwnedFd> = OnceLock::new();

/// How many SIGHUPs this process has caught, counted by the handler itself.
static SIGHUPS_CAUGHT: AtomicU64 = AtomicU64::new(0);
/// Whether the counting handler is installed (once per process).
static SIGHUP_WATCHED: OnceLock<io::Result<()>> = OnceLock::new();

/// Installs (once) a handler that counts the SIGHUPs caught, chained with every other handler (ours, the
/// application's, Tokio's): the reload helper's verdict tells a SIGHUP this process has caught but its signal
/// thread or task has not recorded yet (the count is ahead of the records').
pub(crate) fn watch_sighup() -> io::Result<()> {
    let installed = SIGHUP_WATCHED.get_or_init(|| {
        // SAFETY: the action adds to an atomic (async-signal-safe): nothing else.
        unsafe {
            signal_hook_registry::register(libc::SIGHUP, || {
                SIGHUPS_CAUGHT.fetch_add(1, Ordering::AcqRel);
            })
        }
        .map(|_| ())
    });
    match installed {
        Ok(()) => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
    }
}

/// How many SIGHUPs this process has caught since [`watch_sighup`] was installed.
pub(crate) fn sighups_caught() -> u64 {
    SIGHUPS_CAUGHT.load(Ordering::Acquire)
}

/// Whether a SIGHUP sent to this process is pending: sent (`kill`), not yet taken by any of its threads.
/// Read from `/proc/self/status` (`ShdPnd`, the process-wide pending set): `sigpending(2)` would report it
/// only while blocked, and it is not. `false` if the file cannot be read.
pub(crate) fn sighup_pending() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(shared_pending)
        .is_some_and(|set| set & (1 << (libc::SIGHUP - 1)) != 0)
}

/// The `ShdPnd:` mask of a `/proc/<pid>/status` text (bit `n - 1` for signal `n`).
fn shared_pending(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("ShdPnd:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Installs a handler for each of `signals` that writes the signal number as one byte into a self-pipe, and
/// returns the read end. Works whatever threads exist and whatever their signal masks; handlers installed
/// before keep running (they are chained). Once per process.
pub(crate) fn signal_pipe(signals: &[libc::c_int]) -> io::Result<OwnedFd> {
    let (read_end, write_end) = pipe()?;
    set_nonblocking(write_end.as_fd(), true)?;
    if SIGNAL_PIPE_WRITE.set(write_end).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "signal handling is already installed in this process",
        ));
    }
    let write_raw = SIGNAL_PIPE_WRITE
        .get()
        .map(|fd| fd.as_raw_fd())
        .ok_or_else(|| io::Error::other("the signal pipe vanished"))?;
    for &sig in signals {
        let byte = sig as u8;
        // SAFETY: the action only makes a raw write(2) system call through rustix (async-signal-safe; rustix's
        // raw-syscall backend does not touch errno), on a descriptor that stays open for the life of the
        // process (it lives in a static and is never closed).
        let registered = unsafe {
            signal_hook_registry::register(sig, move || {
                // A full pipe drops the byte: the reader is already behind on signals of this kind, and
                // upgrades coalesce anyway.
                let _ = rustix::io::write(BorrowedFd::borrow_raw(write_raw), &[byte]);
            })
        };
        registered?;
    }
    Ok(read_end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_sighup_is_counted() {
        watch_sighup().unwrap();
        watch_sighup().unwrap(); // once per process; again is harmless
        let before = sighups_caught();
        // SAFETY: raise only sends a signal to this thread; the handler above replaces the default action.
        assert_eq!(unsafe { libc::raise(libc::SIGHUP) }, 0);
        // raise returns after the handler ran (a signal sent to the calling thread is delivered before it
        // returns).
        assert_eq!(sighups_caught(), before + 1);
        assert!(!sighup_pending());
    }

    #[test]
    fn the_shared_pending_mask_is_read_from_the_status_text() {
        let status = "Name:\tx\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000001\nSigBlk:\t0\n";
        assert_eq!(shared_pending(status), Some(1));
        assert_eq!(shared_pending("Name:\tx\n"), None);
        assert_eq!(shared_pending("ShdPnd:\tzz\n"), None);
        // This process's own status has the line.
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(shared_pending(&own).is_some(), "{own}");
    }
}

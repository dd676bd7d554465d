//! The signal self-pipe: handlers installed through signal-hook-registry (so they chain with handlers installed
//! before and after, by the application, the `ctrlc` crate or `tokio::signal`) that write the signal number into
//! a pipe a thread reads.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;

use super::{pipe, set_nonblocking};

/// The write end, kept open for the life of the process once installed.
static SIGNAL_PIPE_WRITE: OnceLock<OwnedFd> = OnceLock::new();

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

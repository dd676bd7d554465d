//! Descriptors: adopting inherited ones, close-on-exec and non-blocking flags, pipes, reads, and `poll`.

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use rustix::event::PollFd;
pub(crate) use rustix::event::PollFlags;
use rustix::io::FdFlags;

/// The right to take ownership of the descriptors this process inherited: numbers that the environment
/// (`LISTEN_FDS`, the handover variables) hands to this process for its exclusive use. There is at most one per
/// process ([`claim`](Self::claim)), and it adopts each number once, so no descriptor gets two owners through
/// it: what would otherwise be a precondition on a safe function is this type's invariant.
#[derive(Debug)]
pub(crate) struct Inherited {
    adopted: Vec<RawFd>,
}

/// Whether the one [`Inherited`] of this process exists.
static CLAIMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Inherited {
    /// The process's one right to adopt; `None` once it has been claimed.
    pub(crate) fn claim() -> Option<Inherited> {
        (!CLAIMED.swap(true, std::sync::atomic::Ordering::SeqCst)).then(|| Inherited {
            adopted: Vec::new(),
        })
    }

    /// For unit tests, which adopt numbers they own themselves.
    #[cfg(test)]
    pub(crate) fn for_test() -> Inherited {
        Inherited {
            adopted: Vec::new(),
        }
    }

    /// Takes ownership of inherited descriptor `raw`, after checking that it is open. Never 0 to 2 (standard
    /// streams are not handed over) and never the same number twice.
    pub(crate) fn adopt(&mut self, raw: RawFd) -> io::Result<OwnedFd> {
        if raw < 3 || self.adopted.contains(&raw) {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        // SAFETY: F_GETFD only queries the descriptor table; an invalid number yields EBADF. No ownership is
        // taken.
        if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.adopted.push(raw);
        // SAFETY: the fd is open (checked above) and owned by nothing else in this process: the environment
        // handed it to this process for its exclusive use, and it is adopted here once (this is the process's
        // only `Inherited`, and it never adopts a number twice).
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }
}

/// Sets or clears close-on-exec.
pub(crate) fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let flags = rustix::io::fcntl_getfd(fd)?;
    let new = if on {
        flags | FdFlags::CLOEXEC
    } else {
        flags - FdFlags::CLOEXEC
    };
    if new != flags {
        rustix::io::fcntl_setfd(fd, new)?;
    }
    Ok(())
}

/// Sets or clears O_NONBLOCK. Note that the flag belongs to the open file description, which is shared with
/// every process holding a copy of the same socket.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    Ok(rustix::io::ioctl_fionbio(fd, on)?)
}

/// A close-on-exec pipe: (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

/// One `read`, retried on EINTR.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    Ok(rustix::io::retry_on_intr(|| {
        rustix::io::read(fd, &mut *buf)
    })?)
}

/// A set of descriptors to wait on with `poll(2)`.
#[derive(Debug, Default)]
pub(crate) struct PollSet<'a> {
    fds: Vec<PollFd<'a>>,
}

impl<'a> PollSet<'a> {
    pub(crate) fn new() -> PollSet<'a> {
        PollSet::default()
    }

    /// Adds `fd` to wait for `events`, returning its index.
    pub(crate) fn add(&mut self, fd: BorrowedFd<'a>, events: PollFlags) -> usize {
        self.fds.push(PollFd::from_borrowed_fd(fd, events));
        self.fds.len() - 1
    }

    /// Adds `fd` to wait until it is readable (or hung up, or in error), returning its index.
    pub(crate) fn readable(&mut self, fd: BorrowedFd<'a>) -> usize {
        self.add(fd, PollFlags::IN)
    }

    /// Waits until any fd is ready or `deadline` passes (`None`: forever). Returns false on timeout.
    pub(crate) fn wait(&mut self, deadline: Option<Instant>) -> io::Result<bool> {
        loop {
            let timeout = deadline.map(|d| {
                let left = d.saturating_duration_since(Instant::now());
                // Round up to the millisecond, so that we never wake before the deadline and spin.
                let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i64;
                rustix::time::Timespec {
                    tv_sec: ms / 1000,
                    tv_nsec: (ms % 1000) * 1_000_000,
                }
            });
            match rustix::event::poll(&mut self.fds, timeout.as_ref()) {
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
                Ok(n) if n > 0 => return Ok(true),
                Ok(_) => {}
            }
            if let Some(d) = deadline {
                if Instant::now() >= d {
                    return Ok(false);
                }
            }
        }
    }

    /// Whether anything fired for the fd at `index` in the last [`wait`](Self::wait) (what was asked for, or a
    /// hang-up or error, which `poll` always reports).
    pub(crate) fn fired(&self, index: usize) -> bool {
        !self.fds[index].revents().is_empty()
    }
}

/// Registers `fd` with the current Tokio reactor for readability.
#[cfg(feature = "tokio")]
pub(crate) fn async_readable(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid, open descriptor that stays open, and always reports the same number,
    // for as long as the AsyncFd owns it, which is the whole contract of register_with_interest.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// A descriptor's file identity, `(st_dev, st_ino)`: what `JOURNAL_STREAM` names.
#[allow(clippy::unnecessary_cast)] // dev_t and ino_t are u64 on Linux x86-64, not on every target
pub(crate) fn file_identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev as u64, st.st_ino as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::time::Duration;

    #[test]
    fn adopt_refuses_closed_negative_standard_and_repeated_fds() {
        let mut inherited = Inherited::for_test();
        assert!(inherited.adopt(-1).is_err());
        assert!(inherited.adopt(1).is_err());
        // A number far above anything open in a test process.
        assert!(inherited.adopt(1_000_000).is_err());
        let (r, _w) = pipe().unwrap();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(r);
        let fd = inherited.adopt(raw).unwrap();
        assert!(inherited.adopt(raw).is_err(), "adopted twice");
        drop(fd);
    }

    #[test]
    fn poll_times_out_then_sees_a_closed_pipe() {
        let (r, w) = pipe().unwrap();
        let mut set = PollSet::new();
        let i = set.readable(r.as_fd());
        let t = Instant::now();
        assert!(!set.wait(Some(t + Duration::from_millis(20))).unwrap());
        assert!(t.elapsed() >= Duration::from_millis(20));
        drop(w);
        assert!(set.wait(None).unwrap());
        assert!(set.fired(i));
        assert_eq!(read(r.as_fd(), &mut [0u8; 4]).unwrap(), 0);
        set_cloexec(r.as_fd(), false).unwrap();
        assert!(!rustix::io::fcntl_getfd(&r)
            .unwrap()
            .contains(FdFlags::CLOEXEC));
        set_nonblocking(r.as_fd(), true).unwrap();
    }
}

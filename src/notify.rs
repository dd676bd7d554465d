//! An sd_notify client: states as typed data whose `Display` is the wire format, one datagram per message,
//! file descriptors attached as SCM_RIGHTS, and the barrier. See sd_notify(3).
//!
//! `NOTIFY_SOCKET` is read, never removed: a process started by an upgrade needs it too, and removing it would
//! mutate the environment of a process that may have threads. Nothing here blocks except the barrier, which is
//! bounded by its timeout.

use std::ffi::OsStr;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::sys::{self, PollFlags, PollSet, UnixTarget};

/// The environment variable systemd sets for services that may notify.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// systemd reads at most this many bytes of one datagram; larger ones are dropped whole.
pub const MAX_MESSAGE_LEN: usize = 4096;

/// One assignment in a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum State<'a> {
    /// `READY=1`: start-up (or a reload) is complete.
    Ready,
    /// `RELOADING=1`: a reload started; with `Type=notify-reload` it must come with [`State::MonotonicUsec`].
    Reloading,
    /// `STOPPING=1`: the service is shutting down.
    Stopping,
    /// `STATUS=`: one line for `systemctl status`.
    Status(&'a str),
    /// `MAINPID=`: the main process is now this pid.
    MainPid(u32),
    /// `MONOTONIC_USEC=`: `CLOCK_MONOTONIC` in µs, read after the reload signal arrived (systemd 253+).
    MonotonicUsec(u64),
    /// `EXTEND_TIMEOUT_USEC=`: give the current start, reload or stop this much more time (systemd 236+).
    ExtendTimeoutUsec(u64),
    /// `WATCHDOG=1`: keep-alive ping.
    Watchdog,
    /// `WATCHDOG=trigger`: ask systemd to act as if the watchdog expired.
    WatchdogTrigger,
    /// `WATCHDOG_USEC=`: change the watchdog interval.
    WatchdogUsec(u64),
    /// `ERRNO=`: the errno-style reason of a failure.
    Errno(i32),
    /// `FDSTORE=1`: store the attached descriptors (needs `FileDescriptorStoreMax=`).
    FdStore,
    /// `FDSTOREREMOVE=1`: remove stored descriptors named by [`State::FdName`].
    FdStoreRemove,
    /// `FDNAME=`: the name of the attached or removed descriptors.
    FdName(&'a str),
    /// `FDPOLL=0`: do not watch the stored descriptors for errors.
    FdPollDisabled,
}

impl fmt::Display for State<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::Ready => f.write_str("READY=1"),
            State::Reloading => f.write_str("RELOADING=1"),
            State::Stopping => f.write_str("STOPPING=1"),
            State::Status(s) => write!(f, "STATUS={s}"),
            State::MainPid(p) => write!(f, "MAINPID={p}"),
            State::MonotonicUsec(u) => write!(f, "MONOTONIC_USEC={u}"),
            State::ExtendTimeoutUsec(u) => write!(f, "EXTEND_TIMEOUT_USEC={u}"),
            State::Watchdog => f.write_str("WATCHDOG=1"),
            State::WatchdogTrigger => f.write_str("WATCHDOG=trigger"),
            State::WatchdogUsec(u) => write!(f, "WATCHDOG_USEC={u}"),
            State::Errno(e) => write!(f, "ERRNO={e}"),
            State::FdStore => f.write_str("FDSTORE=1"),
            State::FdStoreRemove => f.write_str("FDSTOREREMOVE=1"),
            State::FdName(n) => write!(f, "FDNAME={n}"),
            State::FdPollDisabled => f.write_str("FDPOLL=0"),
        }
    }
}

impl State<'_> {
    fn validate(&self) -> Result<()> {
        match self {
            State::Status(s) if s.contains('\n') => Err(Error::new(
                ErrorKind::InvalidNotification,
                "sd_notify STATUS= must be a single line",
            )),
            // systemd reads the datagram as a C string: whatever follows a NUL (MAINPID=, READY=1) is lost.
            State::Status(s) if s.contains('\0') => Err(Error::new(
                ErrorKind::InvalidNotification,
                "sd_notify STATUS= must not contain a NUL byte (systemd would ignore the rest of the message)",
            )),
            State::FdName(n) if !crate::activation::name_is_valid(n) => Err(Error::new(
                ErrorKind::InvalidName,
                format!("sd_notify FDNAME={n:?} is invalid: 1 to 255 printable ASCII characters without ':'"),
            )),
            _ => Ok(()),
        }
    }
}

/// The wire form of `states`: one `KEY=VALUE` per line, checked against systemd's datagram limit.
pub(crate) fn encode(states: &[State<'_>]) -> Result<String> {
    let mut out = String::new();
    for s in states {
        s.validate()?;
        out.push_str(&s.to_string());
        out.push('\n');
    }
    if out.len() > MAX_MESSAGE_LEN {
        return Err(Error::new(
            ErrorKind::InvalidNotification,
            format!(
                "sd_notify message of {} bytes exceeds systemd's {MAX_MESSAGE_LEN}-byte limit (it would be dropped); \
                 shorten STATUS=",
                out.len()
            ),
        ));
    }
    Ok(out)
}

/// A connection to the service manager's notification socket.
///
/// ```no_run
/// use exuvia::notify::{Notifier, State};
/// if let Some(n) = Notifier::from_env()? {
///     n.notify(&[State::Ready, State::Status("serving")])?;
///     n.barrier(std::time::Duration::from_secs(5))?; // systemd has processed READY=1
/// }
/// # Ok::<(), exuvia::Error>(())
/// ```
#[derive(Debug)]
pub struct Notifier {
    socket: OwnedFd,
    target: UnixTarget,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` names, or `None` when it is unset (not running under systemd, or in a unit
    /// type that does not notify).
    ///
    /// # Errors
    /// [`ErrorKind::Environment`] when the variable is set but unusable.
    pub fn from_env() -> Result<Option<Notifier>> {
        match std::env::var_os(NOTIFY_SOCKET) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => Notifier::new(&v).map(Some),
        }
    }

    /// A notifier for an address in `NOTIFY_SOCKET` syntax: `/path` or `@abstract-name`.
    ///
    /// # Errors
    /// [`ErrorKind::Environment`] for other forms (`vsock:` is not supported) or if no socket can be made.
    pub fn new(addr: &OsStr) -> Result<Notifier> {
        let bytes = addr.as_bytes();
        let target = match bytes.first() {
            Some(b'/') => UnixTarget::Path(PathBuf::from(addr)),
            Some(b'@') if bytes.len() > 1 => UnixTarget::Abstract(bytes[1..].to_vec()),
            _ if bytes.starts_with(b"vsock:") => {
                return Err(Error::env(format!(
                    "{NOTIFY_SOCKET}={addr:?}: vsock notification sockets are not supported"
                )))
            }
            _ => {
                return Err(Error::env(format!(
                    "{NOTIFY_SOCKET}={addr:?} is neither an absolute path nor an @abstract name"
                )))
            }
        };
        let socket = std::os::unix::net::UnixDatagram::unbound()
            .map(OwnedFd::from)
            .map_err(|e| Error::io("cannot create the notification socket", e))?;
        Ok(Notifier { socket, target })
    }

    /// Sends `states` as one datagram.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidNotification`] for a multi-line STATUS or a message over 4096 bytes,
    /// [`ErrorKind::InvalidName`] for a bad FDNAME;
    /// [`ErrorKind::Systemd`] if the service manager's socket cannot be reached.
    pub fn notify(&self, states: &[State<'_>]) -> Result<()> {
        self.notify_with_fds(states, &[])
    }

    /// Sends `states` as one datagram with `fds` attached (for `FDSTORE=1`).
    pub fn notify_with_fds(&self, states: &[State<'_>], fds: &[BorrowedFd<'_>]) -> Result<()> {
        let msg = encode(states)?;
        sys::send_unix_datagram(self.socket.as_fd(), &self.target, msg.as_bytes(), fds).map_err(
            |e| {
                Error::with_io(
                    ErrorKind::Systemd,
                    format!(
                        "cannot notify the service manager ({})",
                        msg.trim_end().replace('\n', " ")
                    ),
                    e,
                )
            },
        )?;
        tracing::debug!(message = %msg.trim_end().replace('\n', " "), "sd_notify");
        Ok(())
    }

    /// Waits until the service manager has processed every notification sent before this call: sends
    /// `BARRIER=1` with the write end of a fresh pipe, closes our copy, and waits for the manager to close its
    /// copy (POLLHUP on the read end).
    ///
    /// # Errors
    /// [`ErrorKind::Systemd`] if the manager has not answered within `timeout`.
    pub fn barrier(&self, timeout: Duration) -> Result<()> {
        let (read_end, write_end) =
            sys::pipe().map_err(|e| Error::io("cannot create the barrier pipe", e))?;
        let msg = b"BARRIER=1\n";
        sys::send_unix_datagram(self.socket.as_fd(), &self.target, msg, &[write_end.as_fd()])
            .map_err(|e| {
                Error::with_io(
                    ErrorKind::Systemd,
                    "cannot send BARRIER=1 to the service manager",
                    e,
                )
            })?;
        drop(write_end);
        let deadline = Instant::now() + timeout;
        let mut set = PollSet::new();
        set.add(read_end.as_fd(), PollFlags::empty()); // POLLHUP is always reported
        let done = set
            .wait(Some(deadline))
            .map_err(|e| Error::io("barrier poll failed", e))?;
        if !done {
            return Err(Error::new(
                ErrorKind::Systemd,
                format!(
                    "the service manager did not acknowledge BARRIER=1 within {}",
                    crate::error::human_duration(timeout)
                ),
            ));
        }
        Ok(())
    }
}

/// `CLOCK_MONOTONIC` now, in µs: the value for [`State::MonotonicUsec`].
pub fn monotonic_usec() -> u64 {
    sys::monotonic_usec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn states_print_as_the_wire_format() {
        let all = [
            State::Ready,
            State::Reloading,
            State::Stopping,
            State::Status("upgrading: child 42 starting"),
            State::MainPid(42),
            State::MonotonicUsec(123),
            State::ExtendTimeoutUsec(5_000_000),
            State::Watchdog,
            State::WatchdogTrigger,
            State::WatchdogUsec(2_000_000),
            State::Errno(5),
            State::FdStore,
            State::FdStoreRemove,
            State::FdName("http"),
            State::FdPollDisabled,
        ];
        assert_eq!(
            encode(&all).unwrap(),
            "READY=1\nRELOADING=1\nSTOPPING=1\nSTATUS=upgrading: child 42 starting\nMAINPID=42\n\
             MONOTONIC_USEC=123\nEXTEND_TIMEOUT_USEC=5000000\nWATCHDOG=1\nWATCHDOG=trigger\n\
             WATCHDOG_USEC=2000000\nERRNO=5\nFDSTORE=1\nFDSTOREREMOVE=1\nFDNAME=http\nFDPOLL=0\n"
        );
    }

    #[test]
    fn bad_states_are_refused_before_sending() {
        assert_eq!(
            encode(&[State::Status("two\nlines")]).unwrap_err().kind(),
            ErrorKind::InvalidNotification
        );
        assert_eq!(
            encode(&[State::FdName("a:b")]).unwrap_err().kind(),
            ErrorKind::InvalidName
        );
        let long = "x".repeat(MAX_MESSAGE_LEN);
        let e = encode(&[State::Status(&long)]).unwrap_err();
        assert!(e.to_string().contains("4096-byte limit"), "{e}");
        assert_eq!(e.kind(), ErrorKind::InvalidNotification);
    }

    #[test]
    fn addresses_are_parsed_like_systemd() {
        assert!(Notifier::new(OsStr::new("/run/systemd/notify")).is_ok());
        assert!(Notifier::new(OsStr::new("@abstract")).is_ok());
        for bad in ["", "@", "relative/path", "vsock:2:1234"] {
            let e = Notifier::new(OsStr::new(bad)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Environment, "{bad}");
        }
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 8192];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn one_datagram_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.as_os_str()).unwrap();
        n.notify(&[State::MainPid(7), State::Ready, State::Status("serving")])
            .unwrap();
        assert_eq!(recv(&sock), "MAINPID=7\nREADY=1\nSTATUS=serving\n");
    }

    #[test]
    fn abstract_names_work() {
        let name = format!(
            "exuvia-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        let sock = UnixDatagram::unbound().unwrap();
        // Bind the receiver through the same address code the sender uses.
        let target = UnixTarget::Abstract(name.as_bytes().to_vec());
        rustix::net::bind(&sock, &target.address().unwrap()).unwrap();
        let n = Notifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        n.notify(&[State::Watchdog]).unwrap();
        assert_eq!(recv(&sock), "WATCHDOG=1\n");
    }

    /// Receives one datagram and the fds attached to it.
    fn recv_with_fds(sock: &UnixDatagram) -> (String, Vec<OwnedFd>) {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        let mut buf = [0u8; 4096];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            sock,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .unwrap();
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = message {
                fds.extend(rights);
            }
        }
        (String::from_utf8_lossy(&buf[..got.bytes]).to_string(), fds)
    }

    #[test]
    fn fds_travel_with_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.as_os_str()).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        n.notify_with_fds(&[State::FdStore, State::FdName("http")], &[l.as_fd()])
            .unwrap();
        let (msg, fds) = recv_with_fds(&sock);
        assert_eq!(msg, "FDSTORE=1\nFDNAME=http\n");
        assert_eq!(fds.len(), 1);
        let got = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(got.local_addr().unwrap(), l.local_addr().unwrap());
    }

    #[test]
    fn barrier_waits_for_the_manager_to_close_its_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.as_os_str()).unwrap();
        // A manager that processes the message and closes the fd: the barrier returns.
        let manager = std::thread::spawn(move || {
            let (msg, fds) = recv_with_fds(&sock);
            drop(fds);
            (msg, sock)
        });
        n.barrier(Duration::from_secs(5)).unwrap();
        let (msg, sock) = manager.join().unwrap();
        assert_eq!(msg, "BARRIER=1\n");
        // A manager that keeps the fd: the barrier times out with a clear error.
        let t0 = Instant::now();
        let keeper = std::thread::spawn(move || recv_with_fds(&sock));
        let e = n.barrier(Duration::from_millis(200)).unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(200));
        assert!(
            e.to_string().contains("did not acknowledge BARRIER=1"),
            "{e}"
        );
        drop(keeper.join().unwrap());
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_usec();
        let b = monotonic_usec();
        assert!(a > 0 && b >= a);
    }
}

#[cfg(test)]
mod random_inputs {
    use super::*;

    #[test]
    fn random_texts_encode_to_one_line_each_or_are_refused() {
        let mut rng = crate::fuzz::Rng::new(3);
        let pieces = ["serving", "\n", "\r", "=", "\u{0}", "é", " ", "STATUS", "x"];
        for _ in 0..crate::fuzz::iterations(50_000) {
            let status = rng.text(&pieces, 200);
            let name = rng.text(&pieces, 40);
            let states = [
                State::Ready,
                State::Status(&status),
                State::FdName(&name),
                State::MainPid(rng.next() as u32),
            ];
            if let Ok(wire) = encode(&states) {
                assert!(wire.len() <= MAX_MESSAGE_LEN);
                // One assignment per line, whatever the texts held.
                assert_eq!(wire.lines().count(), states.len(), "{wire:?}");
                assert!(!wire.contains('\0'), "{wire:?}");
            }
        }
    }
}

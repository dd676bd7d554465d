//! The crate's one error type.
//!
//! Every failure a user can meet is an [`Error`] with a [`kind`](Error::kind) to match on and a message that
//! says what went wrong and, where there is something to do, what to do. Nothing in this crate ends the
//! process on an error: a failed upgrade leaves the running process serving.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A listener name is empty, too long, or holds a character that `LISTEN_FDNAMES` cannot carry.
    InvalidName,
    /// An inherited socket exists under the requested name but is of another kind (for example a UDP socket
    /// asked for as a TCP listener). The socket stays in place for a later, correct take.
    WrongSocketKind,
    /// The name was already taken in this process.
    AlreadyTaken,
    /// A fresh bind or listen failed (address in use, permission, path problems).
    Bind,
    /// Variables in the environment (`LISTEN_FDS`, `LISTEN_FDNAMES`, the handover variables) are malformed or
    /// name file descriptors that are not what they claim to be.
    Environment,
    /// The handover channel carried bytes that are not a valid message: bad magic, an unsupported version, an
    /// oversized or truncated frame.
    Protocol,
    /// The peer on the handover channel went away or stopped answering within its deadline.
    Channel,
    /// An upgrade is already in flight; only one runs at a time.
    UpgradeInProgress,
    /// This process has already handed over (or is stopping), so it cannot upgrade again.
    Finishing,
    /// This process has not reported ready yet ([`Upgrader::ready`](crate::Upgrader::ready)), so it cannot
    /// upgrade: a process must serve before it can hand over. Retry once it is ready.
    NotReady,
    /// Something that exists once per process is already installed (signal handling).
    AlreadyInstalled,
    /// The service manager could not be told (an sd_notify datagram could not be sent, or the barrier was not
    /// answered in time).
    Systemd,
    /// The control socket could not be reached, or the service behind it did not answer in time.
    ControlSocket,
    /// The new binary could not be started (fork failed, or exec failed: missing file, no permission).
    Spawn,
    /// The new process exited or was killed by a signal before it reported ready.
    ChildExited,
    /// The new process reported that its initialisation failed.
    ChildFailed,
    /// The new process died within its probation window (see
    /// [`Builder::probation`](crate::Builder::probation)); this process took the service back and serves on.
    RolledBack,
    /// The new process did not report ready before the deadline and was killed.
    ReadyTimeout,
    /// The application state to hand over is larger than the protocol allows.
    StateTooLarge,
    /// An sd_notify message systemd would reject or drop: a multi-line `STATUS=`, more than 4096 bytes.
    InvalidNotification,
    /// The running process refused this process's takeover ([`Builder::take_over`](crate::Builder::take_over)):
    /// another user, an upgrade or takeover already in flight, a process that is stopping. It serves on; the
    /// message gives its reason.
    TakeoverRefused,
    /// Any other operating-system error.
    Io,
}

/// An error from exuvia. See [`ErrorKind`] for the cases and `Display` for a message fit for an operator.
///
/// The message is whole: when an operating-system error is behind it, its text ends the message
/// (`cannot create the handover channel (socketpair): Too many open files`). So that error reporters that
/// walk [`source`](std::error::Error::source) chains do not print it twice, `source()` is `None`; the OS error
/// itself is [`io_error`](Error::io_error).
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<io::Error>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// `message` followed by the OS error's text.
    pub(crate) fn with_io(kind: ErrorKind, message: impl Into<String>, source: io::Error) -> Error {
        let message = format!("{}: {}", message.into(), strip_os_code(&source));
        Error {
            kind,
            message,
            source: Some(source),
        }
    }

    pub(crate) fn io(message: impl Into<String>, source: io::Error) -> Error {
        Error::with_io(ErrorKind::Io, message, source)
    }

    pub(crate) fn env(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Environment, message)
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Protocol, message)
    }

    pub(crate) fn exec(path: &std::path::Path, source: io::Error) -> Error {
        let path = PathBuf::from(path);
        Error::with_io(
            ErrorKind::Spawn,
            format!("cannot execute {}", path.display()),
            source,
        )
    }

    pub(crate) fn child_exited(status: ExitStatus) -> Error {
        use std::os::unix::process::ExitStatusExt;
        let what = match (status.code(), status.signal()) {
            (Some(code), _) => format!("child exited with status {code} during initialisation"),
            (None, Some(sig)) => format!(
                "child was killed by signal {} during initialisation",
                signal_name(sig)
            ),
            _ => format!("child ended ({status}) during initialisation"),
        };
        Error::new(ErrorKind::ChildExited, what)
    }

    pub(crate) fn ready_timeout(timeout: Duration) -> Error {
        Error::new(
            ErrorKind::ReadyTimeout,
            format!(
                "child not ready after {}; killed (raise the ready timeout if its initialisation is legitimately slow)",
                human_duration(timeout)
            ),
        )
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The operating-system error behind this one, if there is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        self.source.as_ref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// `source()` is `None`: the OS error's text is already in the message (see [`Error`]).
impl std::error::Error for Error {}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match e.kind {
            ErrorKind::InvalidName | ErrorKind::StateTooLarge | ErrorKind::InvalidNotification => {
                io::ErrorKind::InvalidInput
            }
            ErrorKind::WrongSocketKind | ErrorKind::Environment | ErrorKind::Protocol => {
                io::ErrorKind::InvalidData
            }
            ErrorKind::AlreadyTaken => io::ErrorKind::AlreadyExists,
            ErrorKind::UpgradeInProgress | ErrorKind::Finishing => io::ErrorKind::WouldBlock,
            ErrorKind::ReadyTimeout => io::ErrorKind::TimedOut,
            ErrorKind::Channel => io::ErrorKind::BrokenPipe,
            _ => match &e.source {
                Some(s) => s.kind(),
                None => io::ErrorKind::Other,
            },
        };
        io::Error::new(kind, e)
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `No such file or directory (os error 2)` reads better without the number in an operator's message.
fn strip_os_code(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

pub(crate) fn human_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// How a process ended, for messages: "exited with status 3", "was killed by signal SIGSEGV".
pub(crate) fn exit_description(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {}", signal_name(sig)),
        _ => format!("ended ({status})"),
    }
}

pub(crate) fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => return sig.to_string(),
    };
    format!("{sig} ({name})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn messages_read_as_the_operator_needs() {
        let e = Error::child_exited(ExitStatus::from_raw(3 << 8));
        assert_eq!(
            e.to_string(),
            "child exited with status 3 during initialisation"
        );
        assert_eq!(e.kind(), ErrorKind::ChildExited);
        let e = Error::child_exited(ExitStatus::from_raw(libc::SIGKILL));
        assert_eq!(
            e.to_string(),
            "child was killed by signal 9 (SIGKILL) during initialisation"
        );
        let e = Error::ready_timeout(Duration::from_secs(30));
        assert!(e
            .to_string()
            .starts_with("child not ready after 30 s; killed"));
        let e = Error::exec(
            std::path::Path::new("/usr/bin/app"),
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(
            e.to_string(),
            "cannot execute /usr/bin/app: No such file or directory"
        );
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn error_is_send_sync_static() {
        fn check<T: Send + Sync + 'static + std::error::Error>() {}
        check::<Error>();
    }
}

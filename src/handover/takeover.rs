//! Takeover: a process started by someone else (a second systemd unit, a supervisor, an operator, another
//! container) asks the running one, over its control socket, for the service. From there on it is the same
//! handover as an upgrade's: the channel, `Hello`, `Ready`, `Commit`, the probation window, moving connections.
//! Only the start differs: instead of `clone` + `execve` with the sockets at fds 3.., the old process sends the
//! sockets, the channel's far end and the connection channel's far end over the control connection.
//!
//! ```text
//! new process (taker)                               old process (serving)
//! build(): connect(control socket) ------------->   accept; SO_PEERCRED: uid = ours or root
//! "exuvia-ctl/1 takeover <own pid>\n" ---------->   lifecycle: BeginUpgrade (one upgrade or takeover at a time)
//!                                                   SO_PEERPIDFD (or pidfd_open(peer pid)); socketpair x2
//!      <----- one sendmsg: "ok takeover sockets=a:b probation_ms=0\n"
//!             + SCM_RIGHTS [channel, connection channel, a, b]
//!      <----- Hello on the channel; then as an upgrade: Ready -> Commit (or Failed, timeout, exit)
//! ```
//!
//! A refusal (another upgrade in flight, another user, a process that is finishing) is an `error ...` line
//! with no descriptors. The peer's pid comes from the kernel (`SO_PEERCRED`); the one in the request stands in
//! only for a taker in another PID namespace (the kernel then shows 0), in logs and reports. The old process
//! watches it through a pidfd (it is not its child: no exit status, no process group); one in another PID
//! namespace cannot be signalled: it is told on the channel, and its own watch ends it.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::channel::Channel;
use super::parent::{Hold, PendingChild};
use super::protocol::Message;
use crate::control::{Command, Reply, PROTOCOL};
use crate::error::{Error, ErrorKind, Result};
use crate::sys::{self, PollSet};

/// The first word of the old process's answer after `ok`: the sockets follow as `sockets=<names, ':'-joined>`,
/// then `probation_ms=<the window the old process will watch the taker through, 0 for none>`.
const ANSWER: &str = "takeover";
/// At most this many descriptors travel in one `SCM_RIGHTS` message (the kernel's `SCM_MAX_FD`); two of them
/// are the channels.
const MAX_FDS: usize = 253;
/// How long the new process waits for the old one's answer (the old process answers at once; this bounds a
/// wedged one).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest answer line read.
const MAX_ANSWER: usize = 64 * 1024;

/// What the old process says of a taker that is not allowed: another user (root may).
pub(crate) fn refuse_peer(peer: &sys::Peer) -> Option<String> {
    if peer.uid != 0 && peer.uid != sys::euid() {
        return Some(format!(
            "permission denied: a takeover must come from the service's own user (uid {}) or root, not uid {}",
            sys::euid(),
            peer.uid
        ));
    }
    None
}

/// The process asking for the service, as this process can know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Taker {
    /// Its pid as the kernel shows it here, or, for a process in another PID namespace (the kernel shows 0),
    /// the pid it gave for itself in its request: its own namespace's number, for the logs and reports only.
    pub(crate) pid: u32,
    /// Whether `pid` is this namespace's (signals reach it).
    pub(crate) visible: bool,
}

impl Taker {
    /// From the kernel's peer credentials, and the pid the request claims (used only when the kernel's is
    /// not visible here).
    pub(crate) fn new(peer: &sys::Peer, claimed: u32) -> Taker {
        match peer.pid {
            Some(pid) => Taker { pid, visible: true },
            None => Taker {
                pid: claimed,
                visible: false,
            },
        }
    }

    /// This process's hold on it: `SO_PEERPIDFD` (which names it across namespaces), else `pidfd_open` of a
    /// visible pid; a taker in another PID namespace on a kernel before 6.5 is watched through its channel.
    fn hold(&self, conn: &UnixStream) -> Result<Hold> {
        let pidfd = match sys::peer_pidfd(conn.as_fd()) {
            Ok(fd) => Some(fd),
            Err(_) if self.visible => Some(sys::pidfd_open(self.pid).map_err(|e| {
                Error::io(
                    format!("cannot watch the taking process (pid {})", self.pid),
                    e,
                )
            })?),
            Err(_) => None,
        };
        Ok(Hold {
            pidfd,
            signals: self.visible,
        })
    }
}

/// Old side: hands the sockets and both channels' far ends to the taker at the other end of `conn` (pid
/// `pid`, checked by the caller), then greets it with `hello`. From here on it is an upgrade's pending child.
pub(crate) fn offer(
    conn: &UnixStream,
    taker: Taker,
    sockets: &[(&str, BorrowedFd<'_>)],
    probation: Duration,
    hello: &Message,
    deadline: Instant,
) -> Result<PendingChild> {
    if sockets.len() + 2 > MAX_FDS {
        return Err(Error::new(
            ErrorKind::Spawn,
            format!(
                "{} sockets cannot be handed over in one message (at most {})",
                sockets.len(),
                MAX_FDS - 2
            ),
        ));
    }
    let pid = taker.pid;
    // First: from here the pidfd names this process whatever happens to the pid.
    let hold = taker.hold(conn)?;
    let (ours, theirs) = UnixStream::pair()
        .map_err(|e| Error::io("cannot create the handover channel (socketpair)", e))?;
    let (moves, moves_theirs) = sys::packet_pair()
        .map_err(|e| Error::io("cannot create the connection channel (socketpair)", e))?;
    let names: Vec<&str> = sockets.iter().map(|(n, _)| *n).collect();
    let mut fds: Vec<BorrowedFd<'_>> = vec![theirs.as_fd(), moves_theirs.as_fd()];
    fds.extend(sockets.iter().map(|(_, fd)| *fd));
    let line = format!(
        "{}\n",
        Reply::Ok(format!(
            "{ANSWER} sockets={} probation_ms={}",
            names.join(":"),
            probation.as_millis()
        ))
    );
    conn.set_write_timeout(Some(Duration::from_secs(2)))
        .and_then(|()| conn.set_nonblocking(false))
        .and_then(|()| sys::send_stream_with_fds(conn.as_fd(), line.as_bytes(), &fds))
        .map_err(|e| {
            Error::with_io(
                ErrorKind::Channel,
                format!("cannot send the sockets to the taking process (pid {pid})"),
                e,
            )
        })?;
    drop((theirs, moves_theirs));
    tracing::info!(
        taker_pid = pid,
        same_pid_namespace = taker.visible,
        watched_by_pidfd = hold.pidfd.is_some(),
        sockets = names.len(),
        "takeover: sockets sent to the taking process"
    );
    for name in &names {
        tracing::debug!(taker_pid = pid, name, "takeover: passing socket");
    }
    let channel = Channel::new(ours)?;
    let mut child = PendingChild::taker(pid, hold, channel, moves);
    child.greet(hello, deadline)?;
    Ok(child)
}

/// What a taker received from the old process.
#[derive(Debug)]
pub(crate) struct Received {
    /// The sockets, by name, in the old process's order.
    pub(crate) sockets: Vec<(String, OwnedFd)>,
    /// Its end of the handover channel.
    pub(crate) channel: OwnedFd,
    /// Its end of the connection channel.
    pub(crate) moves: OwnedFd,
    /// The probation window the old process watches it through.
    pub(crate) probation: Option<Duration>,
}

/// New side: asks the process serving the control socket at `path` for the service. `Ok(None)`: nobody serves
/// there (no socket file, or nothing listening on it): this process starts fresh.
pub(crate) fn request(path: &Path) -> Result<Option<Received>> {
    let conn = match UnixStream::connect(path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            tracing::info!(path = %path.display(), "takeover: nothing serves this control socket; starting fresh");
            return Ok(None);
        }
        Err(e) => {
            return Err(Error::with_io(
                ErrorKind::ControlSocket,
                format!(
                "takeover: cannot connect to the control socket {} (it must be reachable by this \
                     process: same user or root, and a shared directory)",
                path.display()
            ),
                e,
            ))
        }
    };
    let cant = |e| {
        Error::with_io(
            ErrorKind::ControlSocket,
            format!("takeover: cannot ask {} for the service", path.display()),
            e,
        )
    };
    (&conn)
        .write_all(
            format!(
                "{PROTOCOL} {}\n",
                Command::Takeover {
                    pid: std::process::id()
                }
            )
            .as_bytes(),
        )
        .map_err(cant)?;
    conn.set_nonblocking(true).map_err(cant)?;
    let (line, mut fds) = read_answer(&conn, Instant::now() + ANSWER_TIMEOUT)?;
    let reply = Reply::parse(&line)?;
    let text = match reply {
        Reply::Ok(text) => text,
        refused => {
            return Err(Error::new(
                ErrorKind::TakeoverRefused,
                format!(
                    "takeover refused by the process serving {}: {}",
                    path.display(),
                    refused.text()
                ),
            ))
        }
    };
    let (names, probation) = parse_answer(&text)?;
    if fds.len() != names.len() + 2 {
        return Err(Error::protocol(format!(
            "takeover: the old process named {} sockets but {} descriptors arrived (this process may be out of \
             descriptors: LimitNOFILE=)",
            names.len(),
            fds.len().saturating_sub(2)
        )));
    }
    let sockets: Vec<OwnedFd> = fds.split_off(2);
    let moves = fds.pop().expect("two descriptors checked above");
    let channel = fds.pop().expect("two descriptors checked above");
    for (name, fd) in names.iter().zip(&sockets) {
        if !matches!(sys::socket_info(fd.as_fd()), Ok(Some(_))) {
            return Err(Error::protocol(format!(
                "takeover: the descriptor sent for {name:?} is {}, not a socket",
                crate::listen::describe(fd.as_fd())
            )));
        }
    }
    Ok(Some(Received {
        sockets: names.into_iter().zip(sockets).collect(),
        channel,
        moves,
        probation,
    }))
}

/// Reads the answer line and every descriptor that came with it.
fn read_answer(conn: &UnixStream, deadline: Instant) -> Result<(String, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let got = match sys::recv_packet(conn.as_fd(), &mut buf, MAX_FDS + 1) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut set = PollSet::new();
                set.readable(conn.as_fd());
                let ready = set
                    .wait(Some(deadline))
                    .map_err(|e| Error::io("takeover: poll failed", e))?;
                if !ready {
                    return Err(Error::new(
                        ErrorKind::ControlSocket,
                        "takeover: the running process did not answer within 10 s",
                    ));
                }
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("takeover: cannot read the answer", e)),
        };
        fds.extend(got.fds);
        if got.len == 0 {
            return Err(Error::new(
                ErrorKind::ControlSocket,
                "takeover: the running process closed the connection without answering",
            ));
        }
        line.extend_from_slice(&buf[..got.len]);
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            line.truncate(end);
            let line = String::from_utf8(line)
                .map_err(|_| Error::protocol("takeover: the answer is not UTF-8"))?;
            return Ok((line, fds));
        }
        if line.len() > MAX_ANSWER {
            return Err(Error::protocol("takeover: the answer is too long"));
        }
    }
}

/// The socket names and the probation window of an `ok takeover sockets=... probation_ms=...` answer's text.
fn parse_answer(text: &str) -> Result<(Vec<String>, Option<Duration>)> {
    let unexpected = || {
        Error::protocol(format!(
            "takeover: unexpected answer {text:?} (is the running process built with this version of exuvia?)"
        ))
    };
    let mut words = text.split(' ');
    if words.next() != Some(ANSWER) {
        return Err(unexpected());
    }
    let names = words
        .next()
        .and_then(|w| w.strip_prefix("sockets="))
        .ok_or_else(unexpected)?;
    let probation_ms: u64 = words
        .next()
        .and_then(|w| w.strip_prefix("probation_ms="))
        .and_then(|ms| ms.parse().ok())
        .ok_or_else(unexpected)?;
    if words.next().is_some() {
        return Err(unexpected());
    }
    let probation = (probation_ms > 0).then(|| Duration::from_millis(probation_ms));
    if names.is_empty() {
        return Ok((Vec::new(), probation));
    }
    let names = names
        .split(':')
        .map(|n| {
            if crate::activation::name_is_valid(n) {
                Ok(n.to_string())
            } else {
                Err(Error::protocol(format!(
                    "takeover: the answer names an invalid socket {n:?}"
                )))
            }
        })
        .collect::<Result<_>>()?;
    Ok((names, probation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_or_are_protocol_errors() {
        assert_eq!(
            parse_answer("takeover sockets=http:exuvia-control probation_ms=0").unwrap(),
            (vec!["http".to_string(), "exuvia-control".to_string()], None)
        );
        assert_eq!(
            parse_answer("takeover sockets= probation_ms=1500").unwrap(),
            (Vec::new(), Some(Duration::from_millis(1500)))
        );
        for bad in [
            "",
            "upgraded",
            "takeover",
            "takeover sockets=a::b probation_ms=0",
            "takeover socket=a probation_ms=0",
            "takeover sockets=a",
            "takeover sockets=a probation_ms=x",
            "takeover sockets=a probation_ms=0 more",
        ] {
            assert_eq!(
                parse_answer(bad).unwrap_err().kind(),
                ErrorKind::Protocol,
                "{bad}"
            );
        }
    }

    #[test]
    fn other_users_are_refused_and_invisible_processes_named_by_their_claim() {
        let me = sys::euid();
        let ok = sys::Peer {
            pid: Some(7),
            uid: me,
        };
        assert_eq!(refuse_peer(&ok), None);
        assert_eq!(refuse_peer(&sys::Peer { uid: 0, ..ok }), None);
        assert_eq!(refuse_peer(&sys::Peer { pid: None, ..ok }), None);
        let other = if me == 4242 { 4243 } else { 4242 };
        let e = refuse_peer(&sys::Peer { uid: other, ..ok }).unwrap();
        assert!(e.contains("permission denied"), "{e}");
        // The kernel's pid wins; the claimed one stands in only where the kernel shows none.
        assert_eq!(
            Taker::new(&ok, 1),
            Taker {
                pid: 7,
                visible: true
            }
        );
        assert_eq!(
            Taker::new(&sys::Peer { pid: None, ..ok }, 1),
            Taker {
                pid: 1,
                visible: false
            }
        );
    }
}

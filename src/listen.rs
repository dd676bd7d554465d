//! Socket kinds, their validation, and fresh binds with caller-chosen options.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::sys::{self, SocketInfo};

/// The kinds of socket exuvia hands over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SocketKind {
    /// A listening TCP socket (IPv4 or IPv6).
    TcpListener,
    /// A bound UDP socket (IPv4 or IPv6).
    Udp,
    /// A listening Unix stream socket.
    UnixListener,
    /// A bound Unix datagram socket.
    UnixDatagram,
    /// A listening Unix seqpacket socket.
    UnixSeqpacketListener,
}

impl SocketKind {
    pub(crate) fn matches(self, info: &SocketInfo) -> bool {
        use sys::{AddressFamily as F, SocketType as T};
        let inet = info.domain == F::INET || info.domain == F::INET6;
        let unix = info.domain == F::UNIX;
        match self {
            SocketKind::TcpListener => inet && info.ty == T::STREAM && info.listening,
            SocketKind::Udp => inet && info.ty == T::DGRAM,
            SocketKind::UnixListener => unix && info.ty == T::STREAM && info.listening,
            SocketKind::UnixDatagram => unix && info.ty == T::DGRAM,
            SocketKind::UnixSeqpacketListener => unix && info.ty == T::SEQPACKET && info.listening,
        }
    }
}

impl fmt::Display for SocketKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SocketKind::TcpListener => "a listening TCP socket",
            SocketKind::Udp => "a UDP socket",
            SocketKind::UnixListener => "a listening Unix stream socket",
            SocketKind::UnixDatagram => "a Unix datagram socket",
            SocketKind::UnixSeqpacketListener => "a listening Unix seqpacket socket",
        })
    }
}

/// Describes what a descriptor actually is, for error messages.
pub(crate) fn describe(fd: BorrowedFd<'_>) -> String {
    match sys::socket_info(fd) {
        Err(e) => format!("unreadable ({e})"),
        Ok(None) => "not a socket".to_string(),
        Ok(Some(i)) => {
            use sys::{AddressFamily as F, SocketType as T};
            let domain = match i.domain {
                F::INET => "IPv4",
                F::INET6 => "IPv6",
                F::UNIX => "Unix",
                F::NETLINK => "netlink",
                _ => "other-family",
            };
            let ty = match i.ty {
                T::STREAM => "stream",
                T::DGRAM => "datagram",
                T::SEQPACKET => "seqpacket",
                _ => "other-type",
            };
            let listening = if i.listening { "listening " } else { "" };
            format!("a {listening}{domain} {ty} socket")
        }
    }
}

type Configure = Arc<dyn Fn(BorrowedFd<'_>) -> io::Result<()> + Send + Sync>;

/// Options for a fresh bind. They apply only when a socket is created in this process; an inherited socket is
/// used exactly as the parent (or systemd) configured it.
///
/// ```
/// let opts = exuvia::BindOptions::new()
///     .backlog(4096)
///     .reuse_address(true)
///     .configure(|_fd| Ok(())); // any setsockopt you need, before bind
/// # let _ = opts;
/// ```
#[derive(Clone)]
#[must_use]
pub struct BindOptions {
    pub(crate) backlog: i32,
    pub(crate) reuse_address: bool,
    pub(crate) configure: Option<Configure>,
}

impl fmt::Debug for BindOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BindOptions")
            .field("backlog", &self.backlog)
            .field("reuse_address", &self.reuse_address)
            .field("configure", &self.configure.as_ref().map(|_| ".."))
            .finish()
    }
}

impl Default for BindOptions {
    fn default() -> Self {
        BindOptions::new()
    }
}

impl BindOptions {
    /// Backlog 1024, `SO_REUSEADDR` on (as std does for TCP), no hook.
    pub fn new() -> BindOptions {
        BindOptions {
            backlog: 1024,
            reuse_address: true,
            configure: None,
        }
    }

    /// The `listen(2)` backlog (capped by the kernel at `net.core.somaxconn`).
    pub fn backlog(mut self, backlog: u32) -> BindOptions {
        self.backlog = backlog.min(i32::MAX as u32) as i32;
        self
    }

    /// Whether to set `SO_REUSEADDR` on inet sockets before bind.
    pub fn reuse_address(mut self, on: bool) -> BindOptions {
        self.reuse_address = on;
        self
    }

    /// A hook run on the new socket after the options above and before `bind`, to set anything else
    /// (`SO_RCVBUF`, `IPV6_V6ONLY`, `TCP_FASTOPEN`, ...). An error from it fails the bind.
    pub fn configure(
        mut self,
        f: impl Fn(BorrowedFd<'_>) -> io::Result<()> + Send + Sync + 'static,
    ) -> BindOptions {
        self.configure = Some(Arc::new(f));
        self
    }
}

/// A new close-on-exec socket (socket2 creates them with `SOCK_CLOEXEC`).
fn inet_socket(addr: &SocketAddr, ty: Type, opts: &BindOptions) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(*addr), ty, None)?;
    if opts.reuse_address {
        socket.set_reuse_address(true)?;
    }
    if let Some(f) = &opts.configure {
        f(socket.as_fd())?;
    }
    socket.bind(&SockAddr::from(*addr))?;
    Ok(socket)
}

pub(crate) fn bind_tcp(addr: &SocketAddr, opts: &BindOptions) -> io::Result<OwnedFd> {
    let socket = inet_socket(addr, Type::STREAM, opts)?;
    socket.listen(opts.backlog)?;
    Ok(socket.into())
}

pub(crate) fn bind_udp(addr: &SocketAddr, opts: &BindOptions) -> io::Result<OwnedFd> {
    inet_socket(addr, Type::DGRAM, opts).map(OwnedFd::from)
}

/// The Unix socket types exuvia binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnixType {
    Stream,
    Datagram,
    Seqpacket,
}

impl UnixType {
    fn socket2(self) -> Type {
        match self {
            UnixType::Stream => Type::STREAM,
            UnixType::Datagram => Type::DGRAM,
            UnixType::Seqpacket => Type::from(libc::SOCK_SEQPACKET),
        }
    }
}

/// Binds a Unix socket at `path`. A socket file left by a dead process is replaced; a live one (something
/// answers on it) or a non-socket file is an error, never silently removed.
pub(crate) fn bind_unix(
    path: &Path,
    ty: UnixType,
    listen: bool,
    opts: &BindOptions,
) -> io::Result<OwnedFd> {
    use std::os::unix::fs::FileTypeExt;
    let address = SockAddr::unix(path).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "unix socket path {} must be 1 to 107 bytes without NUL",
                path.display()
            ),
        )
    })?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; remove it or choose another path",
                    path.display()
                ),
            ));
        }
        let probe = Socket::new(Domain::UNIX, ty.socket2(), None)?;
        match probe.connect(&address) {
            Ok(()) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another process is serving on {}", path.display()),
                ))
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                tracing::debug!(path = %path.display(), "removing stale socket file");
                std::fs::remove_file(path)?;
            }
            Err(e) => return Err(e),
        }
    }
    let socket = Socket::new(Domain::UNIX, ty.socket2(), None)?;
    if let Some(f) = &opts.configure {
        f(socket.as_fd())?;
    }
    socket.bind(&address)?;
    if listen {
        socket.listen(opts.backlog)?;
    }
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_match_real_sockets() {
        let tcp = bind_tcp(&"127.0.0.1:0".parse().unwrap(), &BindOptions::new()).unwrap();
        let info = sys::socket_info(tcp.as_fd()).unwrap().unwrap();
        assert!(SocketKind::TcpListener.matches(&info));
        assert!(!SocketKind::Udp.matches(&info));
        assert!(!SocketKind::UnixListener.matches(&info));
        assert_eq!(describe(tcp.as_fd()), "a listening IPv4 stream socket");
        let udp = bind_udp(&"[::1]:0".parse().unwrap(), &BindOptions::new());
        if let Ok(udp) = udp {
            let info = sys::socket_info(udp.as_fd()).unwrap().unwrap();
            assert!(SocketKind::Udp.matches(&info));
        }
    }

    #[test]
    fn options_reach_the_socket_before_bind() {
        let opts = BindOptions::new()
            .backlog(7)
            .configure(|fd| socket2::SockRef::from(&fd).set_recv_buffer_size(65536));
        let fd = bind_tcp(&"127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        // The kernel doubles what it is asked for (socket(7)); the default is smaller.
        let size = socket2::SockRef::from(&fd).recv_buffer_size().unwrap();
        assert!(size >= 65536, "SO_RCVBUF is {size}");
        let l = std::net::TcpListener::from(fd);
        assert!(l.local_addr().unwrap().port() != 0);
        let failing = BindOptions::new().configure(|_| Err(io::Error::other("nope")));
        assert!(bind_tcp(&"127.0.0.1:0".parse().unwrap(), &failing).is_err());
    }

    #[test]
    fn unix_paths_stale_live_and_foreign() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let live = bind_unix(&path, UnixType::Stream, true, &BindOptions::new()).unwrap();
        let e = bind_unix(&path, UnixType::Stream, true, &BindOptions::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop(live); // the file stays behind, stale
        assert!(path.exists());
        let again = bind_unix(&path, UnixType::Stream, true, &BindOptions::new()).unwrap();
        drop(again);
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let e = bind_unix(&file, UnixType::Stream, true, &BindOptions::new()).unwrap_err();
        assert!(e.to_string().contains("not a socket"));
        assert!(file.exists());
    }
}

//! Sockets: what a descriptor is, peer credentials, `accept4`, socket file modes, datagrams with descriptors
//! attached (sd_notify), and shutting down a socket another task owns. Creating, configuring and binding
//! sockets is socket2's job (in `listen.rs`).

use std::io;
use std::io::IoSlice;
use std::mem::MaybeUninit;
#[cfg(feature = "hyper")]
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;

use rustix::fs::FileType;
use rustix::net::{
    sockopt, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags,
};
pub(crate) use rustix::net::{AddressFamily, SocketType};

/// What the kernel says a socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SocketInfo {
    /// `AF_INET`, `AF_INET6`, `AF_UNIX`, ...
    pub(crate) domain: AddressFamily,
    /// `SOCK_STREAM`, `SOCK_DGRAM`, `SOCK_SEQPACKET`, ...
    pub(crate) ty: SocketType,
    /// `SO_ACCEPTCONN`: whether `listen` was called on it.
    pub(crate) listening: bool,
}

/// Returns `None` when the fd is not a socket at all.
pub(crate) fn socket_info(fd: BorrowedFd<'_>) -> io::Result<Option<SocketInfo>> {
    let st = rustix::fs::fstat(fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
        return Ok(None);
    }
    Ok(Some(SocketInfo {
        domain: sockopt::socket_domain(fd)?,
        ty: sockopt::socket_type(fd)?,
        listening: sockopt::socket_acceptconn(fd)?,
    }))
}

/// The uid of the process at the other end of a connected Unix socket (`SO_PEERCRED`).
pub(crate) fn peer_uid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(peer(fd)?.uid)
}

/// Who is at the other end of a connected Unix socket (`SO_PEERCRED`: as the kernel recorded it at
/// `connect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peer {
    /// `None` when the peer's process is not visible in this process's PID namespace (the kernel reports 0:
    /// two containers that share a network namespace but not their PIDs).
    pub(crate) pid: Option<u32>,
    pub(crate) uid: u32,
}

/// The process and user at the other end of a connected Unix socket (`SO_PEERCRED`). Read with libc, not
/// rustix: rustix's `UCred` holds the pid as a non-zero `Pid`, and the kernel reports 0 for a peer in another
/// PID namespace.
pub(crate) fn peer(fd: BorrowedFd<'_>) -> io::Result<Peer> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a valid, writable `ucred` and `len` its size; the kernel writes at most `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer {
        pid: u32::try_from(cred.pid).ok().filter(|p| *p > 0),
        uid: cred.uid,
    })
}

/// `SO_PEERPIDFD` (Linux 6.5+): where the generic socket option numbers apply (every architecture but
/// alpha, parisc and sparc).
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
const SO_PEERPIDFD: libc::c_int = 77;
#[cfg(any(target_arch = "sparc", target_arch = "sparc64"))]
const SO_PEERPIDFD: libc::c_int = 0x56;

/// A pidfd for the process at the other end of a connected Unix socket (`SO_PEERPIDFD`, Linux 6.5+): it names
/// that process even when its pid is not visible here (another PID namespace), and never a process that
/// reused its pid. Close-on-exec. `ENOPROTOOPT` on older kernels.
pub(crate) fn peer_pidfd(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd};
    let mut raw: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `raw` is a valid, writable int and `len` its size; the kernel writes at most `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut raw as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if raw < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: the kernel just installed `raw` as a new descriptor of this process, owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    super::fd::set_cloexec(owned.as_fd(), true)?;
    Ok(owned)
}

/// `accept4` with close-on-exec, for socket kinds std has no type for (seqpacket).
pub(crate) fn accept(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(rustix::io::retry_on_intr(|| {
        rustix::net::accept_with(fd, SocketFlags::CLOEXEC)
    })?)
}

/// Sets the mode of a Unix socket before `bind`: the socket file `bind` creates takes it (minus the umask).
/// Nothing goes through a path, so no symlink planted there can redirect it.
pub(crate) fn set_socket_mode(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    Ok(rustix::fs::fchmod(
        fd,
        rustix::fs::Mode::from_raw_mode(mode),
    )?)
}

/// How many connections wait in a listening socket's accept queue, as the kernel counts them: for TCP, the
/// exact number (`TCP_INFO` on a listener reports the queue in `tcpi_unacked`); for a Unix stream listener
/// only whether any waits (`poll`: 0 or 1; the kernel gives no count for those). `None` for anything else.
pub(crate) fn accept_queue(fd: BorrowedFd<'_>) -> io::Result<Option<u32>> {
    let Some(info) = socket_info(fd)? else {
        return Ok(None);
    };
    if !info.listening || info.ty != SocketType::STREAM {
        return Ok(None);
    }
    match info.domain {
        AddressFamily::INET | AddressFamily::INET6 => tcp_listen_queue(fd).map(Some),
        AddressFamily::UNIX => {
            let mut fds = [rustix::event::PollFd::new(
                &fd,
                rustix::event::PollFlags::IN,
            )];
            let n = rustix::event::poll(&mut fds, Some(&rustix::time::Timespec::default()))?;
            Ok(Some(u32::from(
                n > 0 && fds[0].revents().contains(rustix::event::PollFlags::IN),
            )))
        }
        _ => Ok(None),
    }
}

/// `tcpi_unacked` of `TCP_INFO` on a TCP listener: the connections waiting for `accept`. Neither rustix nor
/// socket2 reads `TCP_INFO`, hence this one `getsockopt` by hand.
fn tcp_listen_queue(fd: BorrowedFd<'_>) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, a zeroed buffer of exactly that size that
    // lives across the call; the descriptor is borrowed, hence open.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised, and every field is a plain integer, so any bytes the kernel wrote are valid.
    let info = unsafe { info.assume_init() };
    Ok(info.tcpi_unacked)
}

/// Where a Unix datagram goes: a filesystem path, or a name in the abstract namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UnixTarget {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl UnixTarget {
    pub(crate) fn address(&self) -> io::Result<SocketAddrUnix> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        match self {
            UnixTarget::Path(p) => SocketAddrUnix::new(p.as_path()).map_err(|_| {
                invalid(format!(
                    "unix socket path {} must be 1 to 107 bytes without NUL",
                    p.display()
                ))
            }),
            UnixTarget::Abstract(name) => SocketAddrUnix::new_abstract_name(name)
                .map_err(|_| invalid("abstract socket name must be 1 to 107 bytes".to_string())),
        }
    }
}

/// Sends one datagram to `target`, with `fds` attached as SCM_RIGHTS when there are any.
pub(crate) fn send_unix_datagram(
    fd: BorrowedFd<'_>,
    target: &UnixTarget,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let addr = target.address()?;
    send_with_rights(fd, Some(&addr), data, fds, SendFlags::NOSIGNAL)
}

/// One `sendmsg` of `data` with `fds` attached as SCM_RIGHTS when there are any, to `to` (or the connected
/// peer); all of `data` or an error.
fn send_with_rights(
    fd: BorrowedFd<'_>,
    to: Option<&SocketAddrUnix>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    flags: SendFlags,
) -> io::Result<()> {
    // Room for one SCM_RIGHTS header carrying every descriptor (CMSG_SPACE: header plus aligned payload).
    let mut space =
        vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(
            "the descriptors do not fit the control buffer",
        ));
    }
    let iov = [IoSlice::new(data)];
    let n = rustix::io::retry_on_intr(|| match to {
        Some(addr) => rustix::net::sendmsg_addr(fd, addr, &iov, &mut control, flags),
        None => rustix::net::sendmsg(fd, &iov, &mut control, flags),
    })?;
    if n != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the message was truncated",
        ));
    }
    Ok(())
}

/// A connected `SOCK_SEQPACKET` pair (both ends close-on-exec): the connection channel's.
pub(crate) fn packet_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Sends `data` on a connected stream socket in one `sendmsg`, with `fds` attached as `SCM_RIGHTS`: a
/// reader's `recvmsg` that reads the first byte of `data` receives them. Blocking; never raises SIGPIPE.
pub(crate) fn send_stream_with_fds(
    fd: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    send_with_rights(fd, None, data, fds, SendFlags::NOSIGNAL)
}

/// Sends one packet on a connected packet socket, with `fds` attached as `SCM_RIGHTS` when there are any.
/// Never raises SIGPIPE: a peer that is gone is `EPIPE`.
pub(crate) fn send_packet(
    fd: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    send_with_rights(
        fd,
        None,
        data,
        fds,
        SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
    )
}

/// One packet received by [`recv_packet`].
#[derive(Debug)]
pub(crate) struct Packet {
    /// Its length in the buffer (0 with no descriptors: the peer closed its end).
    pub(crate) len: usize,
    /// The descriptors attached, close-on-exec, in the order they were sent. Fewer than were sent when this
    /// process is out of descriptors (or more came than `max_fds`): the kernel closed the last ones.
    pub(crate) fds: Vec<OwnedFd>,
    /// The packet was longer than the buffer (the rest is lost).
    pub(crate) truncated: bool,
}

/// Receives one packet into `buf` without blocking (`WouldBlock` when there is none), taking at most
/// `max_fds` descriptors with it (rounded down to an even count; the kernel closes the ones that do not fit).
pub(crate) fn recv_packet(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<Packet> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    // Room for exactly `max_fds` (none at all for zero): the kernel installs as many descriptors as the
    // buffer holds. So no slack: `cmsg_space!` adds room to align an unaligned buffer (two more descriptors
    // when the buffer is aligned already), and an odd count's padding holds one more.
    let max_fds = max_fds - max_fds % 2;
    let room = if max_fds == 0 {
        0
    } else {
        rustix::cmsg_aligned_space!(ScmRights(max_fds))
    };
    // Aligned for `cmsghdr` (8 bytes) by being made of u64s, so that no byte of it goes to alignment.
    let mut words = vec![0u64; room.div_ceil(8)];
    // SAFETY: the u64s are initialised memory of at least `room` bytes, exclusively borrowed for the
    // lifetime of `space`; viewing them as `MaybeUninit<u8>` (alignment 1, any bit pattern) is sound.
    let space: &mut [MaybeUninit<u8>] =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), room) };
    let mut control = RecvAncillaryBuffer::new(space);
    let got = rustix::io::retry_on_intr(|| {
        rustix::net::recvmsg(
            fd,
            &mut [io::IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
        )
    })?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    Ok(Packet {
        len: got.bytes,
        fds,
        truncated: got.flags.contains(ReturnFlags::TRUNC),
    })
}

/// A socket owned by `S` that another task may shut down (`shutdown(2)`, both directions) for as long as `S`
/// lives, through a [`Cut`] handle: how the HTTP layer closes connections still open at the drain deadline,
/// including upgraded ones whose stream the application now owns.
///
/// The handle keeps the descriptor's number, not a duplicate (a `dup` per connection would double the
/// process's descriptors). That is sound because the number is only used under the handle's lock, and this
/// wrapper clears it under the same lock in its `Drop`, which runs before `S` (and its descriptor) is dropped;
/// `S` cannot be moved out but by [`Cuttable::into_inner`], which clears the number first too, so nothing else
/// can close the descriptor first.
#[cfg(feature = "hyper")]
#[derive(Debug)]
pub(crate) struct Cuttable<S: AsFd> {
    // Fields drop in order: the number is cleared before the stream (and its descriptor) goes.
    _clear: Uncut,
    io: S,
}

/// Clears a [`Cut`]'s number when dropped.
#[cfg(feature = "hyper")]
#[derive(Debug)]
struct Uncut(std::sync::Arc<Cut>);

/// The other side of a [`Cuttable`].
#[cfg(feature = "hyper")]
#[derive(Debug, Default)]
pub(crate) struct Cut {
    fd: std::sync::Mutex<Option<RawFd>>,
}

#[cfg(feature = "hyper")]
impl<S: AsFd> Cuttable<S> {
    pub(crate) fn new(io: S) -> (Cuttable<S>, std::sync::Arc<Cut>) {
        let cut = std::sync::Arc::new(Cut {
            fd: std::sync::Mutex::new(Some(io.as_fd().as_raw_fd())),
        });
        (
            Cuttable {
                _clear: Uncut(cut.clone()),
                io,
            },
            cut,
        )
    }

    pub(crate) fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    pub(crate) fn get_ref(&self) -> &S {
        &self.io
    }

    /// The stream, which the [`Cut`] can no longer shut down (it moves to another process, say).
    pub(crate) fn into_inner(self) -> S {
        let Cuttable { _clear, io } = self;
        drop(_clear);
        io
    }
}

#[cfg(feature = "hyper")]
impl Drop for Uncut {
    fn drop(&mut self) {
        // Before the stream is dropped or given away: from here on the number may be reused.
        *self
            .0
            .fd
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

#[cfg(feature = "hyper")]
impl Cut {
    /// Shuts the socket down in both directions if its owner still lives: every read on it ends (end of file)
    /// and every write fails, waking whoever waits on it. False if the owner was already gone.
    pub(crate) fn shutdown(&self) -> bool {
        let fd = self
            .fd
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(fd) = *fd else {
            return false;
        };
        // SAFETY: `fd` is open for as long as we hold the lock: the Cuttable that owns it clears this slot under
        // the same lock before it closes the descriptor. The borrow does not outlive this block.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = rustix::net::shutdown(borrowed, rustix::net::Shutdown::Both);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn socket_info_tells_kinds_apart() {
        let (r, _w) = super::super::pipe().unwrap();
        assert_eq!(socket_info(r.as_fd()).unwrap(), None);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let info = socket_info(l.as_fd()).unwrap().unwrap();
        assert_eq!(
            (info.domain, info.ty, info.listening),
            (AddressFamily::INET, SocketType::STREAM, true)
        );
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let info = socket_info(u.as_fd()).unwrap().unwrap();
        assert_eq!((info.ty, info.listening), (SocketType::DGRAM, false));
    }

    #[test]
    fn peer_uid_is_ours_and_a_socket_mode_is_set() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(peer_uid(a.as_fd()).unwrap(), super::super::euid());
        set_socket_mode(a.as_fd(), 0o600).unwrap();
    }

    #[test]
    fn bad_targets_are_refused_with_the_rule() {
        let long = UnixTarget::Path(PathBuf::from(format!("/{}", "x".repeat(200))));
        assert!(long
            .address()
            .unwrap_err()
            .to_string()
            .contains("1 to 107 bytes"));
        let long = UnixTarget::Abstract(vec![b'x'; 200]);
        assert!(long
            .address()
            .unwrap_err()
            .to_string()
            .contains("1 to 107 bytes"));
        assert!(UnixTarget::Abstract(b"exuvia".to_vec()).address().is_ok());
    }
}

#[cfg(test)]
mod packet_tests {
    use super::*;
    use std::os::fd::AsFd;

    /// What the connection channel relies on: a receiver with room for fewer descriptors than were sent gets
    /// exactly the first ones, in order, and nothing says more arrived.
    #[test]
    fn a_short_control_buffer_takes_exactly_the_first_descriptors() {
        let (a, b) = packet_pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let streams: Vec<std::net::TcpStream> = (0..10)
            .map(|_| std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap())
            .collect();
        let fds: Vec<BorrowedFd<'_>> = streams.iter().map(|s| s.as_fd()).collect();
        for room in [0usize, 1, 2, 3, 4, 9, 10, 64] {
            send_packet(a.as_fd(), b"x", &fds).unwrap();
            let mut buf = [0u8; 16];
            let got = recv_packet(b.as_fd(), &mut buf, room).unwrap();
            let want = room.min(10) - room.min(10) % 2;
            assert_eq!(got.fds.len(), want, "room {room}");
            for (fd, s) in got.fds.iter().zip(&streams) {
                let got = std::net::TcpStream::from(fd.try_clone().unwrap());
                assert_eq!(
                    got.local_addr().unwrap(),
                    s.local_addr().unwrap(),
                    "room {room}"
                );
            }
        }
    }
}

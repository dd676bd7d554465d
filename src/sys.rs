//! The only module with `unsafe`: thin, checked wrappers over the system calls exuvia needs.
//!
//! Everything returns owned or borrowed file descriptors, never bare integers, except where the kernel's own
//! interface is an integer (a pid, a signal number). The spawn path ([`spawn`]) prepares every byte it needs
//! beforehand and runs only async-signal-safe calls in the child, so that it is sound in a process with
//! threads. It uses `clone(CLONE_VM | CLONE_VFORK)`, as `posix_spawn` does, not `fork`: a fork copies the
//! page tables of the whole (possibly large) process while holding its memory-map lock, and leaves every page
//! copy-on-write, so a serving process would stall on page faults right when it must keep serving.

use std::ffi::{CStr, CString, OsString};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Instant;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_eintr(mut f: impl FnMut() -> libc::c_int) -> io::Result<libc::c_int> {
    loop {
        match cvt(f()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Takes ownership of a file descriptor that the environment says we inherited, after checking it is open.
///
/// The caller must make sure nothing else in the process owns `raw` (the numbers come from `LISTEN_FDS`-style
/// variables that name fds handed to this process for its exclusive use, and each is adopted once).
pub(crate) fn adopt_inherited_fd(raw: RawFd) -> io::Result<OwnedFd> {
    if raw < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: F_GETFD only queries the descriptor table; an invalid number yields EBADF.
    cvt(unsafe { libc::fcntl(raw, libc::F_GETFD) })?;
    // SAFETY: the fd is open (checked above) and, per the function contract, owned by no one else: it was
    // passed to this process by its parent or service manager and is adopted exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sets or clears close-on-exec.
pub(crate) fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a borrowed, open fd; no memory is passed.
    let flags = cvt(unsafe { libc::fcntl(raw, libc::F_GETFD) })?;
    let new = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    if new != flags {
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(raw, libc::F_SETFD, new) })?;
    }
    Ok(())
}

/// Sets or clears O_NONBLOCK. Note that the flag belongs to the open file description, which is shared with
/// every process holding a copy of the same socket.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a borrowed, open fd; no memory is passed.
    let flags = cvt(unsafe { libc::fcntl(raw, libc::F_GETFL) })?;
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if new != flags {
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(raw, libc::F_SETFL, new) })?;
    }
    Ok(())
}

/// What the kernel says a socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SocketInfo {
    /// `AF_INET`, `AF_INET6`, `AF_UNIX`, ...
    pub(crate) domain: libc::c_int,
    /// `SOCK_STREAM`, `SOCK_DGRAM`, `SOCK_SEQPACKET`, ...
    pub(crate) ty: libc::c_int,
    /// `SO_ACCEPTCONN`: whether `listen` was called on it.
    pub(crate) listening: bool,
}

fn getsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len point to live locals of the sizes the kernel is told.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// Returns `None` when the fd is not a socket at all.
pub(crate) fn socket_info(fd: BorrowedFd<'_>) -> io::Result<Option<SocketInfo>> {
    // SAFETY: fstat writes into a zeroed, properly sized stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid, writable stat buffer.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Ok(None);
    }
    Ok(Some(SocketInfo {
        domain: getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)?,
        ty: getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)?,
        listening: getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 0,
    }))
}

/// A new close-on-exec socket.
pub(crate) fn new_socket(domain: libc::c_int, ty: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers; on success we own the returned descriptor.
    let raw = cvt(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: raw is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `setsockopt` for the common integer-valued options.
pub(crate) fn set_int_option(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: value is a live c_int and its size is passed.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Binds an inet socket.
pub(crate) fn bind_inet(fd: BorrowedFd<'_>, addr: &SocketAddr) -> io::Result<()> {
    // SAFETY: sockaddr_storage is plain data; zero is a valid initial value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: storage holds a valid address of `len` bytes.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len as libc::socklen_t,
        )
    })?;
    Ok(())
}

fn sockaddr_un(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; zero is a valid initial value.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= sun.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "unix socket path must be 1 to {} bytes without NUL",
                sun.sun_path.len() - 1
            ),
        ));
    }
    for (dst, src) in sun.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((sun, len as libc::socklen_t))
}

/// Binds a Unix socket to a filesystem path.
pub(crate) fn bind_unix(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let (sun, len) = sockaddr_un(path)?;
    // SAFETY: sun is a valid sockaddr_un of `len` bytes.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sun as *const libc::sockaddr_un).cast(),
            len,
        )
    })?;
    Ok(())
}

/// Connects a Unix socket to a filesystem path (used to tell a stale socket file from a live one).
pub(crate) fn connect_unix(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let (sun, len) = sockaddr_un(path)?;
    // SAFETY: sun is a valid sockaddr_un of `len` bytes.
    cvt_eintr(|| unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sun as *const libc::sockaddr_un).cast(),
            len,
        )
    })?;
    Ok(())
}

/// Where a Unix datagram goes: a filesystem path, or a name in the abstract namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UnixTarget {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

fn target_sockaddr(target: &UnixTarget) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    match target {
        UnixTarget::Path(p) => sockaddr_un(p),
        UnixTarget::Abstract(name) => {
            // SAFETY: sockaddr_un is plain data; zero is a valid initial value.
            let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
            sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
            if name.is_empty() || name.len() + 1 > sun.sun_path.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "abstract socket name must be 1 to {} bytes",
                        sun.sun_path.len() - 1
                    ),
                ));
            }
            // sun_path[0] stays 0: that is what makes the name abstract.
            for (dst, src) in sun.sun_path[1..].iter_mut().zip(name) {
                *dst = *src as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
            Ok((sun, len as libc::socklen_t))
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
    let (mut sun, sun_len) = target_sockaddr(target)?;
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let payload = std::mem::size_of_val(raw.as_slice()) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = if raw.is_empty() {
        0
    } else {
        (unsafe { libc::CMSG_SPACE(payload) }) as usize
    };
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; zero is a valid initial value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut sun as *mut libc::sockaddr_un).cast();
    msg.msg_namelen = sun_len;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is `space` bytes, enough for one header carrying `payload` bytes; the
        // pointers come from the CMSG_* macros over that buffer.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                raw.len(),
            );
        }
    }
    // SAFETY: msg points at live locals (address, iovec, control buffer) for the duration of the call.
    let n = cvt_eintr(|| unsafe {
        libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) as libc::c_int
    })?;
    if n as usize != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "datagram was truncated",
        ));
    }
    Ok(())
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd's `MONOTONIC_USEC=` is compared against.
pub(crate) fn monotonic_usec() -> u64 {
    // SAFETY: timespec is plain data; clock_gettime writes into it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: ts is a live, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The uid of the process at the other end of a connected Unix socket (`SO_PEERCRED`).
pub(crate) fn peer_uid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: ucred is plain data; zero is a valid initial value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len point to live locals of the sizes the kernel is told.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(cred.uid)
}

/// This process's effective uid.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// `listen(2)`.
pub(crate) fn listen(fd: BorrowedFd<'_>, backlog: libc::c_int) -> io::Result<()> {
    // SAFETY: no pointers.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(())
}

/// `accept4` with close-on-exec, for socket kinds std has no type for (seqpacket).
pub(crate) fn accept(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed; we own the returned fd.
    let raw = cvt_eintr(|| unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: a fresh descriptor from accept4.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// A socket owned by `S` that another task may shut down (`shutdown(2)`, both directions) for as long as `S`
/// lives, through a [`Cut`] handle: how the HTTP layer closes connections still open at the drain deadline,
/// including upgraded ones whose stream the application now owns.
///
/// The handle keeps the descriptor's number, not a duplicate (a `dup` per connection would double the
/// process's descriptors). That is sound because the number is only used under the handle's lock, and this
/// wrapper clears it under the same lock in its `Drop`, which runs before `S` (and its descriptor) is dropped;
/// `S` cannot be moved out, so nothing else can close the descriptor first.
#[cfg(feature = "hyper")]
#[derive(Debug)]
pub(crate) struct Cuttable<S: AsFd> {
    io: S,
    cut: std::sync::Arc<Cut>,
}

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
                io,
                cut: cut.clone(),
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
}

#[cfg(feature = "hyper")]
impl<S: AsFd> Drop for Cuttable<S> {
    fn drop(&mut self) {
        // Before `io` is dropped: from here on the number may be reused.
        *self
            .cut
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
        // SAFETY: `fd` is open: the Cuttable that owns it clears this slot under the lock we hold before it
        // closes the descriptor. shutdown(2) takes no pointers and does not close the descriptor.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        true
    }
}

/// A close-on-exec pipe: (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: fds is a writable array of two ints.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// One `read`, retried on EINTR.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is a live, writable slice of the length passed.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A set of descriptors to wait on with `poll(2)`.
#[derive(Debug, Default)]
pub(crate) struct PollSet<'a> {
    fds: Vec<libc::pollfd>,
    _borrow: std::marker::PhantomData<BorrowedFd<'a>>,
}

impl<'a> PollSet<'a> {
    pub(crate) fn new() -> PollSet<'a> {
        PollSet::default()
    }

    /// Adds `fd`, returning its index.
    pub(crate) fn add(&mut self, fd: BorrowedFd<'a>, events: libc::c_short) -> usize {
        self.fds.push(libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        });
        self.fds.len() - 1
    }

    /// Waits until any fd is ready or `deadline` passes (`None`: forever). Returns false on timeout.
    pub(crate) fn wait(&mut self, deadline: Option<Instant>) -> io::Result<bool> {
        loop {
            let timeout_ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // Round up so that we never wake before the deadline and spin.
                    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
                }
            };
            for p in &mut self.fds {
                p.revents = 0;
            }
            // SAFETY: fds is a live array of pollfd of the length passed; every fd is borrowed for 'a.
            let n = unsafe {
                libc::poll(
                    self.fds.as_mut_ptr(),
                    self.fds.len() as libc::nfds_t,
                    timeout_ms,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n > 0 {
                return Ok(true);
            }
            if let Some(d) = deadline {
                if Instant::now() >= d {
                    return Ok(false);
                }
            }
        }
    }

    /// The events that fired for the fd at `index` in the last [`wait`](Self::wait).
    pub(crate) fn revents(&self, index: usize) -> libc::c_short {
        self.fds[index].revents
    }
}

/// `pidfd_open(2)`: a descriptor that becomes readable when the process exits (Linux 5.3+).
pub(crate) fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: a raw syscall taking two integers.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from the kernel; pidfds are close-on-exec by default.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

/// `waitpid(2)` for one pid. With `nohang`, `Ok(None)` means it is still running.
pub(crate) fn waitpid(pid: libc::pid_t, nohang: bool) -> io::Result<Option<ExitStatus>> {
    let mut status: libc::c_int = 0;
    let flags = if nohang { libc::WNOHANG } else { 0 };
    // SAFETY: status is a live, writable int.
    let r = cvt_eintr(|| unsafe { libc::waitpid(pid, &mut status, flags) })?;
    if r == 0 {
        Ok(None)
    } else {
        Ok(Some(ExitStatus::from_raw(status)))
    }
}

/// `kill(2)`.
/// Sets the mode of a Unix socket before `bind`: the socket file `bind` creates takes it (minus the umask).
/// Nothing goes through a path, so no symlink planted there can redirect it.
pub(crate) fn set_socket_mode(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: no pointers.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })?;
    Ok(())
}

/// The process group of `pid` (0: this process).
pub(crate) fn getpgid(pid: libc::pid_t) -> io::Result<libc::pid_t> {
    // SAFETY: no pointers.
    cvt(unsafe { libc::getpgid(pid) })
}

/// Moves this process into process group `pgid` (of the same session).
pub(crate) fn join_process_group(pgid: libc::pid_t) -> io::Result<()> {
    // SAFETY: no pointers.
    cvt(unsafe { libc::setpgid(0, pgid) })?;
    Ok(())
}

pub(crate) fn kill(pid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: no pointers.
    cvt(unsafe { libc::kill(pid, signal) })?;
    Ok(())
}

/// The pathname this program was executed by (`AT_EXECFN`), as given to `execve`: it may be relative, and it
/// names the file on disk, not the running inode.
pub(crate) fn exec_filename() -> Option<PathBuf> {
    // SAFETY: getauxval has no preconditions; 0 means absent.
    let ptr = unsafe { libc::getauxval(libc::AT_EXECFN) } as *const libc::c_char;
    if ptr.is_null() {
        return None;
    }
    // SAFETY: AT_EXECFN points at a NUL-terminated string on the initial stack, valid for the process's life.
    let s = unsafe { CStr::from_ptr(ptr) };
    Some(PathBuf::from(OsString::from_vec(s.to_bytes().to_vec())))
}

// ---------------------------------------------------------------------------------------------------------
// spawn: clone(CLONE_VM | CLONE_VFORK) + exec

/// Everything the child needs, prepared before the child exists so that the child allocates nothing.
#[derive(Debug)]
pub(crate) struct SpawnPlan {
    path: CString,
    argv: Vec<CString>,
    /// Each entry `NAME=VALUE\0`; pid slots are `NAME=` followed by [`PID_SLOT`] NUL bytes.
    env: Vec<Vec<u8>>,
    pid_slots: Vec<usize>,
    /// Start the program at `SCHED_IDLE` (background initialisation).
    pub(crate) idle: bool,
}

/// Room for a decimal pid (pid_t is 32-bit: at most 10 digits) plus the terminating NUL.
const PID_SLOT: usize = 12;

/// Where [`spawn`] failed: the step and the OS error.
#[derive(Debug)]
pub(crate) struct SpawnError {
    pub(crate) step: SpawnStep,
    pub(crate) error: io::Error,
}

/// The steps of [`spawn`] that can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpawnStep {
    /// Preparing in this process (a pipe, the child's stack) or `clone` itself.
    Start,
    /// Placing the sockets at their descriptor numbers in the child.
    PlaceFds,
    /// Lowering the child to `SCHED_IDLE` (background initialisation).
    Priority,
    /// `execve` of the program.
    Exec,
}

impl SpawnStep {
    fn code(self) -> u32 {
        match self {
            SpawnStep::Start => 0,
            SpawnStep::PlaceFds => 1,
            SpawnStep::Priority => 2,
            SpawnStep::Exec => 3,
        }
    }

    fn from_code(c: u32) -> SpawnStep {
        match c {
            1 => SpawnStep::PlaceFds,
            2 => SpawnStep::Priority,
            3 => SpawnStep::Exec,
            _ => SpawnStep::Start,
        }
    }
}

impl SpawnPlan {
    pub(crate) fn new(path: &Path, argv: &[OsString]) -> io::Result<SpawnPlan> {
        let nul = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{what} contains a NUL byte"),
            )
        };
        let path = CString::new(path.as_os_str().as_bytes()).map_err(|_| nul("program path"))?;
        let argv = argv
            .iter()
            .map(|a| CString::new(a.as_bytes()).map_err(|_| nul("an argument")))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(SpawnPlan {
            path,
            argv,
            env: Vec::new(),
            pid_slots: Vec::new(),
            idle: false,
        })
    }

    /// Adds `name=value`. Entries with a NUL byte cannot be passed by `execve` and are refused.
    pub(crate) fn env(&mut self, name: &[u8], value: &[u8]) -> io::Result<()> {
        if name.is_empty() || name.contains(&b'=') || name.contains(&0) || value.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "environment variable {:?} cannot be passed to a new program",
                    String::from_utf8_lossy(name)
                ),
            ));
        }
        let mut e = Vec::with_capacity(name.len() + value.len() + 2);
        e.extend_from_slice(name);
        e.push(b'=');
        e.extend_from_slice(value);
        e.push(0);
        self.env.push(e);
        Ok(())
    }

    /// Adds `name=<the child's own pid>`, filled in by the child.
    pub(crate) fn env_child_pid(&mut self, name: &[u8]) {
        let mut e = Vec::with_capacity(name.len() + 1 + PID_SLOT);
        e.extend_from_slice(name);
        e.push(b'=');
        e.extend_from_slice(&[0; PID_SLOT]);
        self.pid_slots.push(self.env.len());
        self.env.push(e);
    }
}

/// Starts `plan` as a new process with `fds[i]` at descriptor `3 + i` (close-on-exec cleared), every other
/// descriptor above 2 closed on exec, an empty signal mask, and handled signals and SIGPIPE at their default.
/// Returns the child's pid once `execve` has succeeded; an exec failure comes back as the `execve` error, with
/// the child reaped.
///
/// The child runs in a process group of its own (its pgid is its pid), so that killing the group reaches
/// everything it started (a wrapper script's background job, a double fork), unless something left the group
/// on purpose (`setsid`).
pub(crate) fn spawn(
    plan: &mut SpawnPlan,
    fds: &[BorrowedFd<'_>],
) -> std::result::Result<libc::pid_t, SpawnError> {
    let start = |error| SpawnError {
        step: SpawnStep::Start,
        error,
    };
    // Everything below is prepared here, in the parent, because the child may only make async-signal-safe
    // calls: no allocation, no locks, no panics.
    let srcs: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let n = srcs.len() as libc::c_int;
    let mut high: Vec<RawFd> = vec![-1; srcs.len()];
    let mut env_bases: Vec<*mut u8> = plan.env.iter_mut().map(|e| e.as_mut_ptr()).collect();
    let slots: Vec<*mut u8> = plan
        .pid_slots
        .iter()
        .map(|&i| {
            let eq = plan.env[i].iter().position(|&b| b == b'=').unwrap_or(0);
            // SAFETY: eq + 1 is within the entry, which has PID_SLOT bytes after '='.
            unsafe { env_bases[i].add(eq + 1) }
        })
        .collect();
    let mut envp: Vec<*const libc::c_char> = env_bases
        .iter_mut()
        .map(|p| *p as *const libc::c_char)
        .collect();
    envp.push(std::ptr::null());
    let mut argv: Vec<*const libc::c_char> = plan.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let path = plan.path.as_ptr();
    let (err_read, err_write) = pipe().map_err(start)?;
    let err_write_raw = err_write.as_raw_fd();
    let args = ChildArgs {
        path,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        slots: slots.as_ptr(),
        nslots: slots.len(),
        srcs: srcs.as_ptr(),
        high: high.as_mut_ptr(),
        nsrcs: srcs.len(),
        n,
        err_write: err_write_raw,
        idle: plan.idle,
    };
    let stack = ChildStack::new().map_err(start)?;
    // No signal handler may run in the child while it shares this address space: block every signal in this
    // thread (the child inherits the mask), the child resets handlers to default before unblocking.
    // SAFETY: sigset_t is plain data for which all-zero bytes are a valid (empty) value.
    let (mut all, mut old): (libc::sigset_t, libc::sigset_t) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: both sets are live; sigfillset and pthread_sigmask only write them.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: CLONE_VM | CLONE_VFORK: the child runs `child_entry` on its own stack in this address space,
    // and this thread is suspended until the child has called execve or exited, so nothing the child touches
    // (`args`, `high`, the pid slots, all prepared above and owned by this frame) changes under it or is freed
    // before it is done. The child makes only async-signal-safe calls.
    let pid = unsafe {
        libc::clone(
            child_entry,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&args as *const ChildArgs).cast_mut().cast(),
        )
    };
    let clone_err = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if pid < 0 {
        return Err(start(clone_err));
    }
    drop(err_write);
    // The child writes the failed step and errno (4 bytes each), or nothing if its exec succeeded.
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match read(err_read.as_fd(), &mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) => {
                let _ = kill(pid, libc::SIGKILL);
                let _ = waitpid(pid, false);
                return Err(start(e));
            }
        }
    }
    if got == 0 {
        return Ok(pid);
    }
    // The child failed before or at exec and is exiting; reap it so no zombie is left.
    let _ = waitpid(pid, false);
    let word = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    Err(if got == 8 {
        SpawnError {
            step: SpawnStep::from_code(word(0)),
            error: io::Error::from_raw_os_error(word(4) as i32),
        }
    } else {
        start(io::Error::other(
            "the new process failed before exec and reported a truncated error",
        ))
    })
}

/// What the child needs, by pointer into memory the parent prepared and keeps alive until the child is done.
struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    slots: *const *mut u8,
    nslots: usize,
    srcs: *const RawFd,
    high: *mut RawFd,
    nsrcs: usize,
    n: libc::c_int,
    err_write: RawFd,
    idle: bool,
}

/// The child's stack: its own mapping (the parent's stack is in use by the suspended parent thread), with a
/// guard page at the bottom.
struct ChildStack {
    base: *mut libc::c_void,
}

/// Enough for the child's few calls (glibc's posix_spawn uses less); a guard page below it.
const CHILD_STACK: usize = 256 * 1024;
const GUARD: usize = 64 * 1024;

impl ChildStack {
    fn new() -> io::Result<ChildStack> {
        // SAFETY: a fresh anonymous mapping; the pointer is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CHILD_STACK + GUARD,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = ChildStack { base };
        // SAFETY: the lowest GUARD bytes of the mapping just made.
        if unsafe { libc::mprotect(base, GUARD, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The initial stack pointer (stacks grow down on every Linux architecture Rust supports but hppa).
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping, 16-byte aligned (the mapping is page aligned).
        unsafe { self.base.cast::<u8>().add(CHILD_STACK + GUARD).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; the child no longer runs on it (CLONE_VFORK returns only after its
        // execve or exit).
        unsafe { libc::munmap(self.base, CHILD_STACK + GUARD) };
    }
}

extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's ChildArgs, alive until this child execs or exits (CLONE_VFORK).
    unsafe {
        let a = &*(arg as *const ChildArgs);
        child_before_exec(a)
    }
}

/// The child's half of [`spawn`].
///
/// # Safety
/// Must be called only in the child made by `spawn`'s `clone(CLONE_VM | CLONE_VFORK)`, with pointers into memory
/// the suspended parent prepared. Makes only async-signal-safe calls, writes only to `high` and the pid slots,
/// and never returns.
unsafe fn child_before_exec(a: &ChildArgs) -> ! {
    // SAFETY (whole body): every call is async-signal-safe per signal-safety(7) or a raw syscall; every
    // pointer was prepared by the parent, which is suspended until this child execs or exits.
    unsafe {
        let fail = |fd: RawFd, step: u32| -> ! {
            let errno = *libc::__errno_location() as u32;
            let mut bytes = [0u8; 8];
            bytes[..4].copy_from_slice(&step.to_ne_bytes());
            bytes[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(fd, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127)
        };
        let (place, priority, exec) = (
            SpawnStep::PlaceFds.code(),
            SpawnStep::Priority.code(),
            SpawnStep::Exec.code(),
        );
        // A process group of its own: the old process kills the whole group if this upgrade fails. Failure
        // (not expected: we are a fresh child, not a session leader) only weakens that, so it is not fatal.
        libc::setpgid(0, 0);
        // Every signal is blocked (the parent blocked them before clone). The application's handlers must not
        // run here, in its address space: back to the default for every handled signal, then unblock all (a
        // new program starts with none blocked). Rust's runtime ignores SIGPIPE: default it too, as std does.
        for sig in 1..=libc::SIGRTMAX() {
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut current) == 0
                && (current.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
                && current.sa_sigaction != libc::SIG_DFL
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());

        // Move everything we still need above the target range 3..3+n first, so that placing fd i at 3+i
        // can never overwrite a source that is still to be placed.
        let base = 3 + a.n;
        let err_fd = libc::fcntl(a.err_write, libc::F_DUPFD_CLOEXEC, base);
        if err_fd < 0 {
            fail(a.err_write, place);
        }
        for i in 0..a.nsrcs {
            let h = libc::fcntl(*a.srcs.add(i), libc::F_DUPFD_CLOEXEC, base);
            if h < 0 {
                fail(err_fd, place);
            }
            *a.high.add(i) = h;
        }
        for i in 0..a.nsrcs {
            // dup2 onto a different number always clears close-on-exec on the new descriptor.
            if libc::dup2(*a.high.add(i), 3 + i as libc::c_int) < 0 {
                fail(err_fd, place);
            }
        }
        let pid = libc::getpid();
        for k in 0..a.nslots {
            write_decimal(*a.slots.add(k), pid as u32);
        }
        // Nothing else may leak into the new program, not even an fd some library opened without
        // O_CLOEXEC: mark everything from 3+n up close-on-exec.
        let r = libc::syscall(
            libc::SYS_close_range,
            base as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        if r < 0 {
            // Kernels before 5.11: walk the table up to the soft limit (bounded so this stays fast).
            let mut lim: libc::rlimit = std::mem::zeroed();
            let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur.min(1 << 16) as libc::c_int
            } else {
                1024
            };
            let mut fd = base;
            while fd < max {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                fd += 1;
            }
        }
        if a.idle {
            // Background initialisation: the new program starts at the lowest CPU priority and returns to
            // normal before it reports ready. Lowering one's own priority needs no privilege.
            let param = libc::sched_param { sched_priority: 0 };
            if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
                fail(err_fd, priority);
            }
        }
        libc::execve(a.path, a.argv, a.envp);
        fail(err_fd, exec)
    }
}

/// Writes `v` in decimal followed by NUL at `dst`, which has room for [`PID_SLOT`] bytes.
///
/// # Safety
/// `dst` must be valid for PID_SLOT writes.
unsafe fn write_decimal(dst: *mut u8, mut v: u32) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 || len == digits.len() {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: len <= 10 < PID_SLOT, within the caller's buffer.
        unsafe { *dst.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: as above.
    unsafe { *dst.add(len) = 0 };
}

// ---------------------------------------------------------------------------------------------------------
// signals

static SIGNAL_PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

/// Installs a handler for each of `signals` that writes the signal number as one byte into a self-pipe, and
/// returns the read end. Works whatever threads exist and whatever their signal masks; handlers installed
/// before keep running (they are chained).
pub(crate) fn signal_pipe(signals: &[libc::c_int]) -> io::Result<OwnedFd> {
    let (read_end, write_end) = pipe()?;
    set_nonblocking(write_end.as_fd(), true)?;
    let write_raw = std::os::fd::IntoRawFd::into_raw_fd(write_end);
    if SIGNAL_PIPE_WRITE
        .compare_exchange(-1, write_raw, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // SAFETY: write_raw came from into_raw_fd above and is owned here.
        drop(unsafe { OwnedFd::from_raw_fd(write_raw) });
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "signal handling is already installed in this process",
        ));
    }
    for &sig in signals {
        let byte = sig as u8;
        // Through signal-hook-registry, which chains: a handler installed before (by the application, the
        // ctrlc crate, tokio::signal) still runs, and Tokio's own registrations coexist with this one.
        // SAFETY: the action only calls write(2), which is async-signal-safe, on a descriptor kept open for
        // the life of the process (it is never closed once stored above), and restores errno.
        let registered = unsafe {
            signal_hook_registry::register(sig, move || {
                let errno = *libc::__errno_location();
                // A full pipe drops the byte: the reader is already behind on signals of this kind, and
                // upgrades coalesce anyway.
                libc::write(write_raw, (&byte as *const u8).cast(), 1);
                *libc::__errno_location() = errno;
            })
        };
        registered?;
    }
    Ok(read_end)
}

/// Registers `fd` with the current Tokio reactor for readability.
#[cfg(feature = "tokio")]
pub(crate) fn async_readable(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid, open descriptor that stays open, and always reports the same number,
    // for as long as the AsyncFd owns it, which is the whole contract of register_with_interest.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

// ---------------------------------------------------------------------------------------------------------
// CPU scheduling (background initialisation)

/// `CAP_SYS_NICE`, from linux/capability.h.
const CAP_SYS_NICE: u32 = 23;

/// The calling thread's scheduling policy and nice value.
pub(crate) fn scheduling() -> io::Result<(i32, i32)> {
    // SAFETY: no pointers.
    let policy = cvt(unsafe { libc::sched_getscheduler(0) })? & !libc::SCHED_RESET_ON_FORK;
    // getpriority may legitimately return -1: tell it from an error by errno.
    // SAFETY: errno is this thread's; getpriority takes integers.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    if nice == -1 && io::Error::last_os_error().raw_os_error() != Some(0) {
        return Err(io::Error::last_os_error());
    }
    Ok((policy, nice))
}

/// Whether this process holds `CAP_SYS_NICE` in its effective set.
fn has_cap_sys_nice() -> bool {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget with a live version-3 header and room for the two data words version 3 uses.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    r == 0 && data[(CAP_SYS_NICE / 32) as usize].effective & (1 << (CAP_SYS_NICE % 32)) != 0
}

/// Whether a thread of this process at `SCHED_IDLE` may go back to `SCHED_OTHER` at `nice`: that needs
/// `CAP_SYS_NICE` or an `RLIMIT_NICE` of at least `20 - nice` (systemd: `LimitNICE=`).
pub(crate) fn may_return_to(nice: i32) -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a live struct.
    let rlimit_ok = unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut lim) } == 0
        && lim.rlim_cur >= (20 - nice).max(0) as libc::rlim_t;
    rlimit_ok || has_cap_sys_nice()
}

/// The thread ids of `pid` (`0`: this process) with their scheduling policy, from `/proc`.
pub(crate) fn thread_policies(pid: u32) -> io::Result<Vec<(i32, i32)>> {
    let dir = if pid == 0 {
        PathBuf::from("/proc/self/task")
    } else {
        PathBuf::from(format!("/proc/{pid}/task"))
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        // A thread that exits while we read is simply gone.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command's closing parenthesis start at field 3; the policy is field 41.
        let policy = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(41 - 3))
            .and_then(|p| p.parse::<i32>().ok())
            .ok_or_else(|| io::Error::other(format!("unexpected format of {}", dir.display())))?;
        out.push((tid, policy));
    }
    Ok(out)
}

/// Puts every thread of this process at `SCHED_OTHER` with `nice`, pass after pass until one finds every
/// thread there (a thread created meanwhile by a thread still at `SCHED_IDLE` is caught by the next pass).
pub(crate) fn return_to_normal_scheduling(nice: i32) -> io::Result<()> {
    for _ in 0..100 {
        let mut changed = false;
        for (tid, policy) in thread_policies(0)? {
            if policy == libc::SCHED_OTHER {
                continue;
            }
            changed = true;
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: integers and a live sched_param.
            let r = unsafe { libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param) };
            if r != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ESRCH) {
                    return Err(e);
                }
                continue; // the thread exited
            }
            // SAFETY: integers only.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ESRCH) {
                    return Err(e);
                }
            }
        }
        if !changed {
            return Ok(());
        }
    }
    Err(io::Error::other(
        "threads kept appearing at idle priority over 100 passes",
    ))
}

/// The number of threads in this process, from `/proc/self/status` (`None` if it cannot be read).
pub(crate) fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub(crate) fn sockaddr(t: &UnixTarget) -> (libc::sockaddr_un, libc::socklen_t) {
        target_sockaddr(t).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_fits_any_pid() {
        let mut buf = [0xffu8; PID_SLOT];
        for v in [0u32, 7, 42, 4_194_304, u32::MAX] {
            // SAFETY: buf has PID_SLOT bytes.
            unsafe { write_decimal(buf.as_mut_ptr(), v) };
            let end = buf.iter().position(|&b| b == 0).unwrap();
            assert_eq!(std::str::from_utf8(&buf[..end]).unwrap(), v.to_string());
        }
    }

    #[test]
    fn adopt_refuses_closed_and_negative_fds() {
        assert!(adopt_inherited_fd(-1).is_err());
        // A number far above anything open in a test process.
        assert!(adopt_inherited_fd(1_000_000).is_err());
    }

    #[test]
    fn socket_info_tells_kinds_apart() {
        let (r, _w) = pipe().unwrap();
        assert_eq!(socket_info(std::os::fd::AsFd::as_fd(&r)).unwrap(), None);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let info = socket_info(std::os::fd::AsFd::as_fd(&l)).unwrap().unwrap();
        assert_eq!(
            (info.domain, info.ty, info.listening),
            (libc::AF_INET, libc::SOCK_STREAM, true)
        );
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let info = socket_info(std::os::fd::AsFd::as_fd(&u)).unwrap().unwrap();
        assert_eq!((info.ty, info.listening), (libc::SOCK_DGRAM, false));
    }

    #[test]
    fn spawn_reports_exec_errors_and_reaps() {
        let mut plan =
            SpawnPlan::new(Path::new("/nonexistent/exuvia-test"), &["x".into()]).unwrap();
        let e = spawn(&mut plan, &[]).unwrap_err();
        assert_eq!(e.error.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(e.step, SpawnStep::Exec);
    }

    #[test]
    fn spawn_places_fds_writes_the_pid_resets_signals_and_restores_the_callers_mask() {
        let dir = std::env::temp_dir().join(format!("exuvia-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let script = format!(
            "{{ echo pid=$MYPID; grep -E '^Sig(Blk|Ign)' /proc/self/status; readlink /proc/self/fd/3; }} > {}",
            out.display()
        );
        let mut plan = SpawnPlan::new(
            Path::new("/bin/sh"),
            &["sh".into(), "-c".into(), script.into()],
        )
        .unwrap();
        plan.env_child_pid(b"MYPID");
        let (r, _w) = pipe().unwrap();
        // The caller blocks SIGUSR2 (as a thread waiting in sigwait would): the child must not inherit that,
        // and the caller must get its own mask back.
        // SAFETY: sigset manipulation on live values; pthread_sigmask on this thread only.
        let before = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            old
        };
        let pid = spawn(&mut plan, &[r.as_fd()]).unwrap();
        // SAFETY: as above.
        let (usr2_blocked, usr1_blocked) = unsafe {
            let mut now: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_SETMASK, &before, &mut now);
            (
                libc::sigismember(&now, libc::SIGUSR2) == 1,
                libc::sigismember(&now, libc::SIGUSR1) == 1,
            )
        };
        assert!(
            usr2_blocked && !usr1_blocked,
            "the caller's mask was not restored"
        );
        let status = waitpid(pid, false).unwrap().unwrap();
        assert!(status.success(), "{status:?}");
        let text = std::fs::read_to_string(&out).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(text.contains(&format!("pid={pid}\n")), "{text}");
        assert!(text.contains("SigBlk:\t0000000000000000"), "{text}");
        // SIGPIPE (13) is ignored by Rust's runtime in this test process; the child has it at the default.
        let ign = text
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(ign & (1 << (libc::SIGPIPE - 1)), 0, "{text}");
        let inode = fstat_inode(r.as_fd());
        assert!(
            text.contains(&format!("pipe:[{inode}]")),
            "fd 3 is not the pipe {inode}: {text}"
        );
    }

    fn fstat_inode(fd: BorrowedFd<'_>) -> u64 {
        // SAFETY: fstat into a live struct.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstat(fd.as_raw_fd(), &mut st);
            st.st_ino
        }
    }

    #[test]
    fn scheduling_of_this_process_is_readable() {
        let (policy, nice) = scheduling().unwrap();
        assert_eq!(policy, libc::SCHED_OTHER);
        assert!((-20..=19).contains(&nice));
        let threads = thread_policies(0).unwrap();
        assert!(!threads.is_empty());
        assert!(
            threads.iter().all(|(_, p)| *p == libc::SCHED_OTHER),
            "{threads:?}"
        );
        // Back to where it already is: nothing to change, no privilege needed.
        return_to_normal_scheduling(nice).unwrap();
    }
}

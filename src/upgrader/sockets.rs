//! The named sockets: inherited ones taken by name (or index), fresh ones bound when nothing was inherited
//! under that name, and the accept loop over a listener.

use std::fmt;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;

use super::Upgrader;
use crate::accept::{Accept, Incoming};
use crate::activation;
use crate::error::{Error, ErrorKind, Result};
use crate::listen::{self, BindOptions, SocketKind};
use crate::sys;

impl Upgrader {
    fn take_or_bind(
        &self,
        name: &str,
        kind: SocketKind,
        bind: impl FnOnce() -> std::io::Result<OwnedFd>,
        what: impl fmt::Display,
    ) -> Result<OwnedFd> {
        check_name(name)?;
        if let Some(fd) = self.inner.registry.take(name, kind)? {
            tracing::info!(name, "using inherited socket");
            return Ok(fd);
        }
        let fd = self.inner.registry.bind(name, bind)?.map_err(|e| {
            Error::with_io(
                ErrorKind::Bind,
                format!("cannot bind {name:?} on {what}"),
                e,
            )
        })?;
        tracing::info!(name, on = %what, "bound new socket");
        if self.inner.fd_store {
            self.inner
                .manager
                .store_fd(name, std::os::fd::AsFd::as_fd(&fd));
        }
        Ok(fd)
    }

    /// A TCP listener named `name`: the inherited one if this process was handed one under that name,
    /// otherwise a fresh bind on `addr` with [`BindOptions::new`].
    ///
    /// An inherited socket is used as it is, whatever `addr` says (its address is the one the old process or
    /// systemd bound: with port 0, or a socket unit, it differs from `addr`).
    ///
    /// ```no_run
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// let http = upgrader.listen_tcp("http", "0.0.0.0:8080")?;
    /// let admin = upgrader.listen_tcp_with(
    ///     "admin",
    ///     "127.0.0.1:9090",
    ///     &exuvia::BindOptions::new().backlog(128),
    /// )?;
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::WrongSocketKind`] if the inherited socket of that name is not a TCP listener,
    /// [`ErrorKind::AlreadyTaken`] on a second call with the same name, [`ErrorKind::Bind`] if the bind fails.
    pub fn listen_tcp(&self, name: &str, addr: impl ToSocketAddrs) -> Result<TcpListener> {
        self.listen_tcp_with(name, addr, &BindOptions::new())
    }

    /// [`listen_tcp`](Self::listen_tcp) with options (backlog, `SO_REUSEADDR`, a hook) for a fresh bind.
    pub fn listen_tcp_with(
        &self,
        name: &str,
        addr: impl ToSocketAddrs,
        opts: &BindOptions,
    ) -> Result<TcpListener> {
        let addr = resolve(name, addr)?;
        self.take_or_bind(
            name,
            SocketKind::TcpListener,
            || listen::bind_tcp(&addr, opts),
            addr,
        )
        .map(TcpListener::from)
    }

    /// ```no_run
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// let dns = upgrader.bind_udp("dns", "127.0.0.1:5353")?;
    /// let control = upgrader.listen_unix("api", "/run/app/api.sock")?;
    /// let logs = upgrader.bind_unix_datagram("logs", "/run/app/log.sock")?;
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    /// A UDP socket named `name`, inherited or freshly bound on `addr`.
    pub fn bind_udp(&self, name: &str, addr: impl ToSocketAddrs) -> Result<UdpSocket> {
        self.bind_udp_with(name, addr, &BindOptions::new())
    }

    /// [`bind_udp`](Self::bind_udp) with options for a fresh bind.
    pub fn bind_udp_with(
        &self,
        name: &str,
        addr: impl ToSocketAddrs,
        opts: &BindOptions,
    ) -> Result<UdpSocket> {
        let addr = resolve(name, addr)?;
        self.take_or_bind(
            name,
            SocketKind::Udp,
            || listen::bind_udp(&addr, opts),
            addr,
        )
        .map(UdpSocket::from)
    }

    /// A Unix stream listener named `name`, inherited or freshly bound at `path`. A fresh bind replaces a
    /// stale socket file left by a dead process; an inherited socket's path is never touched.
    pub fn listen_unix(&self, name: &str, path: impl AsRef<Path>) -> Result<UnixListener> {
        self.listen_unix_with(name, path, &BindOptions::new())
    }

    /// [`listen_unix`](Self::listen_unix) with options for a fresh bind.
    pub fn listen_unix_with(
        &self,
        name: &str,
        path: impl AsRef<Path>,
        opts: &BindOptions,
    ) -> Result<UnixListener> {
        let path = path.as_ref();
        self.take_or_bind(
            name,
            SocketKind::UnixListener,
            || listen::bind_unix(path, listen::UnixType::Stream, true, opts),
            path.display(),
        )
        .map(UnixListener::from)
    }

    /// A Unix datagram socket named `name`, inherited or freshly bound at `path`.
    pub fn bind_unix_datagram(&self, name: &str, path: impl AsRef<Path>) -> Result<UnixDatagram> {
        let path = path.as_ref();
        self.take_or_bind(
            name,
            SocketKind::UnixDatagram,
            || listen::bind_unix(path, listen::UnixType::Datagram, false, &BindOptions::new()),
            path.display(),
        )
        .map(UnixDatagram::from)
    }

    /// A Unix seqpacket listener named `name`, inherited or freshly bound at `path`. std has no type for it:
    /// accept with [`accept_seqpacket`](crate::accept_seqpacket) or wrap the fd in your own.
    pub fn listen_unix_seqpacket(&self, name: &str, path: impl AsRef<Path>) -> Result<OwnedFd> {
        let path = path.as_ref();
        self.take_or_bind(
            name,
            SocketKind::UnixSeqpacketListener,
            || listen::bind_unix(path, listen::UnixType::Seqpacket, true, &BindOptions::new()),
            path.display(),
        )
    }

    /// ```no_run
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// // Socket-activated only: no fallback bind.
    /// match upgrader.take_tcp("http")? {
    ///     Some(l) => println!("serving on {:?}", l.local_addr()),
    ///     None => eprintln!("no socket named http was passed; check FileDescriptorName="),
    /// }
    /// // Sockets passed without distinct names, by position.
    /// let second = upgrader.take_index(1, exuvia::SocketKind::TcpListener)?;
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    /// Takes the inherited TCP listener named `name`, if any: no bind. `Ok(None)` when there is none or it
    /// was already taken.
    pub fn take_tcp(&self, name: &str) -> Result<Option<TcpListener>> {
        Ok(self
            .inner
            .registry
            .take(name, SocketKind::TcpListener)?
            .map(TcpListener::from))
    }

    /// Takes the inherited socket named `name` as `kind`, if any, as an owned fd.
    pub fn take(&self, name: &str, kind: SocketKind) -> Result<Option<OwnedFd>> {
        self.inner.registry.take(name, kind)
    }

    /// Binds a fresh socket with `bind` and keeps it under `name` in place of whatever was there.
    pub(crate) fn rebind(
        &self,
        name: &str,
        bind: impl FnOnce() -> std::io::Result<OwnedFd>,
    ) -> std::io::Result<OwnedFd> {
        let fd = bind()?;
        let keep = fd.try_clone()?;
        self.inner.registry.replace(name, keep);
        if self.inner.fd_store {
            self.inner.manager.unstore_fd(name);
            self.inner
                .manager
                .store_fd(name, std::os::fd::AsFd::as_fd(&fd));
        }
        Ok(fd)
    }

    /// Takes the `index`th inherited socket (0 is fd 3) as `kind`: for sockets passed without distinct names.
    pub fn take_index(&self, index: usize, kind: SocketKind) -> Result<Option<OwnedFd>> {
        self.inner.registry.take_index(index, kind)
    }

    /// ```no_run
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// # let listener = upgrader.listen_tcp("http", "127.0.0.1:8080")?;
    /// for conn in upgrader.incoming(listener) {
    ///     let Ok(stream) = conn else { continue };
    ///     let guard = upgrader.track();
    ///     std::thread::spawn(move || { /* serve stream */ drop((stream, guard)); });
    /// }
    /// // Here this process has handed over (or is stopping) and no longer accepts.
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    /// Accepted connections from `listener` until this process finishes; then the iterator ends and closes
    /// the listener. See [`Incoming`].
    pub fn incoming<L: Accept>(&self, listener: L) -> Incoming<L> {
        Incoming::new(listener, self.finishing_handle())
    }
}

fn check_name(name: &str) -> Result<()> {
    if activation::name_is_valid(name) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidName,
            format!(
                "socket name {name:?} is invalid: use 1 to 255 printable ASCII characters without ':' (names \
                 travel in LISTEN_FDNAMES)"
            ),
        ))
    }
}

fn resolve(name: &str, addr: impl ToSocketAddrs) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| {
            Error::with_io(
                ErrorKind::Bind,
                format!("cannot resolve the address for {name:?}"),
                e,
            )
        })?
        .next()
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Bind,
                format!("the address for {name:?} resolves to nothing"),
            )
        })
}

/// Accepts one connection on a seqpacket listener (from [`Upgrader::listen_unix_seqpacket`]).
pub fn accept_seqpacket(listener: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    sys::accept(listener)
}

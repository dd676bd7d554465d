//! Blocking accept loops that end when this process hands over or stops.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};

use crate::sys::PollSet;
use crate::Upgrader;

mod sealed {
    pub trait Sealed {}
    impl Sealed for std::net::TcpListener {}
    impl Sealed for std::os::unix::net::UnixListener {}
}

/// A listening socket that [`Incoming`] can accept from. Implemented for std's TCP and Unix listeners; sealed.
pub trait Accept: AsFd + sealed::Sealed {
    /// The accepted connection.
    type Stream;
    /// One `accept`.
    fn accept_one(&self) -> io::Result<Self::Stream>;
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    fn accept_one(&self) -> io::Result<TcpStream> {
        self.accept().map(|(s, _)| s)
    }
}

impl Accept for UnixListener {
    type Stream = UnixStream;
    fn accept_one(&self) -> io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }
}

/// An iterator of accepted connections that ends (returns `None`) once this process has handed over to a new
/// one or is stopping, and then closes its listener: this process stops accepting while the new one, holding
/// the same kernel socket, goes on. Made by [`Upgrader::incoming`].
///
/// It waits with `poll(2)` on the listener and on the upgrader's finishing signal, so it works whether the
/// socket is blocking or not. That matters: `O_NONBLOCK` belongs to the kernel socket, which the old and new
/// process share, and the new one (say, on Tokio) may switch it while this one still accepts. A connection
/// that another process accepted first shows up here as a spurious wake-up and is skipped.
#[derive(Debug)]
pub struct Incoming<L: Accept> {
    listener: Option<L>,
    upgrader: Upgrader,
}

impl<L: Accept> Incoming<L> {
    pub(crate) fn new(listener: L, upgrader: Upgrader) -> Incoming<L> {
        Incoming {
            listener: Some(listener),
            upgrader,
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EPROTO | libc::ENETDOWN | libc::ENOPROTOOPT | libc::EHOSTDOWN | libc::ENONET)
            | Some(libc::EHOSTUNREACH | libc::EOPNOTSUPP | libc::ENETUNREACH)
    )
}

impl<L: Accept> Iterator for Incoming<L> {
    type Item = io::Result<L::Stream>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let listener = self.listener.as_ref()?;
            let stop = self.upgrader.finishing_fd();
            let mut set = PollSet::new();
            let s = set.add(stop, libc::POLLIN);
            let l = set.add(listener.as_fd(), libc::POLLIN);
            if let Err(e) = set.wait(None) {
                return Some(Err(e));
            }
            if set.revents(s) != 0 {
                // Leave whatever is queued to the process that carries on.
                self.listener = None;
                return None;
            }
            if set.revents(l) == 0 {
                continue;
            }
            match listener.accept_one() {
                Ok(s) => return Some(Ok(s)),
                Err(e) if is_transient(&e) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

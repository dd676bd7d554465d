//! Blocking accept loops that end when this process hands over or stops.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};

use crate::lifecycle::Finishing;
use crate::sys::PollSet;

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
/// the same kernel socket, goes on. Made by [`Upgrader::incoming`](crate::Upgrader::incoming).
///
/// It waits with `poll(2)` on the listener and on the upgrader's finishing signal, then accepts without
/// blocking: it puts the socket in non-blocking mode before its first accept. That matters because
/// during a handover two processes accept from the same kernel socket: `poll` wakes both for one connection,
/// and the one that loses the race must not sit in a blocking `accept` until the next connection, deaf to the
/// finishing signal. A connection that another process (or thread) accepted first is a spurious wake-up and
/// is skipped. `O_NONBLOCK` belongs to the open file description, which every process holding the socket
/// shares: a hand-written accept loop elsewhere must treat `EAGAIN` as "someone else took it", as it must
/// when the other process runs on Tokio.
#[derive(Debug)]
pub struct Incoming<L: Accept> {
    listener: Option<L>,
    finishing: Finishing,
    /// Whether this loop has put the socket in non-blocking mode yet.
    nonblocking: bool,
}

impl<L: Accept> Incoming<L> {
    pub(crate) fn new(listener: L, finishing: Finishing) -> Incoming<L> {
        Incoming {
            listener: Some(listener),
            finishing,
            nonblocking: false,
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
            let stop = self.finishing.fd();
            // On probation the gate is shut: the listener stays open but is not polled (the new process takes
            // the connections); after a rollback it opens again and the same kernel socket is accepted from.
            let gate = self.finishing.gate();
            let mut set = PollSet::new();
            let s = set.readable(stop);
            let g = set.readable(gate.changed_fd());
            let l = gate.open.then(|| set.readable(listener.as_fd()));
            if let Err(e) = set.wait(None) {
                return Some(Err(e));
            }
            if set.fired(s) {
                // Leave whatever is queued to the process that carries on.
                self.listener = None;
                return None;
            }
            if set.fired(g) {
                continue; // the gate changed: look again
            }
            if !l.is_some_and(|l| set.fired(l)) {
                continue;
            }
            if !self.nonblocking {
                if let Err(e) = crate::sys::set_nonblocking(listener.as_fd(), true) {
                    return Some(Err(e));
                }
                self.nonblocking = true;
            }
            match listener.accept_one() {
                Ok(s) => return Some(Ok(s)),
                Err(e) if is_transient(&e) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

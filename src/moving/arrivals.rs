//! The new process's side: batches of connections received from the old process, each confirmed once
//! received, and handed to the application one by one.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::wire::{self, Message, StreamKind};
use crate::sys;

/// A connection that moved here from the old process.
#[derive(Debug)]
pub struct Arrived {
    /// The connection, exactly as the old process left it.
    pub stream: ArrivedStream,
    /// The application's state for it, as the old process handed it over.
    pub state: Vec<u8>,
    /// Bytes the old process had read from it and not consumed: they come before anything read from
    /// `stream`.
    pub unread: Vec<u8>,
}

/// The stream of an [`Arrived`] connection, of the type the old process had.
#[derive(Debug)]
pub enum ArrivedStream {
    /// A TCP connection.
    Tcp(std::net::TcpStream),
    /// A Unix stream connection.
    Unix(std::os::unix::net::UnixStream),
}

impl AsFd for ArrivedStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            ArrivedStream::Tcp(s) => s.as_fd(),
            ArrivedStream::Unix(s) => s.as_fd(),
        }
    }
}

/// What one attempt to receive did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// A batch arrived (its connections are queued).
    Received,
    /// Nothing to receive now.
    WouldBlock,
    /// The old process closed its end (it exited), or the channel failed: nothing more will come.
    Closed,
}

/// Descriptors a process keeps free while connections arrive: for the connections it accepts meanwhile, its
/// control socket, its logs. A process at its limit would serve what moved and nothing else.
pub(crate) const FD_RESERVE: usize = 64;

/// Received connections not yet given to the application, and the buffer to receive into. Shared by the
/// blocking [`Arrivals`] and the Tokio one.
#[derive(Debug)]
pub(crate) struct Inbox {
    buf: Vec<u8>,
    queue: VecDeque<Arrived>,
    /// The mode the streams are given in (the Tokio layer wants them non-blocking).
    nonblocking: bool,
    /// How many more descriptors this process may open, as last counted less what arrived since (`None`:
    /// unknown, taken as no limit).
    fds_left: Option<usize>,
}

impl Inbox {
    pub(crate) fn new(nonblocking: bool) -> Inbox {
        Inbox {
            buf: vec![0; wire::HEADER_LEN + wire::MAX_PAYLOAD],
            queue: VecDeque::new(),
            nonblocking,
            fds_left: None,
        }
    }

    /// How many descriptors the next batch may bring, keeping [`FD_RESERVE`] free. Counted again (in
    /// `/proc/self/fd`, so not for every batch) whenever the estimate runs low.
    fn room(&mut self) -> usize {
        let low = FD_RESERVE + 2 * wire::MAX_BATCH;
        if !matches!(self.fds_left, Some(left) if left >= low) {
            self.fds_left = sys::descriptors_left();
        }
        match self.fds_left {
            Some(left) => left.saturating_sub(FD_RESERVE).min(wire::MAX_BATCH),
            None => wire::MAX_BATCH,
        }
    }

    pub(crate) fn pop(&mut self) -> Option<Arrived> {
        self.queue.pop_front()
    }

    /// Receives one batch without blocking, queues its connections and confirms them to the old process.
    pub(crate) fn receive(&mut self, channel: BorrowedFd<'_>) -> Progress {
        let room = self.room();
        let packet = match sys::recv_packet(channel, &mut self.buf, room) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::WouldBlock,
            Err(e) => {
                tracing::warn!(error = %e, "connection channel failed; no more connections will arrive");
                return Progress::Closed;
            }
        };
        if packet.len == 0 && packet.fds.is_empty() {
            tracing::debug!("the old process closed the connection channel");
            return Progress::Closed;
        }
        let message = if packet.truncated {
            Err(crate::Error::protocol(
                "connection channel: a packet longer than the protocol allows",
            ))
        } else {
            wire::decode(&self.buf[..packet.len])
        };
        let (seq, records) = match message {
            Ok(Message::Batch { seq, records }) => (seq, records),
            Ok(other) => {
                tracing::error!(message = ?other, "connection channel: expected a batch; no more connections will arrive");
                return Progress::Closed;
            }
            Err(e) => {
                tracing::error!(error = %e, "no more connections will arrive");
                return Progress::Closed;
            }
        };
        let (sent, got) = (records.len(), packet.fds.len());
        if let Some(left) = &mut self.fds_left {
            *left = left.saturating_sub(got);
        }
        if got < sent {
            tracing::warn!(
                taken = got,
                left = sent - got,
                reserve = FD_RESERVE,
                "short of file descriptors: took only part of a batch of connections, keeping some free for \
                 new ones; the old process keeps the rest (raise LimitNOFILE=)"
            );
        }
        let taken = got.min(sent);
        for (record, fd) in records.into_iter().zip(packet.fds) {
            match self.stream(record.kind, fd) {
                Ok(stream) => self.queue.push_back(Arrived {
                    stream,
                    state: record.state,
                    unread: record.unread,
                }),
                Err(e) => {
                    tracing::error!(error = %e, "a moved connection is not what its record says; closed")
                }
            }
        }
        // The old process closes its copies once it reads this. If it is gone, they are ours anyway.
        if let Err(e) = sys::send_packet(channel, &wire::taken(seq, taken as u16), &[]) {
            tracing::debug!(error = %e, "cannot confirm moved connections to the old process");
        }
        Progress::Received
    }

    fn stream(&self, kind: StreamKind, fd: OwnedFd) -> io::Result<ArrivedStream> {
        let info = sys::socket_info(fd.as_fd())?;
        let matches = match (kind, info) {
            (_, None) => false,
            (StreamKind::Tcp, Some(i)) => {
                i.ty == sys::SocketType::STREAM
                    && matches!(
                        i.domain,
                        sys::AddressFamily::INET | sys::AddressFamily::INET6
                    )
            }
            (StreamKind::Unix, Some(i)) => {
                i.ty == sys::SocketType::STREAM && i.domain == sys::AddressFamily::UNIX
            }
        };
        if !matches {
            return Err(io::Error::other(format!(
                "announced as {kind:?}, it is {}",
                crate::listen::describe(fd.as_fd())
            )));
        }
        sys::set_nonblocking(fd.as_fd(), self.nonblocking)?;
        Ok(match kind {
            StreamKind::Tcp => ArrivedStream::Tcp(fd.into()),
            StreamKind::Unix => ArrivedStream::Unix(fd.into()),
        })
    }
}

/// Tells the old process that this one takes connections. Returns the channel, or `None` (logged) if the
/// old process cannot be told: then nothing arrives.
pub(crate) fn announce(channel: OwnedFd) -> Option<OwnedFd> {
    let takes = wire::takes(wire::MAX_BATCH as u16);
    match sys::send_packet(channel.as_fd(), &takes, &[]) {
        Ok(()) => Some(channel),
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell the old process that this one takes connections; none will move");
            None
        }
    }
}

/// Connections moving here from the old process, in a blocking iterator: it yields each as it arrives and
/// ends when the old process has exited (at once in a process that no upgrade started). From
/// [`Upgrader::arrivals`](crate::Upgrader::arrivals).
///
/// Keep taking from it until it ends, from a thread of its own: the old process waits for each batch to be
/// taken (at most 10 s, then the connections it had sent are lost), and the connections that have arrived
/// are served by nobody until the application takes them. Dropping it closes the connections not taken yet.
#[derive(Debug)]
pub struct Arrivals {
    channel: Option<OwnedFd>,
    inbox: Inbox,
}

impl Arrivals {
    pub(crate) fn new(channel: Option<OwnedFd>) -> Arrivals {
        Arrivals {
            channel: channel.and_then(announce),
            inbox: Inbox::new(false),
        }
    }
}

impl Iterator for Arrivals {
    type Item = Arrived;

    fn next(&mut self) -> Option<Arrived> {
        loop {
            if let Some(a) = self.inbox.pop() {
                return Some(a);
            }
            let channel = self.channel.as_ref()?;
            match self.inbox.receive(channel.as_fd()) {
                Progress::Received => {}
                Progress::Closed => self.channel = None,
                Progress::WouldBlock => {
                    let mut set = sys::PollSet::new();
                    set.readable(channel.as_fd());
                    if let Err(e) = set.wait(None) {
                        tracing::warn!(error = %e, "cannot wait on the connection channel; no more connections will arrive");
                        self.channel = None;
                    }
                }
            }
        }
    }
}

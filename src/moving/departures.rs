//! The old process's side: connections handed in by the application, sent to the new process in batches by
//! a thread of their own, each answered once the new process has confirmed it (or it stayed here).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::wire::{self, Message, RecordRef, StreamKind};
use super::{Departing, NotMoved, Refusal};
use crate::sys;

/// How long a batch may wait for room in the channel, and then for the new process's `Taken`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A stream type that can move: `std::net::TcpStream`, `std::os::unix::net::UnixStream`, and with the `tokio`
/// feature `tokio::net::TcpStream` and `tokio::net::UnixStream`. Sealed.
pub trait Movable: sealed::Sealed + AsFd + Send + 'static {}

mod sealed {
    pub trait Sealed {}
}

impl sealed::Sealed for std::net::TcpStream {}
impl Movable for std::net::TcpStream {}
impl sealed::Sealed for std::os::unix::net::UnixStream {}
impl Movable for std::os::unix::net::UnixStream {}
#[cfg(feature = "tokio")]
impl sealed::Sealed for ::tokio::net::TcpStream {}
#[cfg(feature = "tokio")]
impl Movable for ::tokio::net::TcpStream {}
#[cfg(feature = "tokio")]
impl sealed::Sealed for ::tokio::net::UnixStream {}
#[cfg(feature = "tokio")]
impl Movable for ::tokio::net::UnixStream {}

/// How many connections moved, stayed and were lost so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MoveReport {
    /// Confirmed by the new process: it serves them.
    pub moved: u64,
    /// Handed back to the application ([`NotMoved`]).
    pub kept: u64,
    /// Sent to a new process that died (or stopped answering) before confirming them: closed here, counted
    /// and logged.
    pub lost: u64,
}

#[derive(Debug, Default)]
struct Counts {
    moved: AtomicU64,
    kept: AtomicU64,
    lost: AtomicU64,
}

/// Hands connections to the new process: this process's side of the connection channel, once it has handed
/// over to a process that takes connections. Cheap to clone; every clone feeds the same sender thread.
#[derive(Debug, Clone)]
pub struct Departures {
    intake: mpsc::Sender<Box<dyn Waiting>>,
    counts: Arc<Counts>,
}

/// What the sender thread does with a connection.
enum Outcome {
    Moved,
    Lost,
    Kept(Refusal),
}

/// A connection waiting in the sender thread, with its owner's answer.
trait Waiting: Send {
    fn fd(&self) -> BorrowedFd<'_>;
    fn state(&self) -> &[u8];
    fn unread(&self) -> &[u8];
    fn finish(self: Box<Self>, outcome: Outcome);
}

type Reply<S> = Box<dyn FnOnce(Result<(), NotMoved<S>>) + Send>;

/// One application connection in the sender thread. Answered exactly once: by `finish`, or by `Drop` (the
/// connection back to its owner) if the thread ends without a word.
struct Entry<S> {
    connection: Option<Departing<S>>,
    reply: Option<Reply<S>>,
}

impl<S: Movable> Waiting for Entry<S> {
    fn fd(&self) -> BorrowedFd<'_> {
        let c = self.connection.as_ref().expect("present until answered");
        c.stream.as_fd()
    }
    fn state(&self) -> &[u8] {
        self.connection.as_ref().map_or(&[], |c| &c.state)
    }
    fn unread(&self) -> &[u8] {
        self.connection.as_ref().map_or(&[], |c| &c.unread)
    }
    fn finish(mut self: Box<Self>, outcome: Outcome) {
        let (Some(connection), Some(reply)) = (self.connection.take(), self.reply.take()) else {
            return;
        };
        match outcome {
            // This process's copy of the descriptor closes: the socket lives on in the new process (a close
            // that is not the last sends nothing to the client).
            Outcome::Moved | Outcome::Lost => {
                drop(connection);
                reply(Ok(()));
            }
            Outcome::Kept(reason) => reply(Err(NotMoved { connection, reason })),
        }
    }
}

impl<S> Drop for Entry<S> {
    fn drop(&mut self) {
        if let (Some(connection), Some(reply)) = (self.connection.take(), self.reply.take()) {
            reply(Err(NotMoved {
                connection,
                reason: Refusal::Failed("the connection sender ended".to_string()),
            }));
        }
    }
}

/// Waits for the new process's `Takes` until `deadline`: the most connections per batch it takes, or `None`
/// if it takes none (it never asked in time, or is a build that predates connection moving, or is gone).
pub(crate) fn read_takes(channel: BorrowedFd<'_>, deadline: Instant) -> Option<usize> {
    let mut buf = [0u8; wire::HEADER_LEN + 16];
    let packet = loop {
        match sys::recv_packet(channel, &mut buf, 0) {
            Ok(p) => break p,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut set = sys::PollSet::new();
                set.readable(channel);
                match set.wait(Some(deadline)) {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::debug!(
                            "the new process did not ask for connections; they drain here"
                        );
                        return None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot wait on the connection channel; connections drain here");
                        return None;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "the new process takes no connections");
                return None;
            }
        }
    };
    if packet.len == 0 {
        tracing::debug!("the new process closed its connection channel; connections drain here");
        return None;
    }
    match wire::decode(&buf[..packet.len]) {
        Ok(Message::Takes { max_batch }) => Some((max_batch as usize).clamp(1, wire::MAX_BATCH)),
        Ok(other) => {
            tracing::warn!(message = ?other, "connection channel: expected Takes; connections drain here");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "connections drain here");
            None
        }
    }
}

/// The sender's half of [`Departures`], run by [`Sender::run`] on the thread that owns the channel.
pub(crate) fn departures(channel: OwnedFd, max_batch: usize) -> (Departures, Sender, Queue) {
    let (intake, queue) = mpsc::channel();
    let counts = Arc::new(Counts::default());
    let sender = Sender {
        channel,
        max_batch,
        seq: 0,
        gone: None,
        counts: counts.clone(),
    };
    (Departures { intake, counts }, sender, Queue(queue))
}

/// The connections handed in, as the sender thread takes them.
pub(crate) struct Queue(mpsc::Receiver<Box<dyn Waiting>>);

impl Departures {
    /// Starts the sender thread on `channel`, for a new process that takes `max_batch` connections a batch.
    #[cfg(test)]
    pub(crate) fn start(channel: OwnedFd, max_batch: usize) -> io::Result<Departures> {
        let (departures, mut sender, queue) = departures(channel, max_batch);
        std::thread::Builder::new()
            .name("exuvia-departures".into())
            .spawn(move || sender.run(queue))?;
        Ok(departures)
    }

    fn submit<S: Movable>(&self, connection: Departing<S>, reply: Reply<S>) {
        let entry = Entry {
            connection: Some(connection),
            reply: Some(reply),
        };
        // A thread that has ended drops the entry at once, which hands the connection back.
        let _ = self.intake.send(Box::new(entry));
    }

    /// Moves `connection` to the new process, blocking until the new process has confirmed it (a
    /// millisecond or so: connections travel in batches, so many threads may call this at once).
    ///
    /// `Ok(())`: the connection is no longer this process's; its stream was dropped here, which closes only
    /// this process's copy of the descriptor (nothing reaches the client). It moved, or it was lost with a new
    /// process that died before confirming it ([`MoveReport::lost`], logged).
    ///
    /// # Errors
    /// [`NotMoved`] with the connection, still this process's to serve or close, and the [`Refusal`].
    pub fn hand_over<S: Movable>(&self, connection: Departing<S>) -> Result<(), NotMoved<S>> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(
            connection,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        // Every entry is answered (by the thread, or by its drop); without an answer it is gone.
        rx.recv().unwrap_or(Ok(()))
    }

    /// [`hand_over`](Self::hand_over) for async code: the same, without blocking the runtime's thread.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped early, the connection is still moved (or, if it could not be, closed).
    #[cfg(feature = "tokio")]
    pub async fn hand_over_async<S: Movable>(
        &self,
        connection: Departing<S>,
    ) -> Result<(), NotMoved<S>> {
        let (tx, rx) = ::tokio::sync::oneshot::channel();
        self.submit(
            connection,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await.unwrap_or(Ok(()))
    }

    /// How many connections moved, stayed here and were lost so far.
    pub fn report(&self) -> MoveReport {
        MoveReport {
            moved: self.counts.moved.load(Ordering::Relaxed),
            kept: self.counts.kept.load(Ordering::Relaxed),
            lost: self.counts.lost.load(Ordering::Relaxed),
        }
    }
}

/// The sender thread's state.
pub(crate) struct Sender {
    channel: OwnedFd,
    max_batch: usize,
    seq: u32,
    /// Set once the new process cannot take more: every later connection stays, for this reason.
    gone: Option<Refusal>,
    counts: Arc<Counts>,
}

impl Sender {
    /// Until every [`Departures`] is dropped: takes what waits (up to a batch), sends it, answers each.
    pub(crate) fn run(&mut self, queue: Queue) {
        let queue = queue.0;
        let mut carried = None;
        loop {
            let first = match carried.take() {
                Some(w) => w,
                None => match queue.recv() {
                    Ok(w) => w,
                    Err(_) => return,
                },
            };
            let mut batch: Vec<(StreamKind, Box<dyn Waiting>)> = Vec::new();
            let mut bytes = wire::BATCH_FIXED;
            let mut next = Some(first);
            while let Some(w) = next.take() {
                match self.admit(&*w) {
                    Err(reason) => self.finish(w, Outcome::Kept(reason)),
                    Ok((_, len)) if !batch.is_empty() && bytes + len > wire::MAX_PAYLOAD => {
                        carried = Some(w);
                        break;
                    }
                    Ok((kind, len)) => {
                        bytes += len;
                        batch.push((kind, w));
                    }
                }
                if batch.len() >= self.max_batch {
                    break;
                }
                next = queue.try_recv().ok();
            }
            if !batch.is_empty() {
                self.send(batch);
            }
        }
    }

    /// Whether a connection may go: its kind and its record's length, or why it stays.
    fn admit(&self, w: &dyn Waiting) -> Result<(StreamKind, usize), Refusal> {
        if let Some(gone) = &self.gone {
            return Err(gone.clone());
        }
        let kind = match sys::socket_info(w.fd()) {
            Ok(Some(i)) if i.ty == sys::SocketType::STREAM && !i.listening => match i.domain {
                sys::AddressFamily::INET | sys::AddressFamily::INET6 => StreamKind::Tcp,
                sys::AddressFamily::UNIX => StreamKind::Unix,
                _ => return Err(Refusal::NotAConnection),
            },
            _ => return Err(Refusal::NotAConnection),
        };
        let record = RecordRef {
            kind,
            state: w.state(),
            unread: w.unread(),
        };
        record
            .check()
            .map_err(|(what, len, max)| Refusal::TooLarge { what, len, max })?;
        Ok((kind, record.len()))
    }

    fn finish(&self, w: Box<dyn Waiting>, outcome: Outcome) {
        let counter = match &outcome {
            Outcome::Moved => &self.counts.moved,
            Outcome::Lost => &self.counts.lost,
            Outcome::Kept(_) => &self.counts.kept,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        w.finish(outcome);
    }

    /// Sends one batch and answers each of its connections.
    fn send(&mut self, batch: Vec<(StreamKind, Box<dyn Waiting>)>) {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let n = batch.len();
        let sent = {
            let records: Vec<RecordRef<'_>> = batch
                .iter()
                .map(|(kind, w)| RecordRef {
                    kind: *kind,
                    state: w.state(),
                    unread: w.unread(),
                })
                .collect();
            let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|(_, w)| w.fd()).collect();
            wire::batch(seq, &records)
                .map_err(|e| Refusal::Failed(e.to_string()))
                .and_then(|packet| self.send_packet(&packet, &fds))
        };
        if let Err(reason) = sent {
            tracing::warn!(connections = n, reason = %reason, "connections not sent to the new process; they stay here");
            self.gone = Some(reason.clone());
            for (_, w) in batch {
                self.finish(w, Outcome::Kept(reason.clone()));
            }
            return;
        }
        match self.await_taken(seq) {
            Ok(taken) => {
                let taken = taken.min(n);
                if taken < n {
                    tracing::warn!(
                        taken,
                        kept = n - taken,
                        "the new process took only part of a batch of connections (out of file descriptors? \
                         raise its LimitNOFILE=): the rest stay in this process, and so do all that follow"
                    );
                    self.gone = Some(Refusal::SuccessorFull);
                }
                for (i, (_, w)) in batch.into_iter().enumerate() {
                    let outcome = if i < taken {
                        Outcome::Moved
                    } else {
                        Outcome::Kept(Refusal::SuccessorFull)
                    };
                    self.finish(w, outcome);
                }
                tracing::debug!(
                    seq,
                    taken,
                    "a batch of connections taken by the new process"
                );
            }
            Err(why) => {
                tracing::warn!(
                    connections = n,
                    "connections sent to the new process were lost: it {why} before confirming them (they are \
                     closed here; their clients see the connection end); the rest stay in this process"
                );
                self.gone = Some(Refusal::SuccessorGone);
                for (_, w) in batch {
                    self.finish(w, Outcome::Lost);
                }
            }
        }
    }

    /// Sends one packet, waiting for room up to [`ANSWER_TIMEOUT`].
    fn send_packet(&self, packet: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Refusal> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            match sys::send_packet(self.channel.as_fd(), packet, fds) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut set = sys::PollSet::new();
                    set.add(self.channel.as_fd(), sys::PollFlags::OUT);
                    match set.wait(Some(deadline)) {
                        Ok(true) => {}
                        Ok(false) => {
                            return Err(Refusal::Failed(format!(
                                "the new process took nothing for {} s",
                                ANSWER_TIMEOUT.as_secs()
                            )))
                        }
                        Err(e) => return Err(Refusal::Failed(e.to_string())),
                    }
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EPIPE) | Some(libc::ECONNRESET) | Some(libc::ENOTCONN)
                    ) =>
                {
                    return Err(Refusal::SuccessorGone)
                }
                Err(e) => return Err(Refusal::Failed(e.to_string())),
            }
        }
    }

    /// Waits for the new process's `Taken` for batch `seq`: how many it took, or what became of it.
    fn await_taken(&self, seq: u32) -> Result<usize, String> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let mut buf = [0u8; wire::HEADER_LEN + 16];
        loop {
            let packet = match sys::recv_packet(self.channel.as_fd(), &mut buf, 0) {
                Ok(p) => p,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut set = sys::PollSet::new();
                    set.readable(self.channel.as_fd());
                    match set.wait(Some(deadline)) {
                        Ok(true) => continue,
                        Ok(false) => {
                            return Err(format!(
                                "did not answer within {} s",
                                ANSWER_TIMEOUT.as_secs()
                            ))
                        }
                        Err(e) => return Err(format!("could not be waited for ({e})")),
                    }
                }
                Err(e) => return Err(format!("closed the channel ({e})")),
            };
            if packet.len == 0 {
                return Err("exited".to_string());
            }
            return match wire::decode(&buf[..packet.len]) {
                Ok(Message::Taken { seq: s, taken }) if s == seq => Ok(taken as usize),
                Ok(other) => Err(format!("answered out of turn ({other:?})")),
                Err(e) => Err(format!("answered garbage ({e})")),
            };
        }
    }
}

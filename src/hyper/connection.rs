//! One HTTP connection's life in this process: counted for the drain while its socket lives (through an
//! HTTP upgrade too), closable at the drain deadline, and what it has learnt of its protocol.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use ::tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ::tokio::sync::Notify;
use ::tokio::task::AbortHandle;

use crate::drain::ConnectionGuard;
use crate::sys::{Cut, Cuttable};

/// The connections this server has open: what the drain deadline closes.
#[derive(Debug, Default)]
pub(crate) struct Connections {
    slots: Mutex<Slots>,
    /// Woken when the last connection is gone.
    emptied: Notify,
}

#[derive(Debug, Default)]
struct Slots {
    next: u64,
    open: HashMap<u64, Slot>,
}

#[derive(Debug)]
struct Slot {
    cut: Arc<Cut>,
    task: Option<AbortHandle>,
}

impl Connections {
    /// Starts tracking `io`: it counts for the drain (`guard`) and is registered here until it is dropped,
    /// wherever it goes (into an upgraded connection's task, say).
    pub(crate) fn register<S: AsFd>(self: &Arc<Self>, io: S, guard: ConnectionGuard) -> Tracked<S> {
        let (io, cut) = Cuttable::new(io);
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let id = slots.next;
        slots.next += 1;
        slots.open.insert(id, Slot { cut, task: None });
        Tracked {
            io,
            _guard: guard,
            slot: SlotHandle {
                id,
                connections: self.clone(),
            },
        }
    }

    /// The task serving connection `id`, to abort at the deadline (a handler still running, say).
    pub(crate) fn set_task(&self, id: u64, task: AbortHandle) {
        if let Some(slot) = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
            .get_mut(&id)
        {
            slot.task = Some(task);
        }
    }

    /// Closes every connection still open: shuts its socket down (whoever holds it, the application's
    /// WebSocket task included, sees the end) and aborts its serving task. Returns how many were open.
    pub(crate) fn close_all(&self) -> usize {
        let open: Vec<(Arc<Cut>, Option<AbortHandle>)> = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
            .values()
            .map(|s| (s.cut.clone(), s.task.clone()))
            .collect();
        let mut closed = 0;
        for (cut, task) in open {
            closed += usize::from(cut.shutdown());
            if let Some(t) = task {
                t.abort();
            }
        }
        closed
    }

    fn remove(&self, id: u64) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.open.remove(&id);
        if slots.open.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    fn open(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
            .len()
    }

    /// Waits until every connection is gone (its stream dropped), at most `timeout`. Returns how many are
    /// still open then.
    pub(crate) async fn gone(&self, timeout: std::time::Duration) -> usize {
        let deadline = ::tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the check: a removal in between is not missed.
            let emptied = self.emptied.notified();
            let mut emptied = std::pin::pin!(emptied);
            emptied.as_mut().enable();
            let open = self.open();
            if open == 0 || ::tokio::time::timeout_at(deadline, emptied).await.is_err() {
                return self.open();
            }
        }
    }
}

/// An accepted stream as this server serves it: reads and writes go straight to the stream.
///
/// The fields drop in order: the socket is closed, then the drain stops counting it, then it leaves the
/// server's list (whoever waits for that list to empty then sees the drain's count final too).
#[derive(Debug)]
pub(crate) struct Tracked<S: AsFd> {
    io: Cuttable<S>,
    _guard: ConnectionGuard,
    slot: SlotHandle,
}

impl<S: AsFd> Tracked<S> {
    pub(crate) fn id(&self) -> u64 {
        self.slot.id
    }

    /// The server's list this connection is in (to register it again if it does not move).
    pub(crate) fn connections(&self) -> Arc<Connections> {
        self.slot.connections.clone()
    }

    /// The stream, to move to the new process, and the guard that keeps the drain counting it until it has
    /// moved. It leaves this server's list: the drain deadline never shuts down a socket that has moved.
    pub(crate) fn into_parts(self) -> (S, ConnectionGuard) {
        let Tracked { io, _guard, slot } = self;
        let stream = io.into_inner();
        drop(slot);
        (stream, _guard)
    }
}

/// A connection's place in [`Connections`], given up on drop.
#[derive(Debug)]
struct SlotHandle {
    id: u64,
    connections: Arc<Connections>,
}

impl Drop for SlotHandle {
    fn drop(&mut self) {
        self.connections.remove(self.id);
    }
}

impl<S: AsFd + AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io.get_mut()).poll_read(cx, buf)
    }
}

impl<S: AsFd + AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().io.get_mut()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().io.get_mut()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.get_ref().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io.get_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io.get_mut()).poll_shutdown(cx)
    }
}

/// What the serving side has learnt about one connection's protocol, and where the connection goes.
#[derive(Debug)]
pub(crate) struct Protocol {
    http2: AtomicBool,
    http2_seen: Notify,
    /// Whether the connection stays open after the last response (HTTP/1): no `close` asked or answered,
    /// not HTTP/1.0 without keep-alive. A connection that does not stay open never moves.
    keeps_open: AtomicBool,
    /// Set while the connection is being moved: its socket must not be shut down by hyper's ending.
    moving: AtomicBool,
    /// A move was refused: the connection stays here and closes as a finishing process's connections do.
    stays: AtomicBool,
    /// Requests received whose response has not been written to the end yet.
    in_flight: AtomicUsize,
    /// Woken when the last exchange in flight ends, if someone waits for that (`awaited`): a response's end
    /// costs an atomic then, not the `Notify`'s lock.
    quiet: Notify,
    awaited: AtomicBool,
}

impl Default for Protocol {
    fn default() -> Self {
        Protocol {
            http2: AtomicBool::new(false),
            http2_seen: Notify::new(),
            keeps_open: AtomicBool::new(true),
            moving: AtomicBool::new(false),
            stays: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            quiet: Notify::new(),
            awaited: AtomicBool::new(false),
        }
    }
}

impl Protocol {
    /// Called for every request on the connection.
    pub(crate) fn saw(&self, version: ::hyper::Version) {
        if version == ::hyper::Version::HTTP_2 && !self.http2.swap(true, Ordering::AcqRel) {
            // notify_one keeps a permit when nobody waits yet: the wake-up cannot be lost.
            self.http2_seen.notify_one();
        }
    }

    /// Resolves once the connection is known to speak HTTP/2 (its first request says so).
    pub(crate) async fn http2(&self) {
        if !self.http2.load(Ordering::Acquire) {
            self.http2_seen.notified().await;
        }
    }

    /// After each HTTP/1 response: whether the connection stays open after it.
    pub(crate) fn set_keeps_open(&self, open: bool) {
        self.keeps_open.store(open, Ordering::Release);
    }

    pub(crate) fn keeps_open(&self) -> bool {
        self.keeps_open.load(Ordering::Acquire)
    }

    pub(crate) fn set_moving(&self, moving: bool) {
        self.moving.store(moving, Ordering::Release);
    }

    pub(crate) fn moving(&self) -> bool {
        self.moving.load(Ordering::Acquire)
    }

    /// The connection stays here (a move was refused).
    pub(crate) fn stay(&self) {
        self.stays.store(true, Ordering::Release);
    }

    pub(crate) fn stays(&self) -> bool {
        self.stays.load(Ordering::Acquire)
    }

    /// A request received: in flight until the returned value (carried by its response's body) is dropped.
    pub(crate) fn exchange(self: &Arc<Self>) -> Exchange {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Exchange(self.clone())
    }

    /// Resolves once no exchange is in flight: between two requests. hyper then ends the connection at once
    /// when asked to, without touching a response (one whose head it writes after that adds
    /// `Connection: close` for an HTTP/1.1 client).
    pub(crate) async fn between_requests(&self) {
        // From here on, every exchange's end wakes this waiter (set before the count is read below).
        self.awaited.store(true, Ordering::SeqCst);
        loop {
            // Registered before the check: an exchange ending in between is not missed.
            let quiet = self.quiet.notified();
            let mut quiet = std::pin::pin!(quiet);
            quiet.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            quiet.await;
        }
    }
}

/// One request and its response on a connection, from the request's arrival until the response's body has
/// been written (or dropped).
#[derive(Debug)]
pub(crate) struct Exchange(Arc<Protocol>);

impl Drop for Exchange {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.0.awaited.load(Ordering::SeqCst)
        {
            self.0.quiet.notify_waiters();
        }
    }
}

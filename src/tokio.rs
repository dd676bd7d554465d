//! The Tokio layer (feature `tokio`, on by default): the same [`Upgrader`] and handover, seen from async code.
//!
//! - [`TcpIncoming`] (and [`UnixIncoming`]): an accept loop over a Tokio listener that ends (`None`) once this
//!   process has handed over or is stopping; dropping it closes this process's copy of the socket, the new
//!   process keeps its own.
//! - For HTTP, the `hyper` and `axum` features serve connections with the drain done right
//!   (`exuvia::hyper::serve`, `exuvia::axum::serve`); prefer them to a hand-written loop like the one below.
//! - [`Upgrader::finished`]: a future that resolves with why this process is finishing.
//! - [`Upgrader::upgrade_async`], [`Upgrader::drain_async`]: the blocking steps on a thread of their own
//!   (they wait on a child process and on a condition variable; not Tokio's blocking pool, whose
//!   `spawn_blocking` panics when the OS refuses a thread).
//! - [`Upgrader::handle_signals_tokio`]: SIGHUP upgrades, SIGTERM and SIGINT stop, through `tokio::signal`.
//! - [`Arrivals`] ([`Upgrader::arrivals_tokio`]): connections moving here from the old process
//!   ([`crate::moving`]); the old process hands them over with
//!   [`Departures::hand_over_async`](crate::moving::Departures::hand_over_async).
//!
//! Build the [`Upgrader`] before the runtime starts (it reads and removes environment variables, which is only
//! sound while the process has one thread), then start the runtime:
//!
//! ```no_run
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let upgrader = exuvia::Upgrader::builder().build()?;
//!     let listener = upgrader.listen_tcp("http", "127.0.0.1:8080")?;
//!     tokio::runtime::Runtime::new()?.block_on(async move {
//!         upgrader.handle_signals_tokio()?;
//!         upgrader.ready()?;
//!         let mut incoming = exuvia::tokio::TcpIncoming::new(&upgrader, listener)?;
//!         while let Some(conn) = incoming.accept().await {
//!             let Ok((stream, _peer)) = conn else { continue };
//!             let guard = upgrader.track();
//!             tokio::spawn(async move {
//!                 // ... serve `stream` ...
//!                 drop((stream, guard));
//!             });
//!         }
//!         let why = upgrader.finished().await;
//!         let report = upgrader.drain_async().await;
//!         eprintln!("{why:?}: drained {}, left {}", report.drained, report.left);
//!         Ok(())
//!     })
//! }
//! ```

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use ::tokio::io::unix::AsyncFd;
use ::tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use ::tokio::signal::unix::{signal, SignalKind};

use crate::error::{Error, Result};
use crate::lifecycle::{Finishing, Gate};
use crate::{DrainReport, Event, Finish, UpgradeReport, Upgrader};
use std::sync::Arc;

/// Runs blocking `f` on a new thread and waits for it without blocking the runtime. Unlike Tokio's
/// `spawn_blocking`, which panics when the OS refuses a thread, a refusal is an error here.
async fn off_the_runtime<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let (tx, rx) = ::tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("exuvia-{what}"))
        .spawn(move || {
            let _ = tx.send(f());
        })?;
    rx.await
        .map_err(|_| io::Error::other(format!("the {what} thread ended without an answer")))
}

/// Makes a std listener (from [`Upgrader::listen_tcp`]) a Tokio one: non-blocking first, as Tokio requires.
///
/// `O_NONBLOCK` belongs to the kernel socket, shared with the old or new process; exuvia's std accept loop
/// runs the socket non-blocking too, so this does not disturb an old process that still accepts.
pub fn listener(std: std::net::TcpListener) -> io::Result<TcpListener> {
    std.set_nonblocking(true)?;
    TcpListener::from_std(std)
}

/// Accepted connections until this process is finishing. See the [module docs](self).
#[derive(Debug)]
pub struct TcpIncoming {
    listener: TcpListener,
    finishing: AsyncFinishing,
}

impl TcpIncoming {
    /// Wraps a listener from [`Upgrader::listen_tcp`]. Needs a Tokio runtime with IO enabled.
    pub fn new(upgrader: &Upgrader, std: std::net::TcpListener) -> io::Result<TcpIncoming> {
        Ok(TcpIncoming {
            listener: listener(std)?,
            finishing: AsyncFinishing::new(upgrader.finishing_handle())?,
        })
    }

    /// The next connection, or `None` once this process hands over or stops (then drop this value).
    /// Connections still queued then are left to the process that carries on.
    ///
    /// # Cancel safety
    /// Cancel safe: dropped before it resolves (a `select!` that took another branch), it has accepted
    /// nothing, so no connection is lost; the next call (or the process that carries on) takes it from the
    /// kernel's queue.
    pub async fn accept(&mut self) -> Option<io::Result<(TcpStream, SocketAddr)>> {
        let listener = &self.listener;
        self.finishing.accept(|| listener.accept()).await
    }

    /// The local address of the listener.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Accepted Unix-socket connections until this process is finishing: [`TcpIncoming`] for a listener from
/// [`Upgrader::listen_unix`].
#[derive(Debug)]
pub struct UnixIncoming {
    listener: UnixListener,
    finishing: AsyncFinishing,
}

impl UnixIncoming {
    /// Wraps a listener from [`Upgrader::listen_unix`] (non-blocking first, as Tokio requires). Needs a Tokio
    /// runtime with IO enabled.
    pub fn new(
        upgrader: &Upgrader,
        std: std::os::unix::net::UnixListener,
    ) -> io::Result<UnixIncoming> {
        std.set_nonblocking(true)?;
        Ok(UnixIncoming {
            listener: UnixListener::from_std(std)?,
            finishing: AsyncFinishing::new(upgrader.finishing_handle())?,
        })
    }

    /// The next connection, or `None` once this process hands over or stops (then drop this value).
    ///
    /// # Cancel safety
    /// Cancel safe, as [`TcpIncoming::accept`].
    pub async fn accept(
        &mut self,
    ) -> Option<io::Result<(UnixStream, ::tokio::net::unix::SocketAddr)>> {
        let listener = &self.listener;
        self.finishing.accept(|| listener.accept()).await
    }
}

/// The finishing signal as an async readiness source, and the accept gate (shut on probation).
#[derive(Debug)]
struct AsyncFinishing {
    fd: AsyncFd<OwnedFd>,
    finishing: Finishing,
    /// The gate this loop last saw, with its change signal registered with the reactor.
    gate: Option<(Arc<Gate>, AsyncFd<OwnedFd>)>,
}

impl AsyncFinishing {
    fn new(finishing: Finishing) -> io::Result<AsyncFinishing> {
        let fd = finishing.fd().try_clone_to_owned()?;
        // The pipe is only ever polled, never read, so making it non-blocking changes nothing for the std
        // accept loops that poll the same pipe.
        crate::sys::set_nonblocking(std::os::fd::AsFd::as_fd(&fd), true)?;
        Ok(AsyncFinishing {
            fd: crate::sys::async_readable(fd)?,
            finishing,
            gate: None,
        })
    }

    /// Whether the accept gate is open now; registers its change signal when the gate is new.
    fn gate_open(&mut self) -> io::Result<bool> {
        let current = self.finishing.gate();
        if !matches!(&self.gate, Some((g, _)) if Arc::ptr_eq(g, &current)) {
            let fd = current.changed_fd().try_clone_to_owned()?;
            crate::sys::set_nonblocking(std::os::fd::AsFd::as_fd(&fd), true)?;
            let open = current.open;
            self.gate = Some((current, crate::sys::async_readable(fd)?));
            return Ok(open);
        }
        Ok(current.open)
    }

    /// Resolves once the gate last seen by [`gate_open`](Self::gate_open) is replaced.
    async fn gate_changed(&self) {
        match &self.gate {
            Some((_, fd)) => {
                let _ = fd.readable().await;
            }
            None => std::future::pending().await,
        }
    }

    /// The next accepted connection from `accept`, while the gate is open; `None` once finishing. On
    /// probation the listener is left alone (the new process takes the connections) until the gate opens
    /// again after a rollback, or the finish ends the loop.
    async fn accept<T, F, Fut>(&mut self, mut accept: F) -> Option<io::Result<T>>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = io::Result<T>>,
    {
        loop {
            // No descriptor to watch the gate with: accept as before rather than stop serving.
            let open = self.gate_open().unwrap_or(true);
            if open {
                ::tokio::select! {
                    biased;
                    _ = self.wait() => return None,
                    _ = self.gate_changed() => continue,
                    r = accept() => return Some(r),
                }
            } else {
                ::tokio::select! {
                    biased;
                    _ = self.wait() => return None,
                    _ = self.gate_changed() => continue,
                }
            }
        }
    }

    async fn wait(&self) -> Finish {
        // The finish is published before the pipe's write end is closed (the lifecycle's Publish step), so
        // once the pipe reads as readable (end of file, for good: it is never read) the reason is there to see.
        loop {
            if let Some(f) = self.finishing.get() {
                return f;
            }
            if let Err(e) = self.fd.readable().await {
                tracing::warn!(error = %e, "cannot watch the finishing signal; waiting for the event instead");
                return finish_event(&self.finishing).await;
            }
        }
    }
}

/// Waits for the finish on the lifecycle's notification (no descriptor, no thread).
async fn finish_event(finishing: &Finishing) -> Finish {
    loop {
        // Registered before the check: a finish published in between is not missed.
        let changed = finishing.events().notified();
        let mut changed = std::pin::pin!(changed);
        changed.as_mut().enable();
        if let Some(f) = finishing.get() {
            return f;
        }
        changed.await;
    }
}

/// Connections moving here from the old process ([`crate::moving`]), for async code: from
/// [`Upgrader::arrivals_tokio`]. The streams come non-blocking, ready for `tokio::net::TcpStream::from_std`
/// (or `UnixStream::from_std`).
///
/// Keep taking from it until it ends (a task of its own): the old process waits for each batch to be taken.
#[derive(Debug)]
pub struct Arrivals {
    channel: Option<AsyncFd<OwnedFd>>,
    inbox: crate::moving::Inbox,
}

impl Arrivals {
    /// The next connection, or `None` once the old process has exited (at once in a process that no upgrade
    /// started).
    ///
    /// # Cancel safety
    /// Cancel safe: a connection received is queued before this returns it, so one cancelled call loses none.
    pub async fn next(&mut self) -> Option<crate::moving::Arrived> {
        use crate::moving::Progress;
        use std::os::fd::AsFd;
        loop {
            if let Some(a) = self.inbox.pop() {
                return Some(a);
            }
            let channel = self.channel.as_ref()?;
            let mut ready = match channel.readable().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot wait on the connection channel; no more connections will arrive");
                    self.channel = None;
                    continue;
                }
            };
            match self.inbox.receive(channel.get_ref().as_fd()) {
                Progress::Received => {}
                Progress::WouldBlock => ready.clear_ready(),
                Progress::Closed => {
                    drop(ready);
                    self.channel = None;
                }
            }
        }
    }
}

impl Upgrader {
    /// [`Upgrader::departures`] for async code: waits for the new process's answer without blocking.
    ///
    /// # Cancel safety
    /// Cancel safe: it only waits.
    pub async fn departures_async(&self) -> Option<crate::moving::Departures> {
        if !matches!(self.finishing(), Some(Finish::Upgraded { .. })) {
            return None;
        }
        self.successor()?.wait_async().await
    }

    /// [`Upgrader::arrivals`] for async code: the connections the old process moves to this one. Call it
    /// inside the runtime, once, before [`ready`](Upgrader::ready) or right after (`exuvia::hyper::serve` does,
    /// as it starts).
    ///
    /// # Errors
    /// As [`Upgrader::arrivals`]; [`ErrorKind::Io`](crate::ErrorKind::Io) outside a Tokio runtime with IO
    /// enabled.
    pub fn arrivals_tokio(&self) -> Result<Arrivals> {
        let channel = match self.take_moves()?.and_then(crate::moving::announce) {
            Some(fd) => Some(crate::sys::async_readable(fd).map_err(|e| {
                Error::io(
                    "cannot wait on the connection channel (call arrivals_tokio inside a Tokio runtime with IO enabled)",
                    e,
                )
            })?),
            None => None,
        };
        Ok(Arrivals {
            channel,
            inbox: crate::moving::Inbox::new(true),
        })
    }

    /// Resolves once this process is finishing, with why: handed over to a new process, or stopping.
    ///
    /// ```no_run
    /// # async fn f(upgrader: exuvia::Upgrader) {
    /// // In a long-lived session (a WebSocket, a stream): say goodbye once this process is finishing.
    /// let why = upgrader.finished().await;
    /// # }
    /// ```
    ///
    /// For HTTP, serve with `exuvia::axum::serve` or `exuvia::hyper::serve` rather than passing this to
    /// `axum::serve(..).with_graceful_shutdown(..)` or to hyper's `graceful_shutdown`: those close HTTP/1
    /// connections that are idle at that instant, and a keep-alive client that sends its next request just then
    /// gets a reset (160 read errors over 5 upgrades under `wrk`); exuvia's serve functions answer that request
    /// with `Connection: close` instead and let the drain wait for it.
    ///
    /// # Panics
    /// Outside a Tokio runtime with IO enabled.
    ///
    /// # Cancel safety
    /// Cancel safe: it only waits; a finish is published for good, so a later call sees it.
    pub async fn finished(&self) -> Finish {
        let finishing = self.finishing_handle();
        match AsyncFinishing::new(finishing.clone()) {
            Ok(f) => f.wait().await,
            Err(_) => finish_event(&finishing).await,
        }
    }

    /// Resolves [`Builder::stream_grace`](crate::Builder::stream_grace) after this process started finishing
    /// (upgraded or stopped): the moment a long-lived stream this process still serves (a gRPC stream, a
    /// watch, a feed, a WebSocket that cannot move) should end, with a status its client understands, so that
    /// the client re-opens it on the new process well before the drain deadline cuts it. Returns why this
    /// process is finishing.
    ///
    /// [`finished`](Upgrader::finished) is the moment to stop taking new work; this one is the moment the
    /// work still running should end. Every call, whenever made, resolves at the same instant. The HTTP layer
    /// uses it to end gRPC responses with `UNAVAILABLE` (see [`crate::hyper`]); a service that streams
    /// anything else selects on it:
    ///
    /// ```no_run
    /// # async fn feed(upgrader: exuvia::Upgrader, mut next: impl FnMut() -> Option<String>) {
    /// let grace = upgrader.grace_ended();
    /// tokio::pin!(grace);
    /// loop {
    ///     tokio::select! {
    ///         _ = &mut grace => {
    ///             // Say goodbye in the protocol's own terms, then end the stream.
    ///             break;
    ///         }
    ///         _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {
    ///             let Some(_item) = next() else { break };
    ///             // ... send it
    ///         }
    ///     }
    /// }
    /// # }
    /// ```
    ///
    /// # Panics
    /// Outside a Tokio runtime with IO and time enabled.
    ///
    /// # Cancel safety
    /// Cancel safe: it only waits.
    pub async fn grace_ended(&self) -> Finish {
        // Woken by the lifecycle's notifier, not the finishing pipe: no descriptor per waiter (the HTTP layer
        // waits once per open gRPC stream).
        let finishing = self.finishing_handle();
        let finish = finish_event(&finishing).await;
        // Published with the finish, so always there once the finish is.
        let from = finishing
            .lifecycle()
            .finished_at()
            .unwrap_or_else(std::time::Instant::now);
        ::tokio::time::sleep_until((from + self.stream_grace()).into()).await;
        finish
    }

    /// [`wait_event`](Upgrader::wait_event) as a future: the next failed upgrade, or why this process is
    /// finishing. Failed upgrades count from the moment of this call, not from the first poll of the returned
    /// future, so `tokio::spawn(upgrader.next_event())` followed by an upgrade that fails always reports that
    /// failure. It waits without a thread of its own: dropping it (a `select!` that took another branch, a
    /// timeout) leaves nothing behind. It needs no runtime feature beyond `sync`.
    ///
    /// # Cancel safety
    /// Cancel safe: dropped, it has consumed nothing; a later call counts failures from its own start.
    ///
    /// ```no_run
    /// # async fn f(upgrader: exuvia::Upgrader) {
    /// loop {
    ///     match upgrader.next_event().await {
    ///         exuvia::Event::UpgradeFailed(why) => tracing::warn!(%why, "upgrade failed; still serving"),
    ///         exuvia::Event::Finishing(f) => break tracing::info!(?f, "finishing"),
    ///         _ => {}
    ///     }
    /// }
    /// # }
    /// ```
    pub fn next_event(&self) -> impl std::future::Future<Output = Event> + Send + 'static {
        let seen = self.failures_so_far();
        let u = self.clone();
        let finishing = self.finishing_handle();
        async move {
            loop {
                // Registered before the check: a wake-up between the check and the wait is not lost.
                let changed = finishing.events().notified();
                let mut changed = std::pin::pin!(changed);
                changed.as_mut().enable();
                if let Some(e) = u.current_event_after(seen) {
                    return e;
                }
                changed.await;
            }
        }
    }

    /// [`upgrade`](Upgrader::upgrade) on a thread of its own (not Tokio's blocking pool: see the module docs),
    /// awaited without blocking the runtime.
    ///
    /// ```no_run
    /// # async fn f(upgrader: exuvia::Upgrader) {
    /// if let Err(e) = upgrader.upgrade_async().await {
    ///     tracing::warn!(error = %e, "upgrade failed; still serving");
    /// }
    /// let report = upgrader.drain_async().await; // once finishing
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`upgrade`](Upgrader::upgrade); also if the OS refuses a thread to run it on.
    ///
    /// # Cancel safety
    /// Dropping the future does not cancel the upgrade: it runs to its verdict on its own thread (an upgrade
    /// cannot be abandoned half-way without killing the new process); only the report is lost. Ask
    /// [`finishing`](Upgrader::finishing) or [`next_event`](Upgrader::next_event) for the outcome.
    pub async fn upgrade_async(&self) -> Result<UpgradeReport> {
        let u = self.clone();
        off_the_runtime("upgrade", move || u.upgrade())
            .await
            .map_err(|e| Error::io("cannot start a thread for the upgrade", e))?
    }

    /// [`drain`](Upgrader::drain) on a thread of its own (it waits on a condition variable).
    ///
    /// # Cancel safety
    /// Cancel safe: a drain only waits. Dropped, its thread still waits out the drain (at most the drain
    /// timeout) and then ends; the connections are not touched either way.
    pub async fn drain_async(&self) -> DrainReport {
        let u = self.clone();
        match off_the_runtime("drain", move || u.drain()).await {
            Ok(r) => r,
            // No thread to be had: drain on this one rather than not at all.
            Err(_) => self.drain(),
        }
    }

    /// Handles SIGHUP (upgrade; one at a time, a SIGHUP during an upgrade is refused and logged), SIGTERM
    /// and SIGINT ([`shutdown`](Upgrader::shutdown)) on a task of the current runtime. Call it before
    /// [`ready`](Upgrader::ready), so that a SIGHUP never finds the process without its handler.
    ///
    /// # Errors
    /// If the signal handlers cannot be registered, or this is called outside a Tokio runtime.
    pub fn handle_signals_tokio(&self) -> Result<::tokio::task::JoinHandle<()>> {
        let reg = |k: SignalKind, name: &str| {
            signal(k).map_err(|e| {
                Error::io(format!("cannot handle {name} (inside a Tokio runtime?)"), e)
            })
        };
        let mut hup = reg(SignalKind::hangup(), "SIGHUP")?;
        let mut term = reg(SignalKind::terminate(), "SIGTERM")?;
        let mut int = reg(SignalKind::interrupt(), "SIGINT")?;
        self.watch_sighup();
        let me = self.clone();
        Ok(::tokio::spawn(async move {
            loop {
                ::tokio::select! {
                    // On a thread of its own (the upgrade waits on a child process), started with
                    // std::thread::Builder rather than Tokio's blocking pool: spawn_blocking panics when the OS
                    // refuses a thread, which would end this task and with it all signal handling.
                    Some(()) = hup.recv() => me.upgrade_on_a_thread(),
                    Some(()) = term.recv() => me.stop_signal_received(libc::SIGTERM),
                    Some(()) = int.recv() => me.stop_signal_received(libc::SIGINT),
                    else => return,
                }
            }
        }))
    }
}

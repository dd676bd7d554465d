//! Upgraded connections (WebSockets) that move to the new process with the application's session state.
//!
//! The old process wraps hyper's upgraded connection in a [`WebSocketIo`] and runs its WebSocket library
//! (tokio-tungstenite, say) over it. When the process is finishing and
//! [`Upgrader::departures_async`](crate::Upgrader::departures_async) gives somewhere to go, the session
//! hands the connection over between two messages, with its state. The new process takes
//! [`Upgrader::websocket_arrivals`] before it reports ready and resumes each session from the state: the same
//! socket, the same client, no new handshake.
//!
//! ```no_run
//! use futures_util::{SinkExt, StreamExt};
//! use tokio_tungstenite::tungstenite::{protocol::Role, Message};
//! use tokio_tungstenite::WebSocketStream;
//! use exuvia::hyper::WebSocketIo;
//!
//! // One client's session: counts its messages, in the old process and then in the new one.
//! async fn session(upgrader: exuvia::Upgrader, io: WebSocketIo, mut count: u64) {
//!     let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
//!     let mut leaving = None;
//!     let mut finishing = false;
//!     loop {
//!         if let Some(departures) = &leaving {
//!             // After a whole message: nothing of it is left in the library or in this process.
//!             if ws.get_ref().at_message_boundary() && ws.flush().await.is_ok() {
//!                 match ws.get_mut().hand_over(departures, &count.to_le_bytes()).await {
//!                     Ok(()) => return, // the new process serves it now: drop the stream
//!                     Err(_) => { let _ = ws.close(None).await; leaving = None; }
//!                 }
//!             }
//!         }
//!         tokio::select! {
//!             message = ws.next() => match message {
//!                 Some(Ok(Message::Text(text))) => {
//!                     count += 1;
//!                     let _ = ws.send(Message::text(format!("{count} {text}"))).await;
//!                 }
//!                 Some(Ok(_)) => {}
//!                 _ => return,
//!             },
//!             _ = upgrader.finished(), if !finishing => {
//!                 finishing = true;
//!                 match upgrader.departures_async().await {
//!                     Some(departures) => leaving = Some(departures),
//!                     None => { let _ = ws.close(None).await; } // no move: say goodbye
//!                 }
//!             }
//!         }
//!     }
//! }
//!
//! // The new process, before `ready()`: sessions that moved here resume from their state.
//! fn resume(upgrader: &exuvia::Upgrader) -> exuvia::Result<()> {
//!     let mut arrivals = upgrader.websocket_arrivals()?;
//!     let upgrader = upgrader.clone();
//!     tokio::spawn(async move {
//!         while let Some(arrived) = arrivals.next().await {
//!             let count = arrived.state.try_into().map(u64::from_le_bytes).unwrap_or(0);
//!             tokio::spawn(session(upgrader.clone(), arrived.io, count));
//!         }
//!     });
//!     Ok(())
//! }
//! ```
//!
//! Only connections served by [`serve`](super::serve) (or `exuvia::axum::serve`) can move: the HTTP layer
//! keeps the socket and the bytes hyper read past the upgrade request, and takes them back here.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use ::hyper::upgrade::Upgraded;
use ::tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ::tokio::net::{TcpStream, UnixStream};
use ::tokio::sync::mpsc;
use hyper_util::rt::TokioIo;

use super::connection::{Connections, Protocol};
use super::frames::Frames;
use super::moving::{ConnectionIo, Served};
use crate::error::{Error, ErrorKind, Result};
use crate::moving::{Arrived, ArrivedStream, Departing, Departures, Refusal, MAX_CONNECTION_STATE};
use crate::Upgrader;

/// The state a WebSocket connection moves with: this tag, then the application's state.
pub(crate) const WEBSOCKET_STATE: &[u8] = b"exuvia-websocket/1\n";

/// How much is read from the socket at a time.
const CHUNK: usize = 8 * 1024;

/// An upgraded WebSocket connection served by this layer, as the WebSocket library reads and writes it, and
/// able to move to the new process between two messages.
///
/// Reads give the library at most one frame at a time (see [`at_message_boundary`](Self::at_message_boundary));
/// writes go straight to the socket. After a successful [`hand_over`](Self::hand_over) reads and writes fail
/// with "moved to the new process": drop the WebSocket.
#[derive(Debug)]
pub struct WebSocketIo {
    /// `None` once handed over.
    stream: Option<Stream>,
    frames: Frames,
    /// Read from the socket (or by hyper past the upgrade request), not given to the library yet.
    buf: Vec<u8>,
    start: usize,
    eof: bool,
}

/// The socket of an upgraded connection, of the listener's kind.
#[derive(Debug)]
enum Stream {
    Tcp(Served<TcpStream>),
    Unix(Served<UnixStream>),
}

impl WebSocketIo {
    /// The connection hyper upgraded, for a request served by [`serve`](super::serve) or
    /// `exuvia::axum::serve`.
    ///
    /// # Errors
    /// The connection back, unchanged, when it was not served by this layer (it cannot move; use it as it
    /// is).
    pub fn new(upgraded: Upgraded) -> std::result::Result<WebSocketIo, Upgraded> {
        let upgraded = match upgraded.downcast::<TokioIo<Served<TcpStream>>>() {
            Ok(parts) => {
                return Ok(Self::from(
                    Stream::Tcp(parts.io.into_inner()),
                    parts.read_buf.to_vec(),
                ))
            }
            Err(upgraded) => upgraded,
        };
        match upgraded.downcast::<TokioIo<Served<UnixStream>>>() {
            Ok(parts) => Ok(Self::from(
                Stream::Unix(parts.io.into_inner()),
                parts.read_buf.to_vec(),
            )),
            Err(upgraded) => Err(upgraded),
        }
    }

    fn from(stream: Stream, read: Vec<u8>) -> WebSocketIo {
        WebSocketIo {
            stream: Some(stream),
            frames: Frames::default(),
            buf: read,
            start: 0,
            eof: false,
        }
    }

    /// Whether the library has been given whole messages only: once it has returned the last one, it holds
    /// nothing of the connection, and the connection can move. False in the middle of a frame, or between
    /// the fragments of a message.
    pub fn at_message_boundary(&self) -> bool {
        self.frames.at_message_boundary()
    }

    /// Hands the connection to the new process with `state` (the application's, for the session's
    /// resumption there: at most [`MAX_CONNECTION_STATE`] bytes less 19, put a version in it). Call it at a
    /// message boundary, once everything the library had to send is flushed, and drop the WebSocket after
    /// `Ok`. Returns once the new process has the connection.
    ///
    /// # Errors
    /// Why it did not move; the connection is still this process's, served as before:
    /// [`Refusal::MidMessage`] (not [at a message boundary](Self::at_message_boundary)),
    /// [`Refusal::NotAConnection`] (already handed over), and the reasons [`Departures::hand_over`] gives.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped early, the connection still moves (or, if it could not, is closed).
    pub async fn hand_over(
        &mut self,
        departures: &Departures,
        state: &[u8],
    ) -> std::result::Result<(), Refusal> {
        if !self.at_message_boundary() {
            return Err(Refusal::MidMessage);
        }
        let max = MAX_CONNECTION_STATE - WEBSOCKET_STATE.len();
        if state.len() > max {
            return Err(Refusal::TooLarge {
                what: "state",
                len: state.len(),
                max,
            });
        }
        let mut tagged = WEBSOCKET_STATE.to_vec();
        tagged.extend_from_slice(state);
        let read = self.buf.split_off(self.start);
        self.buf.clear();
        self.start = 0;
        let result = match self.stream.take() {
            None => return Err(Refusal::NotAConnection),
            Some(Stream::Tcp(s)) => leave(s, read, tagged, departures)
                .await
                .map_err(|(s, unread, why)| (Stream::Tcp(s), unread, why)),
            Some(Stream::Unix(s)) => leave(s, read, tagged, departures)
                .await
                .map_err(|(s, unread, why)| (Stream::Unix(s), unread, why)),
        };
        let (stream, unread, why) = match result {
            Ok(()) => return Ok(()),
            Err(kept) => kept,
        };
        // Still ours: served on from where it was.
        self.stream = Some(stream);
        self.buf = unread;
        Err(why)
    }
}

/// Hands one connection over; on refusal, gives back its stream (tracked again) and unread bytes.
async fn leave<I: ConnectionIo>(
    served: Served<I>,
    read: Vec<u8>,
    state: Vec<u8>,
    departures: &Departures,
) -> std::result::Result<(), (Served<I>, Vec<u8>, Refusal)> {
    let (connections, protocol) = served.rejoin();
    let (stream, guard, unread) = served.into_move(read.into());
    let leaving = Departing {
        stream,
        state,
        unread,
    };
    match departures.hand_over_async(leaving).await {
        Ok(()) => Ok(()),
        Err(kept) => {
            tracing::debug!(reason = %kept.reason, "a WebSocket connection stays here");
            let c = kept.connection;
            let served = Served::new(Vec::new(), connections.register(c.stream, guard), protocol);
            Err((served, c.unread, kept.reason))
        }
    }
}

fn moved() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "this WebSocket connection moved to the new process",
    )
}

impl AsyncRead for WebSocketIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            let buffered = &me.buf[me.start..];
            let give = match me.frames.may_give(buffered) {
                Some(n) if n > 0 => n,
                // The end of the stream inside a header: the library reports the truncated frame.
                _ if me.eof => buffered.len(),
                _ => 0,
            };
            if give > 0 || me.eof {
                let n = give.min(out.remaining());
                out.put_slice(&buffered[..n]);
                me.frames.gave(n);
                me.start += n;
                return Poll::Ready(Ok(()));
            }
            // More is needed for the next frame's header, or for the current frame.
            let Some(stream) = me.stream.as_mut() else {
                return Poll::Ready(Err(moved()));
            };
            me.buf.drain(..me.start);
            me.start = 0;
            let have = me.buf.len();
            me.buf.resize(have + CHUNK, 0);
            let mut read = ReadBuf::new(&mut me.buf[have..]);
            let polled = match stream {
                Stream::Tcp(s) => Pin::new(s).poll_read(cx, &mut read),
                Stream::Unix(s) => Pin::new(s).poll_read(cx, &mut read),
            };
            let n = read.filled().len();
            me.buf.truncate(have + n);
            match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => me.eof = n == 0,
            }
        }
    }
}

/// Forwards a write-side call to the socket, whichever kind it is; fails once the connection has moved.
macro_rules! forward {
    ($me:expr, $s:ident => $call:expr) => {
        match $me.get_mut().stream.as_mut() {
            Some(Stream::Tcp($s)) => $call,
            Some(Stream::Unix($s)) => $call,
            None => Poll::Ready(Err(moved())),
        }
    };
}

impl AsyncWrite for WebSocketIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        forward!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        forward!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        forward!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        forward!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// A WebSocket connection that moved here, with the state the old process's session handed over.
#[derive(Debug)]
pub struct WebSocketArrival {
    /// The connection, to run the WebSocket library over again (no handshake: it is done).
    pub io: WebSocketIo,
    /// The application's state for the session, as [`WebSocketIo::hand_over`] was given it.
    pub state: Vec<u8>,
}

/// The WebSocket connections the old process moves here ([`Upgrader::websocket_arrivals`]).
#[derive(Debug)]
pub struct WebSocketArrivals {
    rx: Option<mpsc::UnboundedReceiver<WebSocketArrival>>,
}

impl WebSocketArrivals {
    /// The next connection that moved here; `None` once the old process has exited (or this process
    /// started with no old process).
    ///
    /// # Cancel safety
    /// Cancel safe: a connection not returned stays for the next call.
    pub async fn next(&mut self) -> Option<WebSocketArrival> {
        self.rx.as_mut()?.recv().await
    }
}

/// Where [`serve`](super::serve) puts the WebSocket connections that arrive, for the application.
#[derive(Debug, Default)]
pub(crate) struct WebSocketQueue(Mutex<Queue>);

#[derive(Debug, Default)]
enum Queue {
    /// The application has not taken its arrivals (yet).
    #[default]
    Untaken,
    Taken(mpsc::UnboundedSender<WebSocketArrival>),
    /// Nothing more arrives (the old process has exited, or `serve` has ended).
    Closed,
}

impl WebSocketQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Nothing more arrives: the application's [`WebSocketArrivals`] ends.
    pub(crate) fn close(&self) {
        let old = std::mem::replace(&mut *self.lock(), Queue::Closed);
        drop(old);
    }
}

impl Upgrader {
    /// The WebSocket connections the old process moves to this one (with [`WebSocketIo::hand_over`]), for
    /// the application to resume. Call it once, before [`ready`](Upgrader::ready): a connection that arrives
    /// before is closed, with a warning. Connections arrive through [`serve`](super::serve), which must run.
    ///
    /// # Errors
    /// [`ErrorKind::AlreadyTaken`] the second time.
    pub fn websocket_arrivals(&self) -> Result<WebSocketArrivals> {
        let queue = self.websocket_queue();
        let mut q = queue.lock();
        match &*q {
            Queue::Untaken => {
                let (tx, rx) = mpsc::unbounded_channel();
                *q = Queue::Taken(tx);
                Ok(WebSocketArrivals { rx: Some(rx) })
            }
            Queue::Closed => Ok(WebSocketArrivals { rx: None }),
            Queue::Taken(_) => Err(Error::new(
                ErrorKind::AlreadyTaken,
                "the arriving WebSocket connections were already taken (Upgrader::websocket_arrivals is called once)",
            )),
        }
    }
}

/// A connection moved here whose state says it is a WebSocket: to the application, or closed.
pub(crate) fn arrived(upgrader: &Upgrader, connections: &Arc<Connections>, a: Arrived) {
    let state = a.state[WEBSOCKET_STATE.len()..].to_vec();
    let stream = match a.stream {
        ArrivedStream::Tcp(s) => TcpStream::from_std(s).map(|s| {
            let _ = s.set_nodelay(true);
            Stream::Tcp(Served::new(
                Vec::new(),
                connections.register(s, upgrader.track()),
                Arc::new(Protocol::default()),
            ))
        }),
        ArrivedStream::Unix(s) => UnixStream::from_std(s).map(|s| {
            Stream::Unix(Served::new(
                Vec::new(),
                connections.register(s, upgrader.track()),
                Arc::new(Protocol::default()),
            ))
        }),
    };
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "a WebSocket connection moved here cannot be served; closed");
            return;
        }
    };
    let arrival = WebSocketArrival {
        io: WebSocketIo::from(stream, a.unread),
        state,
    };
    let queue = upgrader.websocket_queue();
    let tx = match &*queue.lock() {
        Queue::Taken(tx) => Some(tx.clone()),
        _ => None,
    };
    match tx {
        Some(tx) => {
            if tx.send(arrival).is_err() {
                tracing::warn!(
                    "a WebSocket connection moved here after the application dropped its WebSocketArrivals; closed"
                );
            }
        }
        None => tracing::warn!(
            "a WebSocket connection moved here but the application takes none (call Upgrader::websocket_arrivals before ready); closed"
        ),
    }
}

//! HTTP with the drain done right (feature `hyper`): serve any tower service (an axum `Router`, a tonic
//! server, `tower::service_fn`) over hyper 1, through upgrades, with no request lost.
//!
//! ```no_run
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let upgrader = exuvia::Upgrader::builder().build()?; // before the runtime starts its threads
//!     let listener = upgrader.listen_tcp("http", "127.0.0.1:8080")?;
//!     tokio::runtime::Runtime::new()?.block_on(async move {
//!         upgrader.handle_signals_tokio()?;
//!         let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello\n" }));
//!         upgrader.ready()?;
//!         // Until this process hands over or stops, then drained: returns at the drain deadline at the latest.
//!         let report = exuvia::hyper::serve(&upgrader, listener, app).await?;
//!         eprintln!("drained {}, left {}", report.drained, report.left);
//!         Ok(())
//!     })
//! }
//! ```
//!
//! [`serve`] speaks HTTP/1.0, HTTP/1.1 and HTTP/2 (cleartext, with prior knowledge), told apart by the first
//! bytes of each connection (HTTP/2's preface) as hyper-util's `auto` builder does. With axum,
//! [`crate::axum::serve`] does the same and also gives handlers `ConnectInfo`.
//!
//! # What happens to connections when this process is finishing
//!
//! The accept loop ends (the new process, if any, accepts from now on), and:
//!
//! - **HTTP/1.1 and HTTP/1.0 keep-alive connections move to the new process** when it takes connections
//!   (every process serving through this function does: [`serve`] asks the old process for its connections as
//!   it starts; see [`crate::moving`]). Each moves after its current response, at once if idle, with the bytes
//!   of a pipelined next request; the response says nothing of it (no `Connection: close`; an HTTP/1.0
//!   client's says `keep-alive`), and the socket is never shut down here: the client goes on on the same
//!   connection with the new process. With a probation window
//!   ([`Builder::probation`](crate::Builder::probation)) connections stay open and served here during the
//!   window and move when it has passed; a rollback moves nothing.
//! - **HTTP/1 connections that cannot move** (after a stop; a new process that takes none, or
//!   [`Builder::move_connections(false)`](crate::Builder::move_connections); one out of descriptors): the next
//!   response is its connection's last. It carries exactly one `Connection: close` (no `keep-alive` token; an
//!   HTTP/1.0 client gets an HTTP/1.0 response, which hyper does not mark keep-alive), and the connection is
//!   closed once it is written. A keep-alive client sends its following request on a new connection, which
//!   the new process accepts.
//! - **Idle HTTP/1 connections that cannot move are not cut**: a client may send its next request on a
//!   connection that looks idle at the very moment of the handover, and closing it then loses that request
//!   (this is why hyper's own `graceful_shutdown`, which closes idle HTTP/1 connections at once, is not used to
//!   close them). They get until the drain deadline
//!   ([`Builder::drain_timeout`](crate::Builder::drain_timeout)) to send it; it is answered, as above, and the
//!   connection closed.
//! - **HTTP/2**: GOAWAY (hyper's graceful shutdown of the connection, in two steps); streams in flight
//!   complete, the client opens its next streams on a new connection. An HTTP/2 connection cannot move: its
//!   streams, flow-control windows and header tables live in this process.
//! - **gRPC streams** (HTTP/2 responses with content type `application/grpc`) still open when the stream
//!   grace has passed ([`Builder::stream_grace`](crate::Builder::stream_grace), default 5 s, counted from the
//!   moment this process started finishing) end with trailers `grpc-status: 14` (`UNAVAILABLE`, the status
//!   of a server going away) and a `grpc-message`, sent between two messages (the layer follows gRPC's
//!   length-prefixed framing). The client sees a clean end and re-opens the call on a new connection, which
//!   the new process accepts. Other long-lived responses (a feed, server-sent events) end when the service
//!   ends them: it selects on [`Upgrader::grace_ended`], the same moment, and ends them in its protocol's own
//!   terms.
//! - **Upgraded connections** (`Upgrade:`, a WebSocket): counted until the application drops the upgraded
//!   stream. The application learns that the process is finishing from [`Upgrader::finished`] and closes
//!   them politely (below).
//! - **At the drain deadline**, every connection still open is closed (its socket shut down, its task
//!   aborted), logged at WARN with the count, and counted as `left` in the returned [`DrainReport`].
//!
//! # Closing an upgraded connection politely
//!
//! ```no_run
//! use axum::extract::Request;
//! use axum::http::{header, StatusCode};
//! use axum::response::Response;
//! use hyper_util::rt::TokioIo;
//! use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
//!
//! // A line-echo protocol behind `Upgrade: echo`, that says goodbye when the process is finishing.
//! async fn echo(upgrader: exuvia::Upgrader, mut request: Request) -> Response {
//!     let on_upgrade = hyper::upgrade::on(&mut request);
//!     tokio::spawn(async move {
//!         let Ok(upgraded) = on_upgrade.await else { return };
//!         let (read, mut write) = tokio::io::split(TokioIo::new(upgraded));
//!         let mut lines = BufReader::new(read).lines();
//!         loop {
//!             tokio::select! {
//!                 line = lines.next_line() => match line {
//!                     Ok(Some(line)) => { let _ = write.write_all(format!("{line}\n").as_bytes()).await; }
//!                     _ => break,
//!                 },
//!                 _ = upgrader.finished() => {
//!                     let _ = write.write_all(b"bye\n").await;
//!                     break; // dropping the stream closes it; the drain stops counting it
//!                 }
//!             }
//!         }
//!     });
//!     Response::builder()
//!         .status(StatusCode::SWITCHING_PROTOCOLS)
//!         .header(header::CONNECTION, "upgrade")
//!         .header(header::UPGRADE, "echo")
//!         .body(axum::body::Body::empty())
//!         .unwrap()
//! }
//! ```
//!
//! # gRPC clients: re-send what never left
//!
//! Served this way, a gRPC server loses no call, but a tonic client (`Channel`, tonic 0.14) fails calls of
//! its own at every GOAWAY, from any server: a call waiting in the connection's queue when the GOAWAY arrives
//! fails with `Cancelled` (hyper's `Canceled`: never written) or `Internal` (h2 refused to open its stream
//! after the GOAWAY; in a narrow window, opened just before and reset by the client: re-send those only for
//! idempotent calls). gRPC's retry design has clients re-send these ("transparent retry", gRFC A6); tonic
//! does not. `examples/grpc_tonic.rs` shows the few lines that do, recognising the two errors by the status's
//! source.
//!
//! # Caveats
//!
//! - A request that arrives on an idle HTTP/1 connection that could not move at the very moment of the drain
//!   deadline is lost with the connection: set the deadline well above your clients' idle intervals.
//! - The service is a tower `Service` (axum's `Router` and tonic's servers are). A plain function becomes one
//!   with `tower::service_fn` (crate `tower`, feature `util`), not hyper's `service_fn`, which makes a hyper
//!   service.

mod connection;
mod frames;
mod grpc;
mod headers;
mod listener;
mod moving;
mod service;
mod upgraded;

use std::sync::Arc;
use std::time::Duration;

use ::hyper::body::Incoming;
use ::hyper::server::conn::{http1, http2};
use ::hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::error::{Error, Result};
use crate::{DrainReport, Upgrader};
use connection::{Connections, Protocol, Tracked};
use listener::sealed::Accept;
pub use listener::Listener;
use moving::ConnectionIo;
pub use service::BoxError;
use service::{AppBody, AppService, HttpService};
pub(crate) use upgraded::WebSocketQueue;
pub use upgraded::{WebSocketArrival, WebSocketArrivals, WebSocketIo};

/// Serves `service` on every connection accepted from `listener` until this process is finishing, then drains
/// (see the [module docs](self)) and returns how the drain went. Call [`Upgrader::ready`] first.
///
/// # Errors
/// If the listener cannot be registered with the Tokio runtime (called outside one, or without IO enabled).
/// Accept errors never end it: running out of descriptors is logged and retried after a short pause, a
/// connection that failed before it was accepted is skipped.
///
/// # Cancel safety
/// Not meant to be cancelled: await it to the end. Dropped early, it stops accepting (no connection is lost
/// from the kernel's queue: the next accept, or the process that carries on, takes it), but the connections
/// it serves go on in their own tasks with no drain: no `Connection: close`, no GOAWAY, no deadline.
pub async fn serve<L, S, B>(upgrader: &Upgrader, listener: L, service: S) -> Result<DrainReport>
where
    L: Listener,
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    serve_with(upgrader, listener, move |_: &_| service.clone()).await
}

/// [`serve`] with a service made for each connection from the client's address.
pub(crate) async fn serve_with<L, F, S, B>(
    upgrader: &Upgrader,
    listener: L,
    make: F,
) -> Result<DrainReport>
where
    L: Listener,
    F: Fn(&<L::Incoming as Accept>::Peer) -> S,
    S: AppService<B>,
    B: AppBody,
{
    let mut incoming = listener.into_incoming(upgrader).map_err(|e| {
        Error::io(
            "cannot serve HTTP on this listener (call serve inside a Tokio runtime with IO enabled)",
            e,
        )
    })?;
    let server = Arc::new(Server::new(upgrader));
    // Connections the old process moves here (once per process: a second `serve` finds them taken).
    let mut arrivals = match upgrader.arrivals_tokio() {
        Ok(a) => Some(a),
        Err(e) if e.kind() == crate::ErrorKind::AlreadyTaken => None,
        Err(e) => return Err(e),
    };

    // Serves one connection, accepted or moved here.
    let admit = |stream, peer: &_, first| {
        let io = server.connections.register(stream, upgrader.track());
        let id = io.id();
        let protocol = Arc::new(Protocol::default());
        let service = HttpService::new(
            make(peer),
            protocol.clone(),
            server.closing.clone(),
            Some(upgrader.clone()),
        );
        let task = ::tokio::spawn(serve_connection(
            server.clone(),
            io,
            service,
            protocol,
            first,
        ));
        server.connections.set_task(id, task.abort_handle());
    };
    // A connection the old process moved here: HTTP/1 served, a WebSocket to the application.
    let arrived = |a: crate::moving::Arrived| {
        if a.state.starts_with(upgraded::WEBSOCKET_STATE) {
            upgraded::arrived(upgrader, &server.connections, a);
        } else if let Some((stream, peer, unread)) = arrived_connection::<L::Incoming>(a) {
            admit(stream, &peer, Some(unread));
        }
    };
    loop {
        ::tokio::select! {
            accepted = incoming.next() => match accepted {
                None => break,
                Some(Ok((stream, peer))) => admit(stream, &peer, None),
                Some(Err(e)) => accept_failed(e).await,
            },
            a = next_arrival(&mut arrivals) => match a {
                Some(a) => arrived(a),
                // The old process has exited: nothing more comes.
                None => {
                    arrivals = None;
                    upgrader.websocket_queue().close();
                }
            },
        }
    }
    // This process no longer accepts; its copy of the listener closes, the new process keeps its own.
    drop(incoming);
    server.finishing_tx.send_replace(true);

    // Connections may still be arriving from the old process (an upgrade right after the one that started
    // this process): they are taken and passed on to the new process (or drained) like this process's own,
    // and the drain waits for the old process to be done.
    let mut arriving = arrivals.as_ref().map(|_| upgrader.track());
    let report = {
        let drain = upgrader.drain_async();
        let mut drain = std::pin::pin!(drain);
        loop {
            ::tokio::select! {
                report = &mut drain => break report,
                a = next_arrival(&mut arrivals), if arriving.is_some() => match a {
                    Some(a) => arrived(a),
                    None => {
                        arrivals = None;
                        arriving = None;
                        upgrader.websocket_queue().close();
                    }
                },
            }
        }
    };
    drop((arrivals, arriving));
    upgrader.websocket_queue().close();
    let closed = server.connections.close_all();
    if closed > 0 {
        tracing::warn!(
            connections = closed,
            "drain deadline reached: closed connections still open (raise the drain timeout if they were busy)"
        );
        // Their tasks end at their next poll (aborted, or woken by the shutdown): wait for the streams to be
        // dropped, so that nothing of them is left when this returns.
        let held = server.connections.gone(Duration::from_secs(1)).await;
        if held > 0 {
            tracing::warn!(
                connections = held,
                "upgraded connections still held by the application after their socket was shut down"
            );
        }
    }
    if let Some(d) = upgrader.departures() {
        let m = d.report();
        tracing::info!(
            moved = m.moved,
            kept = m.kept,
            lost = m.lost,
            "connections moved to the new process"
        );
    }
    Ok(report)
}

/// The next connection the old process moves here; `None` once it has exited; never, without arrivals.
async fn next_arrival(
    arrivals: &mut Option<crate::tokio::Arrivals>,
) -> Option<crate::moving::Arrived> {
    match arrivals.as_mut() {
        Some(a) => a.next().await,
        None => std::future::pending().await,
    }
}

/// What every connection task of one [`serve`] shares.
struct Server {
    upgrader: Upgrader,
    builder1: http1::Builder,
    builder2: http2::Builder<TokioExecutor>,
    connections: Arc<Connections>,
    /// Set by the upgrader as soon as this process lets its connections go (before the accept loop notices).
    closing: Arc<std::sync::atomic::AtomicBool>,
    /// Set once the accept loop has ended: this process is finishing.
    finishing_tx: ::tokio::sync::watch::Sender<bool>,
}

impl Server {
    fn new(upgrader: &Upgrader) -> Server {
        let mut builder1 = http1::Builder::new();
        // A timer bounds how long a client may take to send a request's head (hyper's default, 30 s).
        builder1.timer(TokioTimer::new());
        let mut builder2 = http2::Builder::new(TokioExecutor::new());
        builder2.timer(TokioTimer::new());
        Server {
            upgrader: upgrader.clone(),
            builder1,
            builder2,
            connections: Arc::new(Connections::default()),
            closing: upgrader.finishing_handle().flag(),
            finishing_tx: ::tokio::sync::watch::channel(false).0,
        }
    }
}

/// A connection the old process moved here, as the listener's stream type, if it is an HTTP/1 connection of
/// this layer and of that type (closed otherwise).
fn arrived_connection<A: Accept>(
    a: crate::moving::Arrived,
) -> Option<(A::Stream, A::Peer, Vec<u8>)> {
    if a.state != moving::HTTP1_STATE {
        tracing::warn!(
            "a connection moved here with a state this HTTP layer does not know; closed"
        );
        return None;
    }
    match A::arrived(a.stream) {
        Ok((stream, peer)) => Some((stream, peer, a.unread)),
        Err(e) => {
            tracing::warn!(error = %e, "a connection moved here cannot be served on this listener; closed");
            None
        }
    }
}

/// Serves one connection until it ends or moves: HTTP/2 gets GOAWAY once this process is finishing; HTTP/1
/// moves to the new process if it takes connections. `first`: the bytes the old process had read from a
/// connection that moved here (an HTTP/1 connection, then).
async fn serve_connection<I, S, B>(
    server: Arc<Server>,
    mut io: Tracked<I>,
    service: HttpService<S>,
    protocol: Arc<Protocol>,
    first: Option<Vec<u8>>,
) where
    I: ConnectionIo,
    S: AppService<B>,
    B: AppBody,
{
    let (speaks, first) = match first {
        Some(unread) => (moving::Speaks::Http1, unread),
        None => match moving::sniff(&mut io).await {
            Ok(Some(sniffed)) => sniffed,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "connection ended before its first request");
                return;
            }
        },
    };
    let served = moving::Served::new(first, io, protocol.clone());
    match speaks {
        moving::Speaks::Http2 => serve_http2(&server, served, service, &protocol).await,
        moving::Speaks::Http1 => serve_http1(&server, served, service, &protocol).await,
    }
}

/// HTTP/2: GOAWAY once this process is finishing (hyper's graceful shutdown); streams in flight complete.
async fn serve_http2<I, S, B>(
    server: &Server,
    served: moving::Served<I>,
    service: HttpService<S>,
    protocol: &Protocol,
) where
    I: ConnectionIo,
    S: AppService<B>,
    B: AppBody,
{
    let connection = server
        .builder2
        .serve_connection(TokioIo::new(served), service);
    let mut connection = std::pin::pin!(connection);
    let mut finishing = server.finishing_tx.subscribe();
    let goaway_due = async {
        // An error means the server's future was dropped: finishing all the same.
        let _ = finishing.wait_for(|c| *c).await;
        protocol.http2().await;
    };
    let result = ::tokio::select! {
        r = connection.as_mut() => r,
        () = goaway_due => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// HTTP/1: until the client closes, the connection is upgraded (it is the application's then), or this
/// process is finishing and its successor takes connections: then it moves after its current response.
/// A move that is refused leaves it here, served as a finishing process's connections are (closed after its
/// next response).
async fn serve_http1<I, S, B>(
    server: &Server,
    mut served: moving::Served<I>,
    service: HttpService<S>,
    protocol: &Arc<Protocol>,
) where
    I: ConnectionIo,
    S: AppService<B>,
    B: AppBody,
{
    loop {
        let mut connection = server
            .builder1
            .serve_connection(TokioIo::new(served), service.clone())
            .with_upgrades();
        let mut finishing = server.finishing_tx.subscribe();
        let move_due = async {
            let _ = finishing.wait_for(|c| *c).await;
            match protocol.stays() {
                true => None,
                false => server.upgrader.departures_async().await,
            }
        };
        let departures = ::tokio::select! {
            r = &mut connection => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            Some(d) = move_due => d,
            else => std::future::pending().await,
        };
        // Between two requests first: hyper's graceful shutdown ends an idle connection at once, but adds
        // `Connection: close` to a response whose head it writes afterwards (HTTP/1.1). The connection is not
        // polled between the check and the shutdown, so no request can start in between.
        let ended = ::tokio::select! {
            biased;
            () = protocol.between_requests() => false,
            r = &mut connection => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                true
            }
        };
        if ended {
            return;
        }
        // Ends the connection now, without shutting its socket.
        protocol.set_moving(true);
        std::pin::Pin::new(&mut connection).graceful_shutdown();
        if let Err(e) = (&mut connection).await {
            tracing::debug!(error = %e, "connection ended with an error");
            return;
        }
        // `None`: upgraded meanwhile, the application's now.
        let Some(parts) = connection.into_parts() else {
            return;
        };
        if !protocol.keeps_open() {
            // Its last response closed it: closed here, as it would have been anyway.
            tracing::debug!("not moved: its last response closed it");
            return;
        }
        let (stream, guard, unread) = parts.io.into_inner().into_move(parts.read_buf);
        let leaving = crate::moving::Departing {
            stream,
            state: moving::HTTP1_STATE.to_vec(),
            unread,
        };
        let kept = match departures.hand_over_async(leaving).await {
            Ok(()) => {
                tracing::debug!("moved");
                return;
            }
            Err(kept) => kept,
        };
        tracing::debug!(reason = %kept.reason, "a connection stays here");
        protocol.stay();
        protocol.set_moving(false);
        let c = kept.connection;
        served = moving::Served::new(
            c.unread,
            server.connections.register(c.stream, guard),
            protocol.clone(),
        );
    }
}

/// Accept errors: a connection that failed before it was accepted is skipped; a lack of descriptors or
/// memory is logged and retried after a pause (accepting again at once would spin).
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::ConnectionAborted | K::ConnectionReset | K::Interrupted | K::WouldBlock
    ) {
        tracing::debug!(error = %e, "a connection failed before it was accepted");
        return;
    }
    tracing::warn!(error = %e, "accept failed; retrying in 50 ms (out of file descriptors? raise LimitNOFILE=)");
    ::tokio::time::sleep(Duration::from_millis(50)).await;
}

#[cfg(test)]
mod tests {
    //! What goes on the wire, through hyper itself: for every request version and `Connection` header, the
    //! response never contradicts what then happens to the connection, and once finishing it always closes.

    use std::convert::Infallible;
    use std::future::{ready, Ready};
    use std::sync::atomic::AtomicBool;
    use std::task::{Context, Poll};

    use ::tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    #[derive(Clone)]
    struct Hi;

    impl tower_service::Service<Request<Incoming>> for Hi {
        type Response = Response<String>;
        type Error = Infallible;
        type Future = Ready<std::result::Result<Response<String>, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::result::Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request<Incoming>) -> Self::Future {
            ready(Ok(Response::new("hi".to_string())))
        }
    }

    fn serve(closing: bool) -> DuplexStream {
        let (client, server) = ::tokio::io::duplex(64 * 1024);
        let service = HttpService::new(
            Hi,
            Arc::new(Protocol::default()),
            Arc::new(AtomicBool::new(closing)),
            None,
        );
        ::tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(server), service)
                .await;
        });
        client
    }

    /// One response's head, read to the end of its body (`hi`). `None` at end of file.
    async fn response(c: &mut DuplexStream) -> Option<String> {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\nhi") {
            if c.read(&mut byte).await.unwrap() == 0 {
                assert!(buf.is_empty(), "cut mid-response: {buf:?}");
                return None;
            }
            buf.push(byte[0]);
        }
        Some(String::from_utf8(buf).unwrap())
    }

    fn tokens(head: &str) -> (usize, Vec<String>) {
        let lines: Vec<&str> = head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("connection:"))
            .collect();
        let tokens = lines
            .iter()
            .flat_map(|l| l[11..].split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .collect();
        (lines.len(), tokens)
    }

    #[::tokio::test]
    async fn responses_say_what_happens_to_the_connection() {
        let headers: &[&[&str]] = &[
            &[],
            &["close"],
            &["keep-alive"],
            &["Keep-Alive"],
            &["KEEP-ALIVE, te"],
            &["close, keep-alive"],
            &["keep-alive", "te"],
        ];
        for closing in [false, true] {
            for version in ["HTTP/1.0", "HTTP/1.1"] {
                for given in headers {
                    let case = format!("closing={closing} {version} {given:?}");
                    let mut request = format!("GET / {version}\r\nhost: t\r\n");
                    for h in *given {
                        request.push_str(&format!("connection: {h}\r\n"));
                    }
                    request.push_str("\r\n");
                    let mut c = serve(closing);
                    c.write_all(request.as_bytes()).await.unwrap();
                    let head = response(&mut c)
                        .await
                        .unwrap_or_else(|| panic!("{case}: no answer"));
                    let (lines, tokens) = tokens(&head);
                    let close = tokens.iter().filter(|t| *t == "close").count();
                    let keep = tokens.iter().filter(|t| *t == "keep-alive").count();
                    assert!(lines <= 1, "{case}: {lines} Connection headers:\n{head}");
                    assert!(
                        close <= 1 && !(close == 1 && keep > 0),
                        "{case}: contradiction:\n{head}"
                    );
                    // What the response says, as a client of its version reads it.
                    let says_open = if head.starts_with("HTTP/1.0") {
                        keep == 1
                    } else {
                        close == 0
                    };
                    if closing {
                        assert!(!says_open && close == 1, "{case}: not closing:\n{head}");
                        assert!(
                            head.starts_with(version),
                            "{case}: answered as another version:\n{head}"
                        );
                    }
                    if says_open {
                        // Then the connection stays open: a second request is answered.
                        c.write_all(request.as_bytes()).await.unwrap();
                        assert!(
                            response(&mut c).await.is_some(),
                            "{case}: said open, closed:\n{head}"
                        );
                    } else {
                        assert!(
                            response(&mut c).await.is_none(),
                            "{case}: said close, stayed open:\n{head}"
                        );
                    }
                }
            }
        }
    }
}

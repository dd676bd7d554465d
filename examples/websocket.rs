//! A WebSocket service whose sessions move to the new process at each upgrade: same connection, same
//! client, the session's state carried over (here, a per-client message counter).
//!
//! ```text
//! cargo run --features axum --example websocket -- --listen 127.0.0.1:8080
//! # a WebSocket client on ws://127.0.0.1:8080/ws sends text; each answer is "<text> <count> <pid>",
//! # <count> being how many messages this client has sent on this connection, whatever process answers
//! kill -HUP <pid>     # the new process takes over; every session moves to it after its current message
//! ```
//!
//! How it fits together: `GET /ws` is answered by an axum handler that does the WebSocket handshake itself
//! (hyper's upgrade, so that the connection stays exuvia's and can move) and runs tokio-tungstenite over an
//! [`exuvia::hyper::WebSocketIo`]. When this process is finishing and the new one takes connections, each
//! session hands its connection over between two messages, with its counter; the new process resumes it
//! from [`exuvia::Upgrader::websocket_arrivals`]. When connections cannot move (a stop, `--no-move`, a new
//! process that takes none), each session says goodbye with a WebSocket close frame.
//!
//! The command line is the same as `http_std`'s and `http_axum`'s (see `examples/common`).

#[path = "common/mod.rs"]
mod common;

use std::process::ExitCode;

use axum::body::Body;
use axum::extract::Request;
use axum::http::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use common::Args;
use exuvia::hyper::WebSocketIo;
use exuvia::Upgrader;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The session state a connection moves with: its version, then the counter.
const STATE_V1: u8 = 1;

fn main() -> ExitCode {
    common::main("websocket", run)
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let upgrader = common::builder(&args).build()?;
    let listener =
        upgrader.listen_tcp_with("http", args.listen.as_str(), &common::bind_options(&args))?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Runtime::new()?;
    {
        let _in_runtime = runtime.enter();
        upgrader.handle_signals_tokio()?;
        // Before ready: the old process moves its sessions once this process has reported ready.
        resume_sessions(&upgrader)?;
    }
    common::initialise(&upgrader, &args)?;
    upgrader.ready()?;
    if common::crash_later(&args) == common::Fault::Deaf {
        drop(listener);
        tracing::info!(finish = ?upgrader.wait(), "finishing (deaf)");
        return Ok(());
    }
    tracing::info!(%addr, version = %args.version, generation = upgrader.generation(), "serving");
    runtime.block_on(async move {
        let pid = std::process::id();
        let app = Router::new()
            .route("/", get(move || async move { format!("pid={pid}\n") }))
            .route("/ws", {
                let upgrader = upgrader.clone();
                get(move |request: Request| handshake(upgrader.clone(), request))
            });
        let report = exuvia::axum::serve(&upgrader, listener, app).await?;
        tracing::info!(finish = ?upgrader.finishing(), drained = report.drained, left = report.left, "finished");
        Ok(())
    })
}

/// Sessions the old process moved here carry on from their state.
fn resume_sessions(upgrader: &Upgrader) -> exuvia::Result<()> {
    let mut arrivals = upgrader.websocket_arrivals()?;
    let upgrader = upgrader.clone();
    tokio::spawn(async move {
        let mut resumed = 0u64;
        while let Some(arrived) = arrivals.next().await {
            let count = match arrived.state.split_first() {
                Some((&STATE_V1, count)) => count.try_into().map(u64::from_le_bytes).ok(),
                _ => None,
            };
            let Some(count) = count else {
                tracing::warn!(
                    "a session moved here with a state this version does not know; closed"
                );
                continue;
            };
            resumed += 1;
            tokio::spawn(session(upgrader.clone(), arrived.io, count));
        }
        tracing::info!(resumed, "sessions resumed from the old process");
    });
    Ok(())
}

/// `GET /ws`: the WebSocket handshake (RFC 6455, section 4.2.2), then the session on the upgraded connection.
async fn handshake(upgrader: Upgrader, mut request: Request) -> Response {
    let Some(key) = request.headers().get(SEC_WEBSOCKET_KEY) else {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Body::from("a WebSocket handshake is expected here\n"))
            .unwrap_or_default();
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        match WebSocketIo::new(upgraded) {
            Ok(io) => session(upgrader, io, 0).await,
            Err(_) => tracing::warn!("an upgraded connection not served by exuvia; closed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(CONNECTION, "upgrade")
        .header(UPGRADE, "websocket")
        .header(SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .unwrap_or_default()
}

/// One client's session: answers each text message with `<text> <count> <pid>`. Moves to the new process
/// between two messages once this one is finishing; says goodbye if it cannot.
async fn session(upgrader: Upgrader, io: WebSocketIo, mut count: u64) {
    let pid = std::process::id();
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    let mut leaving = None;
    let mut finishing = false;
    loop {
        if let Some(departures) = &leaving {
            if ws.get_ref().at_message_boundary() && ws.flush().await.is_ok() {
                let mut state = vec![STATE_V1];
                state.extend_from_slice(&count.to_le_bytes());
                match ws.get_mut().hand_over(departures, &state).await {
                    Ok(()) => return,
                    Err(why) => {
                        tracing::warn!(%why, "a session could not move; closing it");
                        leaving = None;
                        let _ = ws.close(Some(going_away())).await;
                    }
                }
            }
        }
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    count += 1;
                    let answer = format!("{} {count} {pid}", text.as_str());
                    if ws.send(Message::text(answer)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                // The client closed, or the connection failed.
                Some(Err(_)) | None => return,
            },
            _ = upgrader.finished(), if !finishing => {
                finishing = true;
                match upgrader.departures_async().await {
                    Some(departures) => leaving = Some(departures),
                    // Nowhere to go: a close frame; the client's answer ends the session.
                    None => {
                        let _ = ws.close(Some(going_away())).await;
                    }
                }
            }
        }
    }
}

/// The close frame of a session that ends because this process is finishing: 1001, "going away".
fn going_away() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Away,
        reason: "the service is being replaced; reconnect".into(),
    }
}

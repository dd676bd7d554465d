//! A WebSocket service written with axum's own `WebSocketUpgrade`, as most axum services write it. axum's
//! `WebSocket` owns its connection and cannot give it back, so these sessions cannot move to the new process
//! (`examples/websocket.rs` shows sessions that do). What they do instead, when this process is finishing: a
//! proper close handshake, status 1001 "going away", the client's close awaited, then the TCP close. The client
//! sees a normal close it can reconnect on (to the new process), never a reset.
//!
//! ```text
//! cargo run --features axum --example ws_axum -- --listen 127.0.0.1:8080
//! # a WebSocket client on ws://127.0.0.1:8080/ws sends text; each answer is "<text> <count> <pid>",
//! # <count> being how many messages this client has sent on this connection
//! kill -HUP <pid>     # the new process takes over; every session here closes with 1001 "going away"
//! ```
//!
//! Why the close is awaited: a server that closes its socket while the client's last messages sit unread in
//! it makes the kernel answer with a reset (RFC 1122), which the client sees as an abnormal end (1006) instead
//! of the 1001 it was sent. So the session reads (and drops) what arrives until the client's close frame, for
//! at most 5 s, and only then lets the connection go. The drain counts the session until then.
//!
//! The command line is the same as `http_std`'s and `http_axum`'s (see `examples/common`).

#[path = "common/mod.rs"]
mod common;

use std::process::ExitCode;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use common::Args;
use exuvia::Upgrader;

/// 1001, "going away" (RFC 6455, section 7.4.1): the server is going down.
const GOING_AWAY: u16 = 1001;
/// How long a session waits for the client's answer to its close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    common::main("ws_axum", run)
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Before the runtime: building the upgrader reads and removes environment variables.
    let upgrader = common::builder(&args).build()?;
    let listener =
        upgrader.listen_tcp_with("http", args.listen.as_str(), &common::bind_options(&args))?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Runtime::new()?;
    {
        let _in_runtime = runtime.enter();
        upgrader.handle_signals_tokio()?;
    }
    common::initialise(&upgrader, &args)?;
    upgrader.ready()?;
    tracing::info!(%addr, version = %args.version, generation = upgrader.generation(), "serving");
    runtime.block_on(async move {
        let pid = std::process::id();
        let app = Router::new()
            .route("/", get(move || async move { format!("pid={pid}\n") }))
            .route("/ws", {
                let upgrader = upgrader.clone();
                get(move |ws: WebSocketUpgrade| {
                    let upgrader = upgrader.clone();
                    async move { upgrade(ws, upgrader) }
                })
            });
        let report = exuvia::axum::serve(&upgrader, listener, app).await?;
        tracing::info!(finish = ?upgrader.finishing(), drained = report.drained, left = report.left, "finished");
        Ok(())
    })
}

/// `GET /ws`: axum's handshake, then the session.
fn upgrade(ws: WebSocketUpgrade, upgrader: Upgrader) -> Response {
    ws.on_upgrade(move |socket| session(socket, upgrader))
}

/// Answers each text message with "<text> <count> <pid>" until the client closes, or this process is
/// finishing: then the close handshake with 1001.
async fn session(mut socket: WebSocket, upgrader: Upgrader) {
    let pid = std::process::id();
    let mut count = 0u64;
    loop {
        tokio::select! {
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => {
                    count += 1;
                    let answer = format!("{} {count} {pid}", text.as_str());
                    if socket.send(Message::Text(answer.into())).await.is_err() {
                        return;
                    }
                }
                // The client closed (axum answers its close frame), or the connection failed.
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            _ = upgrader.finished() => break,
        }
    }
    let close = CloseFrame {
        code: GOING_AWAY,
        reason: "going away".into(),
    };
    if socket.send(Message::Close(Some(close))).await.is_err() {
        return;
    }
    // The client's close frame ends the handshake; what it sent before it had seen ours is read and dropped,
    // so that nothing is left unread when the connection closes.
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(message)) = socket.recv().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

//! An axum HTTP service that upgrades itself on SIGHUP with no connection refused or dropped: the example most
//! services will copy.
//!
//! Run it standalone:
//!
//! ```text
//! cargo run --features axum --example http_axum -- --listen 127.0.0.1:8080
//! curl -i http://127.0.0.1:8080/        # pid=<pid> version=<v>, header X-Pid
//! kill -HUP <pid>                       # a new process takes over; the old one drains and exits
//! kill -TERM <pid>                      # stop: no longer accept, drain, exit 0
//! ```
//!
//! Under systemd, use `units/exuvia-app.socket` + `units/exuvia-app.service` with `ExecStart=` pointing at the
//! built binary (`target/release/examples/http_axum`): it adopts the socket named `http`, and
//! `systemctl reload` upgrades it. The command line is the same as `http_std`'s (see `examples/common`).
//!
//! How it fits together:
//! 1. the [`Upgrader`] is built in a plain `main`, before the Tokio runtime starts its threads;
//! 2. signals are handled through `tokio::signal` before the process reports ready;
//! 3. `exuvia::axum::serve` serves the router (HTTP/1.0, HTTP/1.1, HTTP/2) until this process has handed
//!    over or is stopping, then drains: each HTTP/1 connection's next response says `Connection: close`, so
//!    keep-alive clients move to the new process after it; idle connections are served rather than cut;
//!    HTTP/2 connections get GOAWAY; everything is counted for the drain;
//! 4. `GET /echo` with `Upgrade: echo` shows an upgraded connection (the shape of a WebSocket) that says
//!    `bye` and closes once the process is finishing.

#[path = "common/mod.rs"]
mod common;

use std::process::ExitCode;

use axum::body::Body;
use axum::extract::Request;
use axum::http::header::{CONNECTION, UPGRADE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use common::Args;
use exuvia::Upgrader;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn main() -> ExitCode {
    common::main("http_axum", run)
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Before the runtime: building the upgrader reads and removes environment variables.
    let upgrader = common::builder(&args).build()?;
    let listener =
        upgrader.listen_tcp_with("http", args.listen.as_str(), &common::bind_options(&args))?;
    let addr = listener.local_addr()?;
    let _extra = common::extra_listeners(&upgrader, args.extra_listeners)?;
    let _ballast = common::ballast(args.ballast_mib);
    let _held = args
        .hold_open
        .as_deref()
        .map(common::hold_open)
        .transpose()?;
    let runtime = tokio::runtime::Runtime::new()?;
    {
        // Before reporting ready: a SIGHUP must never find this process without its handler.
        let _in_runtime = runtime.enter();
        upgrader.handle_signals_tokio()?;
    }
    common::initialise(&upgrader, &args)?;
    upgrader.ready()?;
    if common::crash_later(&args) == common::Fault::Deaf {
        drop(listener);
        tracing::info!(finish = ?upgrader.wait(), "finishing (deaf)");
        return Ok(());
    }
    tracing::info!(%addr, version = %args.version, generation = upgrader.generation(), "serving");
    runtime.block_on(serve(upgrader, listener, args.version))
}

async fn serve(
    upgrader: Upgrader,
    listener: std::net::TcpListener,
    version: String,
) -> Result<(), Box<dyn std::error::Error>> {
    let pid = std::process::id();
    let body = format!("pid={pid} version={version}\n");
    let app = Router::new()
        .route(
            "/",
            get(move || {
                let body = body.clone();
                async move { ([("x-pid", pid.to_string())], body) }
            }),
        )
        .route("/env", get(|| async { common::fd_passing_env() }))
        // Who this connection's peer is, as this process sees it (tests check that a moved connection is
        // still the same one).
        .route(
            "/peer",
            get(
                move |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<
                    std::net::SocketAddr,
                >| async move {
                    (
                        [("x-pid", pid.to_string())],
                        format!("pid={pid} peer={peer}\n"),
                    )
                },
            ),
        )
        .route("/echo", {
            let upgrader = upgrader.clone();
            get(move |req: Request| echo(upgrader.clone(), req))
        })
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n").into_response() });
    // Serves until this process hands over or stops: HTTP/1 keep-alive connections then move to the new
    // process (or, when they cannot, close after their next response), HTTP/2 connections get GOAWAY.
    let report = exuvia::axum::serve(&upgrader, listener, app).await?;
    tracing::info!(finish = ?upgrader.finishing(), drained = report.drained, left = report.left, "finished");
    Ok(())
}

/// `GET /echo` with `Upgrade: echo`: the connection becomes a line echo (the shape of a WebSocket). It stays
/// with this process after a handover, counted by the drain, until the client closes it or this process
/// says `bye` (it does so as soon as it is finishing) and closes it.
async fn echo(upgrader: Upgrader, mut request: Request) -> Response {
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let (read, mut write) = tokio::io::split(TokioIo::new(upgraded));
        let mut lines = BufReader::new(read).lines();
        let pid = std::process::id();
        loop {
            tokio::select! {
                line = lines.next_line() => match line {
                    Ok(Some(line)) => {
                        if write.write_all(format!("{line} pid={pid}\n").as_bytes()).await.is_err() {
                            break;
                        }
                    }
                    _ => break,
                },
                _ = upgrader.finished() => {
                    let _ = write.write_all(b"bye\n").await;
                    break;
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(CONNECTION, "upgrade")
        .header(UPGRADE, "echo")
        .body(Body::empty())
        .unwrap_or_default()
}

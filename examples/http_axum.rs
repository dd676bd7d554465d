//! An axum HTTP service that upgrades itself on SIGHUP with no connection refused or dropped: the example most
//! services will copy.
//!
//! Run it standalone:
//!
//! ```text
//! cargo run --example http_axum -- --listen 127.0.0.1:8080
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
//! 3. connections are accepted with [`exuvia::tokio::TcpIncoming`], which ends once this process has handed
//!    over; each is served by hyper and counted with a guard;
//! 4. once finishing, responses say `Connection: close`, so keep-alive clients move to the new process after
//!    their next request, and idle connections are served rather than cut; the drain waits for them.
//!
//! hyper's own graceful shutdown is not used on purpose: it closes connections that are open but idle at
//! that moment, and a client that sends its request on one just then sees a reset.

#[path = "common/mod.rs"]
mod common;

use std::process::ExitCode;
use std::time::Duration;

use axum::http::header::{HeaderValue, CONNECTION};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use common::Args;
use exuvia::Upgrader;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;

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
    let finishing = upgrader.clone();
    let app = Router::new()
        .route(
            "/",
            get(move || {
                let body = body.clone();
                async move { ([("x-pid", pid.to_string())], body) }
            }),
        )
        .route("/env", get(|| async { common::fd_passing_env() }))
        // Once this process is finishing, each response closes its connection: the client's next request
        // goes to a new connection, which the new process accepts.
        .layer(axum::middleware::map_response(move |mut resp: Response| {
            let closing = finishing.finishing().is_some();
            async move {
                if closing {
                    resp.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                resp
            }
        }))
        .fallback(|| async { (axum::http::StatusCode::NOT_FOUND, "not found\n").into_response() });

    let mut incoming = exuvia::tokio::TcpIncoming::new(&upgrader, listener)?;
    while let Some(conn) = incoming.accept().await {
        let (stream, _peer) = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let guard = upgrader.track();
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(guard);
        });
    }
    // This process no longer accepts; its listener copy is closed.
    drop(incoming);
    let finish = upgrader.finished().await;
    tracing::info!(?finish, "finishing");
    upgrader.drain_async().await;
    Ok(())
}

//! An axum service that replaces its own binary on SIGHUP (or `systemctl reload`) with no request lost.
//! This file is the README's Tokio example, verbatim (a test keeps the two the same). Run it:
//!   cargo run --features axum --example hello_axum -- 127.0.0.1:8080
//!   kill -HUP <pid>    # a new process takes over; the old one drains and exits
use axum::{routing::get, Router};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    // First thing in main, before the runtime starts threads: adopts inherited sockets.
    let upgrader = exuvia::Upgrader::builder().build()?;
    // Inherited from the old process when upgraded, bound fresh otherwise.
    let listener = upgrader.listen_tcp("http", addr.as_str())?;
    tokio::runtime::Runtime::new()?.block_on(async move {
        upgrader.handle_signals_tokio()?; // SIGHUP upgrades, SIGTERM/SIGINT stop
        let pid = std::process::id();
        let app = Router::new().route(
            "/",
            get(move || async move { format!("hello from pid={pid}\n") }),
        );
        // ... load configuration, warm caches: the old process serves meanwhile ...
        upgrader.ready()?; // the old process (if any) now stops accepting and hands its connections over
        println!("pid {pid} serving on http://{addr}");
        // Serves until this process hands over or stops: keep-alive HTTP/1 connections then move to the
        // new process after their current response, HTTP/2 gets GOAWAY, the rest drains.
        let report = exuvia::axum::serve(&upgrader, listener, app).await?;
        println!(
            "pid {pid} exits: drained {}, left {}",
            report.drained, report.left
        );
        Ok(())
    })
}

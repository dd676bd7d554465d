//! A Tokio line-echo server that upgrades itself on SIGHUP: the smallest complete async service.
//!
//! Run it:
//!
//! ```text
//! cargo run --example echo_tokio -- 127.0.0.1:7000
//! nc 127.0.0.1 7000                     # type lines; each comes back prefixed with the serving pid
//! kill -HUP <pid>                       # upgrade: open sessions stay with the old process until they end
//! kill -TERM <pid>                      # stop: no longer accept, wait for sessions (up to 30 s), exit
//! ```
//!
//! Under systemd, use the templates in `units/` with `FileDescriptorName=echo` in the socket unit.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".into());
    // Before the runtime starts its threads.
    let upgrader = exuvia::Upgrader::builder()
        .drain_timeout(Duration::from_secs(30))
        .build()?;
    let listener = upgrader.listen_tcp("echo", addr.as_str())?;
    tokio::runtime::Runtime::new()?.block_on(async move {
        upgrader.handle_signals_tokio()?;
        upgrader.ready()?;
        let mut incoming = exuvia::tokio::TcpIncoming::new(&upgrader, listener)?;
        tracing::info!(addr = %incoming.local_addr()?, pid = std::process::id(), "echoing");
        while let Some(conn) = incoming.accept().await {
            let Ok((stream, peer)) = conn else { continue };
            let guard = upgrader.track();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let pid = std::process::id();
                while let Ok(Some(line)) = lines.next_line().await {
                    if write
                        .write_all(format!("{pid}: {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                tracing::debug!(%peer, "session ended");
                drop(guard);
            });
        }
        let why = upgrader.finished().await;
        let report = upgrader.drain_async().await;
        tracing::info!(
            ?why,
            drained = report.drained,
            left = report.left,
            "exiting"
        );
        Ok(())
    })
}

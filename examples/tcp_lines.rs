//! A line protocol over TCP whose connections move to the new process at each upgrade, with their state.
//!
//! Every line a client sends is answered with how many lines this connection has sent so far, the pid
//! answering, and the line: `3 pid=4242 hello`. The count is the connection's state: at an upgrade, each
//! connection moves to the new process between two lines (with the count, and any bytes already read), and
//! the count carries on there. The client sees the pid change, nothing else.
//!
//! ```text
//! cargo run --example tcp_lines -- --listen 127.0.0.1:7000
//! nc 127.0.0.1 7000        # type lines; `kill -HUP <pid>` in another terminal; type more
//! ```
//!
//! std only, one thread per connection: the primitive of `exuvia::moving` without any runtime.

#[path = "common/mod.rs"]
mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::Duration;

use common::Args;
use exuvia::moving::{ArrivedStream, Departing};
use exuvia::Upgrader;

/// How long a connection may sit idle.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The version of this example's per-connection state (first byte of it).
const STATE_V1: u8 = 1;
/// The longest line accepted.
const MAX_LINE: usize = 16 * 1024;

fn main() -> ExitCode {
    common::main("tcp_lines", run)
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let upgrader = common::builder(&args).build()?;
    let listener = upgrader.listen_tcp("lines", args.listen.as_str())?;
    let addr = listener.local_addr()?;
    upgrader.handle_signals()?;
    // Before ready: this tells the old process (if an upgrade started this one) to move its connections here.
    let arrivals = upgrader.arrivals()?;
    common::initialise(&upgrader, &args)?;
    upgrader.ready()?;
    tracing::info!(%addr, generation = upgrader.generation(), "serving");

    let u = upgrader.clone();
    std::thread::spawn(move || {
        for arrived in arrivals {
            let ArrivedStream::Tcp(stream) = arrived.stream else {
                continue;
            };
            let Some(count) = decode_state(&arrived.state) else {
                tracing::warn!("a moved connection's state is not ours; closing it");
                continue;
            };
            spawn_connection(&u, stream, count, arrived.unread);
        }
    });
    for stream in upgrader.incoming(listener) {
        match stream {
            Ok(s) => spawn_connection(&upgrader, s, 0, Vec::new()),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    tracing::info!(finish = ?upgrader.finishing(), "finishing");
    let report = upgrader.drain();
    if let Some(d) = upgrader.departures() {
        let m = d.report();
        tracing::info!(
            moved = m.moved,
            kept = m.kept,
            lost = m.lost,
            "connections moved"
        );
    }
    tracing::info!(drained = report.drained, left = report.left, "drained");
    Ok(())
}

fn encode_state(count: u64) -> Vec<u8> {
    let mut s = vec![STATE_V1];
    s.extend_from_slice(&count.to_le_bytes());
    s
}

fn decode_state(state: &[u8]) -> Option<u64> {
    match state {
        [STATE_V1, rest @ ..] => Some(u64::from_le_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

fn spawn_connection(upgrader: &Upgrader, stream: TcpStream, count: u64, unread: Vec<u8>) {
    let guard = upgrader.track();
    let u = upgrader.clone();
    let spawned = std::thread::Builder::new().spawn(move || {
        let _guard = guard;
        if let Err(e) = serve(&u, stream, count, unread) {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a thread for a connection; closed");
    }
}

/// Serves one connection until the client closes, or it moves to the new process.
fn serve(
    upgrader: &Upgrader,
    stream: TcpStream,
    mut count: u64,
    mut pending: Vec<u8>,
) -> io::Result<()> {
    let pid = std::process::id();
    let mut stream = Some(stream);
    // Once this process is finishing with nowhere to move to, it serves its connections until they close.
    let mut finishing_seen = false;
    let mut buf = [0u8; 4096];
    loop {
        let s = stream.as_ref().expect("kept until it moves");
        // Every complete line read so far is answered before anything else: a boundary of the protocol.
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            count += 1;
            let text = String::from_utf8_lossy(&line);
            (&*s).write_all(format!("{count} pid={pid} {}\n", text.trim_end()).as_bytes())?;
        }
        if pending.len() > MAX_LINE {
            return Ok(());
        }
        match common::wait_readable(upgrader, s, finishing_seen, IDLE_TIMEOUT)? {
            common::Woken::Idle => return Ok(()),
            common::Woken::Finishing => {
                finishing_seen = true;
                let Some(departures) = upgrader.departures() else {
                    continue;
                };
                let leaving = Departing {
                    stream: stream.take().expect("kept until it moves"),
                    state: encode_state(count),
                    unread: std::mem::take(&mut pending),
                };
                match departures.hand_over(leaving) {
                    Ok(()) => return Ok(()),
                    Err(kept) => {
                        tracing::warn!(reason = %kept.reason, "a connection stays here");
                        stream = Some(kept.connection.stream);
                        pending = kept.connection.unread;
                    }
                }
            }
            common::Woken::Readable => {
                let n = (&*s).read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                pending.extend_from_slice(&buf[..n]);
            }
        }
    }
}

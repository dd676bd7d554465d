//! What the HTTP layer costs when nothing is upgrading: the README's axum service served by
//! `exuvia::axum::serve` against the same service on plain `axum::serve`, under closed-loop `wrk`, in
//! interleaved pairs of rounds in one run (pairing neighbours cancels the machine's drift).
//!
//! ```text
//! cargo run --release --features axum --example http_cost                  # 7 pairs of 3 s rounds
//! cargo run --release --features axum --example http_cost -- --rounds 3 --secs 2 --connections 32
//! ```
//!
//! Each round starts a fresh server process (this program with `--serve plain|exuvia ADDR`), waits until it
//! answers, runs `wrk -t1 -c<connections> -d<secs>s --latency`, and stops it. Prints throughput and p50/p99
//! per round, then the medians over the pairs of exuvia's throughput and p99 relative to plain axum's.
//! Needs `wrk` (Debian: `apt install wrk`).

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use axum::{routing::get, Router};

fn app() -> Router {
    let pid = std::process::id();
    Router::new().route(
        "/",
        get(move || async move { format!("hello from pid={pid}\n") }),
    )
}

/// `--serve plain|exuvia ADDR`: one server process of a round.
fn serve(kind: &str, addr: &str) -> Result<(), Box<dyn std::error::Error>> {
    let upgrader = exuvia::Upgrader::builder().build()?;
    let listener = upgrader.listen_tcp("http", addr)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        upgrader.handle_signals_tokio()?;
        upgrader.ready()?;
        if kind == "plain" {
            let listener = tokio::net::TcpListener::from_std({
                listener.set_nonblocking(true)?;
                listener
            })?;
            axum::serve(listener, app())
                .with_graceful_shutdown(async move {
                    upgrader.finished().await;
                })
                .await?;
        } else {
            exuvia::axum::serve(&upgrader, listener, app()).await?;
        }
        Ok(())
    })
}

/// One round's figures: requests per second, p50 and p99 in ms.
#[derive(Debug, Clone, Copy)]
struct Round {
    rps: f64,
    p50: f64,
    p99: f64,
}

/// wrk's `Requests/sec:` and its latency distribution's 50% and 99% lines.
fn parse_wrk(out: &str) -> Option<Round> {
    let ms = |v: &str| -> Option<f64> {
        let v = v.trim();
        if let Some(us) = v.strip_suffix("us") {
            return us.parse::<f64>().ok().map(|x| x / 1000.0);
        }
        if let Some(m) = v.strip_suffix("ms") {
            return m.parse().ok();
        }
        v.strip_suffix('s')?.parse::<f64>().ok().map(|x| x * 1000.0)
    };
    let line = |prefix: &str| {
        out.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix).map(str::to_string))
    };
    Some(Round {
        rps: line("Requests/sec:")?.trim().parse().ok()?,
        p50: ms(&line("50%")?)?,
        p99: ms(&line("99%")?)?,
    })
}

fn free_addr() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Starts a server of `kind` and waits until it answers.
fn start(kind: &str, addr: SocketAddr) -> Result<Child, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let child = Command::new(me)
        .args(["--serve", kind, &addr.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the {kind} server: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return Err(format!(
                "the {kind} server did not listen on {addr} within 10 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(child)
}

fn stop(mut child: Child) {
    // SAFETY: kill with a pid we started and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

fn round(kind: &str, secs: u64, connections: usize) -> Result<Round, String> {
    let addr = free_addr().map_err(|e| e.to_string())?;
    let child = start(kind, addr)?;
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{secs}s"),
            "--latency",
        ])
        .arg(format!("http://{addr}/"))
        .output();
    stop(child);
    let out = out.map_err(|e| format!("cannot run wrk (apt install wrk): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if text.contains("Socket errors") || text.contains("Non-2xx") {
        return Err(format!("wrk saw errors against {kind}:\n{text}"));
    }
    parse_wrk(&text).ok_or_else(|| format!("cannot read wrk's output:\n{text}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--serve") {
        let (Some(kind), Some(addr)) = (args.get(1), args.get(2)) else {
            eprintln!("http_cost: --serve plain|exuvia ADDR");
            return ExitCode::from(2);
        };
        return match serve(kind, addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("http_cost server: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let (mut rounds, mut secs, mut connections) = (7usize, 3u64, 32usize);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = it.next().and_then(|v| v.parse::<u64>().ok());
        match (a.as_str(), value) {
            ("--rounds", Some(v)) if v > 0 => rounds = v as usize,
            ("--secs", Some(v)) if v > 0 => secs = v,
            ("--connections", Some(v)) if v > 0 => connections = v as usize,
            _ => {
                eprintln!("http_cost: options are --rounds N, --secs S, --connections N");
                return ExitCode::from(2);
            }
        }
    }
    println!("wrk -t1 -c{connections} -d{secs}s, {rounds} pairs (plain axum::serve, then exuvia::axum::serve):");
    let (mut rps, mut p99) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let pair = round("plain", secs, connections)
            .and_then(|p| Ok((p, round("exuvia", secs, connections)?)));
        let (plain, ours) = match pair {
            Ok(p) => p,
            Err(e) => {
                eprintln!("http_cost: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!(
            "pair {i}: plain {:.0} req/s p50 {:.3} p99 {:.3} ms | exuvia {:.0} req/s p50 {:.3} p99 {:.3} ms",
            plain.rps, plain.p50, plain.p99, ours.rps, ours.p50, ours.p99
        );
        rps.push(ours.rps / plain.rps);
        p99.push(ours.p99 / plain.p99);
    }
    println!(
        "exuvia::axum::serve / axum::serve, median over {rounds} pairs: throughput {:.3} x, p99 {:.3} x",
        median(rps),
        median(p99)
    );
    ExitCode::SUCCESS
}

//! Reload under load, measured: exuvia's upgrade against the two ways services are usually replaced, on the same
//! server, the same load and the same machine, in one run.
//!
//! ```text
//! cargo run --release --example bench                 # all scenarios, a table
//! cargo run --release --example bench -- --upgrades 20 --clients 6
//! ```
//!
//! Scenarios (all run `examples/http_std.rs` on one fixed 127.0.0.1 port):
//! - `exuvia-sighup`: SIGHUP; the new process inherits the socket, the old one drains;
//! - `naive-restart`: SIGTERM, wait for exit, start the new process (the baseline that refuses connections);
//! - `reuseport-overlap`: start the new process on the same port with SO_REUSEPORT, then SIGTERM the old one
//!   (the baseline that resets connections queued on the old socket).
//!
//! Load: half the clients open a new connection per request, half keep one connection alive (reconnecting when
//! the server says `connection: close`), each paced at one request per `--pace-ms`; plus idle connections opened
//! before each replacement that send their request after it. Figures: requests ok, failures by kind, latency
//! p50/p99/p999 in steady state and during replacements (from the trigger until the new process serves and the
//! old one is gone), and the time from the trigger to the first response from the new process.
//!
//! Stops by itself, uses only 127.0.0.1, leaves no process behind. This is a first cut of the instrument: the
//! systemd scenario, the overhead and scaling figures and the soak are still to come (see the project's issue).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{FailKind, Idle, Load, Server, Stats};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    ExuviaSighup,
    NaiveRestart,
    ReuseportOverlap,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::ExuviaSighup => "exuvia-sighup",
            Scenario::NaiveRestart => "naive-restart",
            Scenario::ReuseportOverlap => "reuseport-overlap",
        }
    }
}

struct Options {
    upgrades: usize,
    clients: usize,
    pace: Duration,
    idle: usize,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        upgrades: 10,
        clients: 8,
        pace: Duration::from_millis(2),
        idle: 8,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> Result<u64, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{what} needs a number"))
        };
        match a.as_str() {
            "--upgrades" => o.upgrades = num("--upgrades")? as usize,
            "--clients" => o.clients = num("--clients")?.max(2) as usize,
            "--pace-ms" => o.pace = Duration::from_millis(num("--pace-ms")?),
            "--idle" => o.idle = num("--idle")? as usize,
            _ => {
                return Err(format!(
                    "unknown argument {a:?}; see the header of examples/bench.rs"
                ))
            }
        }
    }
    Ok(o)
}

struct Outcome {
    scenario: Scenario,
    stats: Stats,
    windows: Vec<(Instant, Instant)>,
    to_first_response: Vec<Duration>,
}

fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[i])
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64() * 1000.0))
}

/// Waits (by polling new connections) until `pid` answers; returns when it first did.
fn first_response_from(addr: std::net::SocketAddr, pred: impl Fn(u32) -> bool) -> Option<Instant> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok((r, _)) = support::get(addr, "/") {
            if pred(r.pid) {
                return Some(Instant::now());
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn run(scenario: Scenario, o: &Options, bin: &std::path::Path) -> Outcome {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--drain-timeout", "10"];
    if scenario == Scenario::ReuseportOverlap {
        args.push("--reuseport");
    }
    let mut servers = vec![Server::start_on(bin, &listen, &args)];
    let addr = servers[0].addr;
    let load = Load::start(addr, o.clients / 2, o.clients - o.clients / 2, o.pace);
    load.wait_progress(2000); // steady state first
    let mut windows = Vec::new();
    let mut to_first = Vec::new();
    let mut idle_stats = Stats::default();
    for _ in 0..o.upgrades {
        load.wait_progress(1500);
        let idle = Idle::open(addr, o.idle);
        let old = servers.last().unwrap().current();
        let t0 = Instant::now();
        // Idle clients send their request while the replacement is under way: once the new process serves
        // (exuvia, overlap), or right after the stop signal (naive: nothing new can serve before the old exits).
        let (first, idle_done) = match scenario {
            Scenario::ExuviaSighup => {
                let s = servers.last_mut().unwrap();
                let new = s
                    .upgrade_started()
                    .unwrap_or_else(|e| panic!("upgrade failed: {e}"));
                let at = first_response_from(addr, |p| p == new);
                let idle_done = idle.finish();
                support::wait_gone(old, Duration::from_secs(30));
                (at, idle_done)
            }
            Scenario::NaiveRestart => {
                support::signal(old, libc::SIGTERM);
                let idle_done = idle.finish();
                support::wait_gone(old, Duration::from_secs(30));
                let s = Server::start_on(bin, &listen, &args);
                let new = s.current();
                servers.push(s);
                (first_response_from(addr, |p| p == new), idle_done)
            }
            Scenario::ReuseportOverlap => {
                let s = Server::start_on(bin, &listen, &args);
                let new = s.current();
                servers.push(s);
                let at = first_response_from(addr, |p| p == new);
                support::signal(old, libc::SIGTERM);
                let idle_done = idle.finish();
                support::wait_gone(old, Duration::from_secs(30));
                (at, idle_done)
            }
        };
        idle_stats.merge(idle_done);
        windows.push((t0, Instant::now()));
        if let Some(at) = first {
            to_first.push(at - t0);
        }
    }
    load.wait_progress(1500);
    let mut stats = load.stop();
    stats.merge(idle_stats);
    if let Some(s) = servers.last() {
        s.stop();
    }
    drop(servers); // kills and reaps anything left
    Outcome {
        scenario,
        stats,
        windows,
        to_first_response: to_first,
    }
}

fn main() -> std::process::ExitCode {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let bin = support::example("http_std");
    println!(
        "load: {} clients ({} new connection per request, {} keep-alive), one request per {} ms each, {} idle \
         connections per replacement; {} replacements per scenario; {} cores",
        o.clients,
        o.clients / 2,
        o.clients - o.clients / 2,
        o.pace.as_millis(),
        o.idle,
        o.upgrades,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut outcomes = Vec::new();
    for s in [
        Scenario::ExuviaSighup,
        Scenario::NaiveRestart,
        Scenario::ReuseportOverlap,
    ] {
        eprintln!("running {} ...", s.name());
        outcomes.push(run(s, &o, &bin));
    }
    println!(
        "\n{:<18} {:>8} {:>7} {:>8} {:>6} {:>8} {:>6} {:>6} | {:>24} | {:>24} | {:>10}",
        "scenario",
        "ok",
        "failed",
        "refused",
        "reset",
        "timeout",
        "short",
        "other",
        "steady p50/p99/p999 ms",
        "during p50/p99/p999 ms",
        "to new ms"
    );
    let mut exuvia_clean = true;
    for out in &outcomes {
        let count = |k: FailKind| out.stats.failures.iter().filter(|(f, _)| *f == k).count();
        let during = |t: Instant| out.windows.iter().any(|(a, b)| t >= *a && t <= *b);
        let mut steady: Vec<Duration> = out
            .stats
            .latencies
            .iter()
            .filter(|(t, _)| !during(*t))
            .map(|(_, d)| *d)
            .collect();
        let mut busy: Vec<Duration> = out
            .stats
            .latencies
            .iter()
            .filter(|(t, _)| during(*t))
            .map(|(_, d)| *d)
            .collect();
        steady.sort();
        busy.sort();
        let mut first = out.to_first_response.clone();
        first.sort();
        let failed = out.stats.failures.len();
        if out.scenario == Scenario::ExuviaSighup && failed > 0 {
            exuvia_clean = false;
        }
        println!(
            "{:<18} {:>8} {:>7} {:>8} {:>6} {:>8} {:>6} {:>6} | {:>24} | {:>24} | {:>10}",
            out.scenario.name(),
            out.stats.ok,
            failed,
            count(FailKind::Refused),
            count(FailKind::Reset),
            count(FailKind::Timeout),
            count(FailKind::ShortRead),
            count(FailKind::BadResponse) + count(FailKind::Other),
            format!(
                "{}/{}/{}",
                ms(percentile(&steady, 0.5)),
                ms(percentile(&steady, 0.99)),
                ms(percentile(&steady, 0.999))
            ),
            format!(
                "{}/{}/{}",
                ms(percentile(&busy, 0.5)),
                ms(percentile(&busy, 0.99)),
                ms(percentile(&busy, 0.999))
            ),
            ms(percentile(&first, 0.5)),
        );
    }
    println!(
        "\n(baselines must show failures: that is how we know the instrument sees them; 'to new' is the median time \
         from the trigger to the first response from the new process)"
    );
    if exuvia_clean {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

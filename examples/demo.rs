//! The demo: an HTTP server upgraded six times under load, one upgrade failing on purpose, with a report.
//!
//! ```text
//! cargo run --release --example demo
//! ```
//!
//! It builds and starts `examples/http_std.rs`, drives it from many connections (a new connection per request,
//! keep-alive connections, and idle connections opened before each upgrade that send their request after it),
//! sends SIGHUP six times (the fourth new process exits with status 3 during initialisation: the old one must
//! keep serving), then stops the server and prints what happened. Needs no systemd and no setup; it uses only
//! 127.0.0.1, finishes in well under a minute, and leaves no process behind. Exit status 0 means no request
//! failed.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use support::{FailKind, Idle, Load, Server, Stats};

const FRESH_CLIENTS: usize = 8;
const KEEPALIVE_CLIENTS: usize = 8;
const IDLE_PER_UPGRADE: usize = 10;
const UPGRADES: usize = 6;
const FAILING_UPGRADE: usize = 4; // 1-based
const PACE: Duration = Duration::from_millis(1);
const REQUESTS_BETWEEN_UPGRADES: u64 = 4000;

/// Builds http_std in this demo's profile (a no-op when it is fresh) and returns its path.
fn http_std() -> Result<std::path::PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot locate the demo binary: {e}"))?;
    let dir = me.parent().ok_or("the demo binary has no directory")?;
    let path = dir.join("http_std");
    let release = dir
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--quiet", "--example", "http_std"]);
    if release {
        cmd.arg("--release");
    }
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) if path.exists() => eprintln!("demo: `cargo build --example http_std` failed ({s}); using the existing binary"),
        Ok(s) => return Err(format!("`cargo build --example http_std` failed ({s}); run it by hand to see why")),
        Err(e) if path.exists() => eprintln!("demo: cannot run {cargo} ({e}); using the existing http_std"),
        Err(e) => return Err(format!("cannot run {cargo} to build http_std ({e}); build it with `cargo build --release --example http_std`")),
    }
    Ok(path)
}

struct Upgrade {
    n: usize,
    from: u32,
    outcome: Result<u32, String>,
    took: Duration,
    at: Duration,
}

fn main() -> ExitCode {
    let bin = match http_std() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = std::env::temp_dir().join(format!("exuvia-demo-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("demo: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let fault = dir.join("init-fault");
    let fault_arg = fault.to_string_lossy().to_string();
    let mut server = Server::start(
        &bin,
        &[
            "--init-fault",
            &fault_arg,
            "--init-delay-ms",
            "100",
            "--ready-timeout",
            "5",
            "--drain-timeout",
            "10",
        ],
    );
    let t0 = Instant::now();
    let first = server.current();
    println!("exuvia demo");
    println!(
        "  server: {} (pid {first}) on {}; each new process spends 100 ms initialising",
        bin.display(),
        server.addr
    );
    println!(
        "  load:   {FRESH_CLIENTS} clients with a new connection per request, {KEEPALIVE_CLIENTS} keep-alive clients, \
         and {IDLE_PER_UPGRADE} idle connections opened before each upgrade that send after it"
    );
    println!("  plan:   {UPGRADES} upgrades by SIGHUP; the new process of upgrade {FAILING_UPGRADE} exits with status 3 on purpose\n");

    let load = Load::start(server.addr, FRESH_CLIENTS, KEEPALIVE_CLIENTS, PACE);
    let mut idle_stats = Stats::default();
    let mut upgrades = Vec::new();
    for n in 1..=UPGRADES {
        load.wait_progress(REQUESTS_BETWEEN_UPGRADES);
        let failing = n == FAILING_UPGRADE;
        if failing {
            let _ = std::fs::write(&fault, "fail");
        }
        let idle = Idle::open(server.addr, IDLE_PER_UPGRADE);
        let from = server.current();
        let at = t0.elapsed();
        let start = Instant::now();
        let outcome = server.upgrade_started();
        let took = start.elapsed();
        idle_stats.merge(idle.finish());
        if failing {
            let _ = std::fs::remove_file(&fault);
        }
        match &outcome {
            Ok(to) => println!(
                "  upgrade {n}: pid {from} -> {to}, serving after {} ms",
                took.as_millis()
            ),
            Err(line) => println!(
                "  upgrade {n}: refused, pid {from} serves on ({})",
                reason(line)
            ),
        }
        upgrades.push(Upgrade {
            n,
            from,
            outcome,
            took,
            at,
        });
    }
    load.wait_progress(REQUESTS_BETWEEN_UPGRADES);
    let mut stats = load.stop();
    stats.merge(idle_stats);
    let last = server.current();
    server.stop();
    let all_gone = server
        .generations
        .iter()
        .all(|&p| support::wait_gone(p, Duration::from_secs(15)));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);

    let count = |k: FailKind| stats.failures.iter().filter(|(f, _)| *f == k).count();
    let ok_upgrades = upgrades.iter().filter(|u| u.outcome.is_ok()).count();
    println!(
        "\nrequests: {} sent, {} ok, {} failed",
        stats.ok + stats.failures.len() as u64,
        stats.ok,
        stats.failures.len()
    );
    println!(
        "  failed by kind: refused {}, reset {}, timeout {}, short read {}, bad response {}, other {}",
        count(FailKind::Refused),
        count(FailKind::Reset),
        count(FailKind::Timeout),
        count(FailKind::ShortRead),
        count(FailKind::BadResponse),
        count(FailKind::Other)
    );
    println!("pids that served, and when each took over:");
    println!("  {first} from 0.0 s (started)");
    for u in &upgrades {
        if let Ok(to) = u.outcome {
            println!(
                "  {to} from {:.1} s (upgrade {} from {}, {} ms)",
                (u.at + u.took).as_secs_f64(),
                u.n,
                u.from,
                u.took.as_millis()
            );
        }
    }
    println!(
        "  {} distinct pids answered requests; pid {last} was stopped with SIGTERM at the end",
        stats.pids.len()
    );
    println!(
        "processes left behind: {}",
        if all_gone { "none" } else { "SOME (see above)" }
    );
    let pass = stats.failures.is_empty() && ok_upgrades == UPGRADES - 1 && all_gone;
    println!(
        "\nresult: {} ({} failed requests across {ok_upgrades} successful upgrades and {} refused one(s), in {:.1} s)",
        if pass { "PASS" } else { "FAIL" },
        stats.failures.len(),
        UPGRADES - ok_upgrades,
        t0.elapsed().as_secs_f64()
    );
    for (k, msg) in stats.failures.iter().take(10) {
        println!("  failure: {k:?}: {msg}");
    }
    if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The `error=` field of an "upgrade failed" log line (it runs to the end of the line).
fn reason(line: &str) -> String {
    line.split_once("error=")
        .map_or(line, |(_, r)| r)
        .trim()
        .to_string()
}

//! Reload under load, measured: exuvia's upgrade against the two ways services are usually replaced, on the
//! same server, the same load and the same machine, in one run; then the handover's cost with 1, 100 and
//! 1,000 sockets, the Tokio layer's accept overhead, and a soak of consecutive upgrades.
//!
//! ```text
//! cargo run --release --example bench                  # everything, a table (about three minutes)
//! cargo run --release --example bench -- --json        # the same figures as JSON on stdout (table on stderr)
//! cargo run --release --example bench -- --upgrades 100 --soak 2000 --load 0.8
//! ```
//!
//! Scenarios (all run `examples/http_std.rs` on one fixed 127.0.0.1 port):
//! - `control`: no replacement at all, everything else the same (the idle clients send, the memory sampler
//!   runs, an 8 ms window): what the benchmark's own activity does to the latency in a window, the floor
//!   for the replacements' "p99 x";
//! - `exuvia-sighup`: SIGHUP; the new process inherits the socket, the old one's keep-alive connections move
//!   to it;
//! - `exuvia-sighup-drain`: the same with connections draining instead of moving (`--no-move`: each keep-alive
//!   connection is closed after its next response and its client reconnects);
//! - `exuvia-sighup-bg`: the same with background initialisation (`Builder::background_initialisation`: the
//!   new process starts at idle CPU priority until it reports ready; it needs root or `CAP_SYS_NICE`, and
//!   says so and runs at normal priority otherwise);
//! - `exuvia-systemctl`: `systemctl reload` of the shipped `Type=notify-reload` unit and socket templates
//!   under a real systemd booted in a private namespace (as the tests do; needs root and systemd 253+:
//!   skipped with the reason otherwise, and a failure when `CI` is set);
//! - `naive-restart`: SIGTERM, wait for exit, start the new process (the baseline that refuses connections);
//! - `reuseport-overlap`: start the new process on the same port with SO_REUSEPORT, then SIGTERM the old one
//!   (the baseline that resets connections queued on the old socket).
//!
//! Load: first the steady throughput the machine sustains is measured (the same clients, unpaced, against
//! the same server); then every scenario runs at `--load` (default 0.75) of it. Half the clients open a new
//! connection per request, half keep one connection alive (reconnecting when the server says `connection:
//! close`); each starts a request on a fixed schedule. Before each replacement (at the start of the steady
//! stretch before it), `--idle` connections are opened that send their requests during it, one per client
//! interval (a drain that cuts idle clients shows up there).
//!
//! Figures per scenario: requests ok and failures by kind (refused, reset, timeout, short read), per load mode;
//! latency p50/p99/p999 in steady state and during replacements (from the trigger until the new process
//! serves and the old one is gone); time from the trigger to the first response from the new process; the
//! handover overhead the library measures (request to the new process's ready report, minus the new
//! process's own initialisation, which it reports); the peak resident memory of old + new during the overlap.
//!
//! Options: `--upgrades N` (50 per scenario: a p99 over fewer windows moves by tenths from run to run), `--clients N` (8), `--load F` (0.75), `--idle N` (8),
//! `--scaling N` (upgrades per listener count, 20), `--listeners A,B,C` (1,100,1000), `--ballast-mib N` (1024:
//! the handover of a process holding that much resident memory, 0 to leave out), `--accept-rounds N`
//! (15 per path), `--accept-secs S` (0.5), `--soak N` (1000), `--soak-every N` (100), `--scenarios A,B` (all;
//! names as above), `--no-systemd`, `--timeline` (latency by millisecond after each trigger, and by which
//! process answered), `--server http_std|http_axum` (http_std), `--json`. `--scaling 0`, `--accept-rounds 0`
//! and `--soak 0` leave those parts out.
//!
//! Stops by itself, uses only 127.0.0.1, leaves no process behind. Exit status 1 if any exuvia request failed
//! (or the systemd scenario could not run under `CI`); targets missed are reported, not hidden, in the last
//! table.

// `pub` in the modules below is for their siblings in this program, not an API.
#![allow(unreachable_pub)]

#[path = "../../tests/support/mod.rs"]
mod support;

mod accept;
mod measure;
mod report;
mod scenarios;

use std::time::Duration;

use scenarios::{LoadShape, Scenario};

/// The command line.
struct Options {
    upgrades: usize,
    clients: usize,
    load: f64,
    idle: usize,
    scaling: usize,
    listeners: Vec<usize>,
    accept_rounds: usize,
    accept_secs: f64,
    soak: usize,
    soak_every: usize,
    scenarios: Vec<Scenario>,
    json: bool,
    server: String,
    ballast_mib: usize,
    timeline: bool,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        upgrades: 50,
        clients: 8,
        load: 0.75,
        idle: 8,
        scaling: 20,
        listeners: vec![1, 100, 1000],
        accept_rounds: 15,
        accept_secs: 0.5,
        soak: 1000,
        soak_every: 100,
        scenarios: Scenario::ALL.to_vec(),
        json: false,
        server: "http_std".into(),
        ballast_mib: 1024,
        timeline: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: String| -> Result<f64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| format!("{v:?} is not a number"))
        };
        match a.as_str() {
            "--upgrades" => o.upgrades = num(value()?)? as usize,
            "--clients" => o.clients = (num(value()?)? as usize).max(2),
            "--load" => {
                o.load = num(value()?)?;
                if !(0.01..=1.0).contains(&o.load) {
                    return Err("--load is a fraction of the calibrated maximum, 0.01 to 1".into());
                }
            }
            "--idle" => o.idle = num(value()?)? as usize,
            "--scaling" => o.scaling = num(value()?)? as usize,
            "--listeners" => {
                o.listeners = value()?
                    .split(',')
                    .map(|v| v.trim().parse::<usize>().map_err(|_| format!("--listeners: {v:?}")))
                    .collect::<Result<_, _>>()?
            }
            "--accept-rounds" => o.accept_rounds = num(value()?)? as usize,
            "--accept-secs" => o.accept_secs = num(value()?)?.max(0.1),
            "--ballast-mib" => o.ballast_mib = num(value()?)? as usize,
            "--soak" => o.soak = num(value()?)? as usize,
            "--soak-every" => o.soak_every = (num(value()?)? as usize).max(1),
            "--no-systemd" => o.scenarios.retain(|s| *s != Scenario::ExuviaSystemctl),
            "--scenarios" => {
                o.scenarios = value()?
                    .split(',')
                    .map(|v| {
                        Scenario::ALL
                            .into_iter()
                            .find(|s| s.name() == v.trim())
                            .ok_or_else(|| format!("--scenarios: no scenario {v:?}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--json" => o.json = true,
            "--timeline" => o.timeline = true,
            "--server" => {
                o.server = value()?;
                if !["http_std", "http_axum"].contains(&o.server.as_str()) {
                    return Err("--server is http_std or http_axum".into());
                }
            }
            _ => {
                return Err(format!(
                    "unknown argument {a:?}; the options are listed at the top of examples/bench/main.rs"
                ))
            }
        }
    }
    Ok(o)
}

fn main() -> std::process::ExitCode {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    support::become_subreaper();
    let bin = support::example(&o.server);
    let fresh = o.clients / 2;
    let keepalive = o.clients - fresh;

    eprintln!(
        "calibrating: {} unpaced clients against http_std ...",
        o.clients
    );
    let calibration = scenarios::calibrate(&bin, fresh, keepalive, 1.0);
    let max = calibration.sustained;
    let shape = LoadShape {
        fresh,
        keepalive,
        pace: Duration::from_secs_f64(o.clients as f64 / (max * o.load)),
        idle: o.idle,
    };

    let mut outcomes = Vec::new();
    for s in Scenario::ALL {
        if !o.scenarios.contains(&s) {
            continue;
        }
        eprintln!("running {} ({} replacements) ...", s.name(), o.upgrades);
        outcomes.push((s, scenarios::run(s, &bin, &shape, o.upgrades)));
    }

    let mut scaling = Vec::new();
    for &n in o.listeners.iter().filter(|_| o.scaling > 0) {
        eprintln!("handover with {n} listeners ({} upgrades) ...", o.scaling);
        scaling.push((n, 0, scenarios::scaling(&bin, n, 0, o.scaling)));
    }
    if o.scaling > 0 && o.ballast_mib > 0 {
        eprintln!(
            "handover of a process with {} MiB resident ({} upgrades) ...",
            o.ballast_mib, o.scaling
        );
        scaling.push((
            1,
            o.ballast_mib,
            scenarios::scaling(&bin, 1, o.ballast_mib, o.scaling),
        ));
    }

    eprintln!(
        "accept throughput: plain Tokio vs exuvia::tokio, {} rounds each ...",
        o.accept_rounds
    );
    let accept = match accept::measure(o.accept_rounds, o.accept_secs, 4) {
        Ok(f) if o.accept_rounds > 0 => Some(f),
        Ok(_) => None,
        Err(e) => {
            eprintln!("bench: the accept measurement failed: {e}");
            None
        }
    };

    let soak = (o.soak > 0).then(|| {
        eprintln!(
            "soak: {} consecutive upgrades under the same load ...",
            o.soak
        );
        scenarios::soak(&bin, &shape, o.soak, o.soak_every)
    });

    let run = report::Run {
        options: &o,
        calibration,
        shape,
        outcomes,
        scaling,
        accept,
        soak,
    };
    let text = run.table();
    if o.json {
        eprintln!("{text}");
        println!("{}", run.json());
    } else {
        println!("{text}");
    }
    // Everything this run started descends from it (it is the subreaper): nothing may be left.
    let left = measure::children(std::process::id());
    if !left.is_empty() {
        eprintln!("bench: processes left behind: {left:?}; killing them");
        for &p in &left {
            support::signal(p, libc::SIGKILL);
            support::wait_gone(p, Duration::from_secs(5));
        }
    } else {
        eprintln!("bench: no process left behind");
    }
    if run.correct() && left.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

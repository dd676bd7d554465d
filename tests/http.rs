//! The HTTP layer (`exuvia::axum::serve`, feature `axum`) through upgrades, against the axum example
//! (`examples/http_axum.rs`) and the README's service exactly as printed (`examples/hello_axum.rs`): our own
//! clients in every protocol mode, and off-the-shelf ones (wrk, ApacheBench, h2load, curl).

#[macro_use]
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// A service under test.
enum Target {
    /// `examples/http_axum.rs` through the support harness (its log says what the library does).
    Example(Server),
    /// `examples/hello_axum.rs`, the README's snippet, which logs only what the snippet prints.
    Readme(Readme),
}

impl Target {
    fn example(name: &str) -> Target {
        Target::Example(Server::start(&example(name), &["--drain-timeout", "20"]))
    }

    /// Whether it speaks HTTP/2 (the std example speaks HTTP/1 only).
    fn http2(&self) -> bool {
        !matches!(self, Target::Example(s) if s.program_name == "http_std")
    }

    fn readme() -> Target {
        Target::Readme(Readme::start())
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Target::Example(s) => s.addr,
            Target::Readme(r) => r.addr,
        }
    }

    fn current(&self) -> u32 {
        match self {
            Target::Example(s) => s.current(),
            Target::Readme(r) => *r.generations.last().unwrap(),
        }
    }

    /// SIGHUP; returns the new pid once it serves (the old one may still drain).
    fn upgrade_started(&mut self) -> Result<u32, String> {
        match self {
            Target::Example(s) => s.upgrade_started(),
            Target::Readme(r) => r.upgrade_started(),
        }
    }

    /// How many connections `old` left open at its drain deadline, from its last words.
    fn left_by(&self, old: u32) -> usize {
        let (log, left) = match self {
            Target::Example(s) => (
                &s.log,
                s.log
                    .wait_for(0, Duration::from_secs(30), |l| {
                        l.contains("drain finished") && pid_of(l) == old
                    })
                    .and_then(|(_, l)| field(&l, "left")),
            ),
            Target::Readme(r) => (
                &r.log,
                r.log
                    .wait_for(0, Duration::from_secs(30), |l| {
                        l.starts_with(&format!("pid {old} exits:"))
                    })
                    .and_then(|(_, l)| Some(l.rsplit_once("left ")?.1.trim().to_string())),
            ),
        };
        left.and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no drain report from {old}:\n{}", log.dump()))
    }

    fn stop(self) {
        let pid = self.current();
        signal(pid, libc::SIGTERM);
        assert!(
            wait_gone(pid, Duration::from_secs(30)),
            "{pid} did not stop"
        );
    }
}

/// The README's service: started with its address as the only argument; it prints (on stdout, whole lines,
/// so that the lines of two generations never interleave) `pid N serving on http://ADDR` once ready and
/// `pid N exits: drained D, left L` at the end.
struct Readme {
    addr: SocketAddr,
    log: Log,
    generations: Vec<u32>,
}

fn serving_pid(line: &str) -> Option<u32> {
    let rest = line.strip_prefix("pid ")?;
    let (pid, tail) = rest.split_once(' ')?;
    tail.starts_with("serving on ")
        .then(|| pid.parse().ok())
        .flatten()
}

impl Readme {
    fn start() -> Readme {
        become_subreaper();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut child = Command::new(example("hello_axum"))
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hello_axum");
        let log = Log::collect(child.stdout.take().unwrap(), "readme");
        let Some((_, line)) =
            log.wait_for(0, Duration::from_secs(30), |l| serving_pid(l).is_some())
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the README service did not start:\n{}", log.dump());
        };
        let pid = serving_pid(&line).unwrap();
        assert_eq!(pid, child.id());
        std::mem::forget(child); // reaped by pid: we are the subreaper
        Readme {
            addr,
            log,
            generations: vec![pid],
        }
    }

    fn upgrade_started(&mut self) -> Result<u32, String> {
        let old = *self.generations.last().unwrap();
        let mark = self.log.len();
        assert!(signal(old, libc::SIGHUP));
        let (_, line) = self
            .log
            .wait_for(mark, Duration::from_secs(60), |l| {
                serving_pid(l).is_some_and(|p| p != old)
            })
            .ok_or_else(|| format!("no new process after SIGHUP:\n{}", self.log.dump()))?;
        let new = serving_pid(&line).unwrap();
        self.generations.push(new);
        Ok(new)
    }
}

impl Drop for Readme {
    fn drop(&mut self) {
        for &p in &self.generations {
            if descends_from_us(p) && zombie_state(p) == Some(false) {
                signal(p, libc::SIGKILL);
            }
            wait_gone(p, Duration::from_secs(5));
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// Our own clients, every mode at once.

#[test]
fn every_protocol_mode_survives_ten_upgrades_axum_example() {
    every_protocol_mode_survives_ten_upgrades(Target::example("http_axum"));
}

#[test]
fn every_protocol_mode_survives_ten_upgrades_readme_service() {
    every_protocol_mode_survives_ten_upgrades(Target::readme());
}

#[test]
fn every_http1_mode_survives_ten_upgrades_std_example() {
    every_protocol_mode_survives_ten_upgrades(Target::example("http_std"));
}

fn every_protocol_mode_survives_ten_upgrades(mut target: Target) {
    let addr = target.addr();
    let mut modes = vec![
        (Mode::Fresh, 2),
        (Mode::KeepAlive, 2),
        (Mode::KeepAlive10, 2),
    ];
    if target.http2() {
        modes.push((Mode::Http2, 2));
    }
    let load = Load::start_modes(addr, &modes, Duration::from_millis(2));
    let mut idle = Stats::default();
    for i in 0..10 {
        load.wait_progress(400);
        // Opened (and accepted) before the upgrade, they send their request after it: an idle keep-alive
        // connection must be answered, not cut.
        let conns = Idle::open(addr, 4);
        let old = target.current();
        let new = target
            .upgrade_started()
            .unwrap_or_else(|e| panic!("upgrade {i} failed: {e}"));
        idle.merge(conns.finish());
        assert!(
            wait_gone(old, Duration::from_secs(30)),
            "old process {old} did not finish its drain"
        );
        assert_eq!(
            target.left_by(old),
            0,
            "{old} cut connections at its deadline"
        );
        eprintln!("upgrade {i}: {old} -> {new}");
    }
    load.wait_progress(400);
    let each = load.stop_each();
    for (mode, st) in &each {
        eprintln!(
            "{mode:?}: {} (HTTP/2 requests re-sent after GOAWAY: {})",
            st.summary(),
            st.retried
        );
        assert!(st.failures.is_empty(), "{mode:?}: {}", st.summary());
        assert!(st.ok >= 200, "{mode:?}: too little load: {}", st.summary());
        // Clients of every mode followed the service from process to process.
        assert!(st.pids.len() >= 6, "{mode:?} served by only {:?}", st.pids);
    }
    eprintln!("idle: {}", idle.summary());
    assert!(idle.failures.is_empty(), "idle: {}", idle.summary());
    assert_eq!(idle.ok, 40);
    target.stop();
}

// ------------------------------------------------------------------------------------------------------------
// An upgraded connection (the shape of a WebSocket).

#[test]
fn an_upgraded_connection_stays_counted_until_the_application_closes_it() {
    let mut target = Target::example("http_axum");
    let addr = target.addr();
    let mut s = connect(addr).unwrap();
    s.write_all(
        b"GET /echo HTTP/1.1\r\nhost: test\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut head = String::new();
    loop {
        let mut l = String::new();
        assert!(r.read_line(&mut l).unwrap() > 0, "closed during the head");
        if l == "\r\n" {
            break;
        }
        head.push_str(&l);
    }
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let old = target.current();
    let echo = |s: &mut std::net::TcpStream, r: &mut BufReader<std::net::TcpStream>, n: u32| {
        s.write_all(format!("line {n}\n").as_bytes()).unwrap();
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert_eq!(l, format!("line {n} pid={old}\n"));
    };
    echo(&mut s, &mut r, 1);
    let load = Load::start(addr, 1, 1, Duration::from_millis(2));
    load.wait_progress(100);
    let new = target.upgrade_started().unwrap();
    // The old process says goodbye on the upgraded connection, then closes it; its drain counted it.
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "bye\n");
    assert!(wait_gone(old, Duration::from_secs(30)));
    assert_eq!(target.left_by(old), 0);
    load.wait_progress(100);
    let st = load.stop();
    assert!(st.failures.is_empty(), "{}", st.summary());
    assert!(st.pids.contains(&new));
    target.stop();
}

// ------------------------------------------------------------------------------------------------------------
// Off-the-shelf clients.

const UPGRADES: usize = 3;
/// ab's: every keep-alive connection moves at each of them.
const AB_UPGRADES: usize = 5;

/// Runs `upgrades` upgrades one after the other, checking that the client program still runs after them.
fn upgrades_while(
    target: &mut Target,
    child: &mut std::process::Child,
    what: &str,
    upgrades: usize,
) {
    for i in 0..upgrades {
        let old = target.current();
        target
            .upgrade_started()
            .unwrap_or_else(|e| panic!("upgrade {i} under {what} failed: {e}"));
        assert!(wait_gone(old, Duration::from_secs(30)), "{old} lingered");
        assert_eq!(target.left_by(old), 0, "{old} cut connections");
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "{what} ended before the upgrades did: make it run longer"
    );
}

#[test]
fn wrk_ab_h2load_and_curl_see_no_error_axum_example() {
    off_the_shelf_clients(Target::example("http_axum"));
}

#[test]
fn wrk_ab_and_curl_see_no_error_std_example() {
    off_the_shelf_clients(Target::example("http_std"));
}

#[test]
fn wrk_ab_h2load_and_curl_see_no_error_readme_service() {
    off_the_shelf_clients(Target::readme());
}

fn off_the_shelf_clients(mut target: Target) {
    let ran: Vec<String> = [under_wrk, under_ab, under_h2load, under_curl]
        .into_iter()
        .filter_map(|run| run(&mut target))
        .collect();
    target.stop();
    for r in &ran {
        eprintln!("{r}");
    }
}

/// wrk: HTTP/1.1 keep-alive, 16 connections, upgrades while it runs.
fn under_wrk(target: &mut Target) -> Option<String> {
    let addr = target.addr();
    let url = format!("http://{addr}/");
    let wrk = client("wrk", "wrk")?;
    // HTTP/1.1 keep-alive, 16 connections.
    let mut child = Command::new(wrk)
        .args(["-t2", "-c16", "-d8s", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_clients(addr, 16, &mut child, "wrk");
    upgrades_while(target, &mut child, "wrk", UPGRADES);
    let out = output(child);
    eprintln!("wrk:\n{out}");
    assert!(!out.contains("Socket errors"), "wrk saw errors:\n{out}");
    assert!(!out.contains("Non-2xx"), "wrk saw bad statuses:\n{out}");
    let requests = out
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in")
                .map(|(n, _)| n.parse::<u64>())
        })
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{out}"));
    assert!(requests > 1000, "too little load: {requests}");
    Some(format!("wrk: {requests} requests, 0 errors"))
}

/// ab -k: HTTP/1.0 keep-alive, 64 connections, upgrades while it runs.
fn under_ab(target: &mut Target) -> Option<String> {
    let mut ab = AbKeepAlive::start(target.addr(), 64, 20)?;
    upgrades_while(target, &mut ab.child, "ab", AB_UPGRADES);
    // Every keep-alive connection moved to the new process at each upgrade: none was closed.
    let complete = ab.finish("upgrades");
    Some(format!(
        "ab -k -c 64: {complete} requests, 0 failed, all on kept-alive connections across {AB_UPGRADES} upgrades"
    ))
}

/// h2load: HTTP/2 with prior knowledge, one run per upgrade.
fn under_h2load(target: &mut Target) -> Option<String> {
    if !target.http2() {
        eprintln!("h2load: not run, the target speaks HTTP/1 only");
        return None;
    }
    let addr = target.addr();
    let url = format!("http://{addr}/");
    let h2load = client("h2load", "nghttp2-client")?;
    // HTTP/2 with prior knowledge, 8 connections of 4 concurrent streams. h2load opens its connections
    // once and never opens another after a GOAWAY (it reconnects only for HTTP/1's `Connection: close`),
    // so one run per upgrade. What it reports then: the requests it had not submitted yet count as
    // "failed" (never sent), and so do the few it submitted as the GOAWAY arrived, which the GOAWAY says
    // the server did not process (a client may send them again; h2load does not): at most one per
    // stream slot. Our own HTTP/2 client, which sends those again on a new connection as real clients
    // do, proves the strict "0 failed" (every_protocol_mode_survives_ten_upgrades).
    const CONNECTIONS: u64 = 8;
    const STREAMS: u64 = 4;
    let (mut sent, mut succeeded_total, mut refused_total, mut unsent_total) = (0, 0, 0, 0);
    for i in 0..UPGRADES {
        let mut child = Command::new(&h2load)
            .args(["-c", &CONNECTIONS.to_string(), "-m", &STREAMS.to_string()])
            .args(["-n", "100000000", &url])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_clients(addr, CONNECTIONS as usize, &mut child, "h2load");
        // Let it load the old process for a while (h2load says nothing while it runs).
        std::thread::sleep(Duration::from_millis(500));
        let old = target.current();
        target
            .upgrade_started()
            .unwrap_or_else(|e| panic!("upgrade {i} under h2load failed: {e}"));
        let out = output(child);
        assert!(wait_gone(old, Duration::from_secs(30)), "{old} lingered");
        assert_eq!(target.left_by(old), 0, "{old} cut connections");
        eprintln!("h2load:\n{out}");
        let line = out
            .lines()
            .find(|l| l.starts_with("requests:"))
            .unwrap_or_else(|| panic!("no requests line:\n{out}"));
        let total = number_after(line, "requests:").unwrap();
        let started = number_after(line, "total, ").unwrap();
        let done = number_after(line, "started, ").unwrap();
        let succeeded = number_after(line, "done, ").unwrap();
        let timeout = number_after(line, "errored, ").unwrap();
        let ok_2xx = number_after(&out, "status codes:").unwrap();
        assert_eq!(done, started, "{line}");
        assert_eq!(timeout, 0, "{line}");
        assert_eq!(ok_2xx, succeeded, "a response was not 2xx:\n{out}");
        assert!(
            started - succeeded <= CONNECTIONS * STREAMS,
            "more failed streams than h2load could have had in flight at the GOAWAY: {line}"
        );
        assert!(succeeded > 100, "too little load: {line}");
        assert!(total > started, "the run ended before the GOAWAY: {line}");
        sent += started;
        succeeded_total += succeeded;
        refused_total += started - succeeded;
        unsent_total += total - started;
    }
    Some(format!(
        "h2load: {succeeded_total} of {sent} submitted requests succeeded over {UPGRADES} upgrades, \
         every response 2xx, 0 timeouts; {refused_total} submitted as the GOAWAY arrived (not processed, \
         safe to retry) and {unsent_total} never submitted are what it reports as failed"
    ))
}

/// curl in loops (HTTP/1.1, HTTP/1.0 keep-alive, HTTP/2 prior knowledge), upgrades between runs.
fn under_curl(target: &mut Target) -> Option<String> {
    let addr = target.addr();
    let url = format!("http://{addr}/");
    let curl = client("curl", "curl")?;
    // Each curl run fetches 20 URLs on one connection (reused while the server allows it) in HTTP/1.1
    // and HTTP/1.0, in a loop while the service upgrades. HTTP/2 with prior knowledge fetches one URL
    // per run: Debian 12's curl 7.88.1 fails on reusing a prior-knowledge connection whatever the server
    // (curl issue 10634, fixed in 8.0).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut modes = vec![
        &["--http1.1"][..],
        &["--http1.0", "-H", "Connection: keep-alive"],
    ];
    if target.http2() {
        modes.push(&["--http2-prior-knowledge"]);
    }
    let loops: Vec<_> = modes
        .into_iter()
        .map(|flags| {
            let (curl, url, stop) = (curl.clone(), url.clone(), stop.clone());
            let progress = progress.clone();
            let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
            let per_run = if flags[0] == "--http2-prior-knowledge" {
                1
            } else {
                20
            };
            std::thread::spawn(move || {
                let (mut runs, mut fetched) = (0, 0);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let out = Command::new(&curl)
                        .args(["-sS", "--fail", "--max-time", "10"])
                        .args(&flags)
                        .args(std::iter::repeat(url.as_str()).take(per_run))
                        .output()
                        .unwrap();
                    let text = String::from_utf8_lossy(&out.stdout).to_string();
                    assert!(
                        out.status.success(),
                        "curl {flags:?} failed: {}{text}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    assert_eq!(text.matches("pid=").count(), per_run, "{text}");
                    runs += 1;
                    fetched += per_run;
                    progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                (flags, runs, fetched)
            })
        })
        .collect();
    for i in 0..UPGRADES {
        // Several curl runs between upgrades (each loop sees the service of every generation).
        let target_runs = progress.load(std::sync::atomic::Ordering::Relaxed) + 9;
        let deadline = Instant::now() + Duration::from_secs(60);
        while progress.load(std::sync::atomic::Ordering::Relaxed) < target_runs {
            assert!(Instant::now() < deadline, "curl made no progress");
            assert!(!loops.iter().any(|l| l.is_finished()), "a curl loop failed");
            std::thread::sleep(Duration::from_millis(5));
        }
        let old = target.current();
        target
            .upgrade_started()
            .unwrap_or_else(|e| panic!("upgrade {i} under curl failed: {e}"));
        assert!(wait_gone(old, Duration::from_secs(30)), "{old} lingered");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut ran = Vec::new();
    for l in loops {
        let (flags, runs, fetched) = l.join().expect("a curl loop failed");
        assert!(runs > 0);
        ran.push(format!(
            "curl {flags:?}: {runs} runs, {fetched} responses, 0 failed"
        ));
    }
    Some(ran.join("\n"))
}

/// The README's command for what the HTTP layer costs runs, and prints its figures (the figures themselves
/// are the benchmark's, not a test's: they depend on the machine).
#[test]
fn the_http_layer_cost_comparison_runs() {
    if client("wrk", "wrk").is_none() {
        return;
    }
    let out = Command::new(example("http_cost"))
        .args(["--rounds", "1", "--secs", "1", "--connections", "8"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "http_cost failed");
    let line = text
        .lines()
        .find(|l| l.starts_with("exuvia::axum::serve / axum::serve"))
        .unwrap_or_else(|| panic!("no summary line:\n{text}"));
    let throughput: f64 = line
        .split("throughput ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(throughput > 0.0, "{line}");
}

//! The replacement scenarios under load, the calibration that sets the load, the scaling runs and the soak.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::measure::{self, RssSampler};
use super::support::{self, systemd, Idle, Load, Server, Stats};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Scenario {
    Control,
    ExuviaSighup,
    ExuviaSighupDrain,
    ExuviaSighupBackground,
    ExuviaSystemctl,
    ExuviaTakeover,
    NaiveRestart,
    ReuseportOverlap,
    ExuviaRollback,
}

impl Scenario {
    pub const ALL: [Scenario; 9] = [
        Scenario::Control,
        Scenario::ExuviaSighup,
        Scenario::ExuviaSighupDrain,
        Scenario::ExuviaSighupBackground,
        Scenario::ExuviaSystemctl,
        Scenario::ExuviaTakeover,
        Scenario::NaiveRestart,
        Scenario::ReuseportOverlap,
        Scenario::ExuviaRollback,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Control => "control",
            Scenario::ExuviaSighup => "exuvia-sighup",
            Scenario::ExuviaSighupDrain => "exuvia-sighup-drain",
            Scenario::ExuviaSighupBackground => "exuvia-sighup-bg",
            Scenario::ExuviaSystemctl => "exuvia-systemctl",
            Scenario::ExuviaTakeover => "exuvia-takeover",
            Scenario::NaiveRestart => "naive-restart",
            Scenario::ReuseportOverlap => "reuseport-overlap",
            Scenario::ExuviaRollback => "exuvia-rollback",
        }
    }

    pub fn is_exuvia(self) -> bool {
        matches!(
            self,
            Scenario::ExuviaSighup
                | Scenario::ExuviaSighupDrain
                | Scenario::ExuviaSighupBackground
                | Scenario::ExuviaSystemctl
                | Scenario::ExuviaTakeover
        )
    }
}

/// The load every scenario runs under.
#[derive(Clone, Copy, Debug)]
pub struct LoadShape {
    pub fresh: usize,
    pub keepalive: usize,
    /// Each client starts a request every `pace`.
    pub pace: Duration,
    /// Idle connections opened before each replacement (at the start of the steady stretch before it),
    /// sending their requests during it, one after the other, one per `pace`.
    pub idle: usize,
}

impl LoadShape {
    /// Requests per second offered.
    pub fn offered(&self) -> f64 {
        (self.fresh + self.keepalive) as f64 / self.pace.as_secs_f64()
    }

    fn start(&self, addr: SocketAddr) -> Load {
        Load::start(addr, self.fresh, self.keepalive, self.pace)
    }
}

/// What one scenario measured.
#[derive(Default)]
pub struct Outcome {
    pub skipped: Option<String>,
    pub upgrades: usize,
    pub fresh: Stats,
    pub keepalive: Stats,
    pub idle: Stats,
    /// Served requests per second over the whole scenario.
    pub throughput: f64,
    /// (trigger, replacement over) for each replacement.
    pub windows: Vec<(Instant, Instant)>,
    /// The new process of each replacement.
    pub new_pids: Vec<u32>,
    pub to_first_response: Vec<Duration>,
    /// The library's own figures, from the old process's log: (overhead, child's own initialisation).
    pub overhead: Vec<(Duration, Duration)>,
    /// Peak summed resident memory of the old and the new process, per replacement.
    pub peak_rss: Vec<u64>,
    /// Where each replacement's time went, from the old process's log, measured from the trigger: the
    /// SIGHUP received, the new process ready, the handover done (the old process stops accepting).
    /// `None` where the log did not show all three (aligned with `windows`).
    pub stages: Vec<Option<[Duration; 3]>>,
    /// `exuvia-rollback`: from each crash of a new process on probation to the old process's first answer
    /// to a request sent after the crash.
    pub takeback: Vec<Duration>,
}

impl Outcome {
    /// Latencies of the requests started during the replacements, split at the moment the old process received
    /// its SIGHUP: (before: the trigger's own cost, e.g. systemctl and systemd at work; from then on).
    pub fn split_at_signal(&self) -> (Vec<Duration>, Vec<Duration>) {
        let (mut before, mut after) = (Vec::new(), Vec::new());
        for ((t0, end), stages) in self.windows.iter().zip(&self.stages) {
            let Some([signal, ..]) = stages else { continue };
            for r in self.fresh.latencies.iter().chain(&self.keepalive.latencies) {
                if r.at >= *t0 && r.at <= *end {
                    if r.at < *t0 + *signal {
                        before.push(r.took);
                    } else {
                        after.push(r.took);
                    }
                }
            }
        }
        before.sort();
        after.sort();
        (before, after)
    }

    /// Latencies of the requests started within `horizon` of each trigger: the same stretch for every
    /// scenario and version, whatever the length of its windows (a long window dilutes its p99 with steady
    /// requests).
    pub fn first(&self, horizon: Duration) -> Vec<Duration> {
        let mut v: Vec<Duration> = self
            .windows
            .iter()
            .flat_map(|(t0, _)| {
                self.fresh
                    .latencies
                    .iter()
                    .chain(&self.keepalive.latencies)
                    .filter(move |r| r.at >= *t0 && r.at < *t0 + horizon)
                    .map(|r| r.took)
            })
            .collect();
        v.sort();
        v
    }

    /// Every mode's requests together: counts and failures (latencies stay per mode).
    pub fn all(&self) -> Stats {
        let mut s = Stats::default();
        for m in [&self.fresh, &self.keepalive, &self.idle] {
            s.ok += m.ok;
            s.failures.extend(m.failures.iter().cloned());
        }
        s
    }

    /// The replacement window (trigger, end) that `t` falls in, if any.
    pub fn window_of(&self, t: Instant) -> Option<(Instant, Instant)> {
        self.windows
            .iter()
            .copied()
            .find(|(a, b)| t >= *a && t <= *b)
    }

    /// Sorted latencies of the continuous load, (steady, during replacements).
    pub fn latencies(&self) -> (Vec<Duration>, Vec<Duration>) {
        let (mut steady, mut busy) = (Vec::new(), Vec::new());
        for r in self.fresh.latencies.iter().chain(&self.keepalive.latencies) {
            if self.window_of(r.at).is_some() {
                busy.push(r.took)
            } else {
                steady.push(r.took)
            }
        }
        steady.sort();
        busy.sort();
        (steady, busy)
    }
}

/// Polls with new connections until a process whose pid satisfies `pred` answers; when it did, if it did
/// within 30 s.
fn first_response_from(addr: SocketAddr, pred: impl Fn(u32) -> bool) -> Option<Instant> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok((r, _)) = support::get(addr, "/") {
            if pred(r.pid) {
                return Some(Instant::now());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// `(overhead, child init)` from the old process's "child ready" log line.
/// The wall-clock time of a log line of the examples (its first field: seconds.microseconds since the epoch).
fn logged_at(line: &str) -> Option<SystemTime> {
    let t: f64 = line.split_whitespace().next()?.parse().ok()?;
    Some(UNIX_EPOCH + Duration::from_secs_f64(t))
}

/// (trigger -> SIGHUP received, -> new process ready, -> handed over), from the old process's log lines.
fn stages_of(lines: &[String], old: u32, trigger: SystemTime) -> Option<[Duration; 3]> {
    let at = |needle: &str| {
        lines
            .iter()
            .rev()
            .find(|l| {
                l.contains(needle)
                    && support::field(l, "pid").and_then(|p| p.parse::<u32>().ok()) == Some(old)
            })
            .and_then(|l| logged_at(l)?.duration_since(trigger).ok())
    };
    Some([
        at("SIGHUP received")?,
        at("child ready; handing over")?,
        at("upgrade: handed over")?,
    ])
}

fn overhead_of(lines: &[String], old: u32) -> Option<(Duration, Duration)> {
    let line = lines.iter().rev().find(|l| {
        l.contains("child ready; handing over")
            && support::field(l, "pid").and_then(|p| p.parse::<u32>().ok()) == Some(old)
    })?;
    let us = |k: &str| -> Option<Duration> {
        support::field(line, k)
            .and_then(|v| v.parse().ok())
            .map(Duration::from_micros)
    };
    Some((us("overhead_us")?, us("child_init_us")?))
}

/// What the machine sustains for http_std with this client mix.
pub struct Calibration {
    /// Requests per second with every client unpaced (keep-alive clients then get more than their share).
    pub unpaced: f64,
    /// (offered, served) requests per second for each paced step, every client at the same rate.
    pub steps: Vec<(f64, f64)>,
    /// The highest rate served in any paced step, every client at the same rate (the last step is past
    /// saturation): the steady maximum the scenarios' load is a fraction of.
    pub sustained: f64,
}

/// Measures the steady throughput this machine sustains: first unpaced, then paced steps from a third of that
/// upwards until the served rate falls behind the offered one (saturation). Each step is `secs` long after a
/// warm-up.
pub fn calibrate(bin: &Path, fresh: usize, keepalive: usize, secs: f64) -> Calibration {
    let server = Server::start_bare(bin, &[]);
    let measure = |pace: Duration| -> f64 {
        let load = Load::start(server.addr, fresh, keepalive, pace);
        load.wait_progress(1000);
        let (n0, t0) = (load.completed(), Instant::now());
        std::thread::sleep(Duration::from_secs_f64(secs)); // the measuring interval
        let rate = (load.completed() - n0) as f64 / t0.elapsed().as_secs_f64();
        let stats = load.stop();
        assert!(
            stats.failures.is_empty(),
            "calibration saw failures: {}",
            stats.summary()
        );
        rate
    };
    let clients = (fresh + keepalive) as f64;
    let unpaced = measure(Duration::ZERO);
    let mut steps = Vec::new();
    let mut sustained = 0.0f64;
    for tenth in 3..=12 {
        let offered = unpaced * tenth as f64 / 10.0;
        let served = measure(Duration::from_secs_f64(clients / offered));
        steps.push((offered, served));
        sustained = sustained.max(served);
        if served < 0.97 * offered {
            break;
        }
    }
    server.stop();
    Calibration {
        unpaced,
        steps,
        sustained,
    }
}

/// Where the replaced server runs: a process tree we started, or a unit under a real systemd.
enum Target {
    Direct {
        servers: Vec<Server>,
        args: Vec<String>,
    },
    Systemd {
        sd: systemd::Systemd,
    },
}

/// How long the control scenario's windows last: about as long as an exuvia replacement under the default
/// load (the idle clients' paced requests take most of it).
const CONTROL_WINDOW: Duration = Duration::from_millis(8);

/// Runs one scenario: `upgrades` replacements under `shape`, each after a stretch of steady load.
pub fn run(scenario: Scenario, bin: &Path, shape: &LoadShape, upgrades: usize) -> Outcome {
    let port = support::free_port();
    let listen = format!("127.0.0.1:{port}");
    // exuvia-rollback: every new process exits 200 ms into a 5 s probation; the old one takes the service back.
    let fault = std::env::temp_dir().join(format!("exuvia-bench-crash-{}", std::process::id()));
    let args = server_args(scenario, &fault);
    let mut target = match start_target(scenario, bin, port, &listen, args) {
        Ok(target) => target,
        Err(why) => {
            return Outcome {
                skipped: Some(why),
                ..Outcome::default()
            }
        }
    };
    let addr: SocketAddr = listen.parse().unwrap();
    // The first request (under systemd it activates the service) before the clock starts.
    assert!(
        first_response_from(addr, |_| true).is_some(),
        "{} never answered",
        scenario.name()
    );
    let load = shape.start(addr);
    let started = Instant::now();
    // Enough requests between replacements for a steady stretch of about 300 ms.
    let between = ((shape.offered() * 0.3) as u64).max(200);
    load.wait_progress(between);
    let mut out = Outcome {
        upgrades,
        ..Outcome::default()
    };
    let mut crashes = Vec::new();
    for _ in 0..upgrades {
        // Opened a steady stretch ahead of the trigger: what opening them costs the server is not part of
        // the replacement.
        let idle = Idle::open(addr, shape.idle);
        load.wait_progress(between);
        let round = match &mut target {
            Target::Direct { servers, args, .. } => {
                let ctx = Direct {
                    scenario,
                    bin,
                    listen: &listen,
                    args,
                    fault: &fault,
                    pace: shape.pace,
                };
                ctx.replace(servers, idle, &mut out, &mut crashes)
            }
            Target::Systemd { sd } => replace_under_systemd(sd, idle, shape.pace, &mut out),
        };
        out.idle.merge(round.idle);
        out.windows.push((round.t0, round.ended));
        out.new_pids.push(round.new);
    }
    load.wait_progress(between);
    let elapsed = started.elapsed();
    let (fresh, keepalive) = load.stop_by_mode();
    out.throughput = (fresh.ok + keepalive.ok) as f64 / elapsed.as_secs_f64();
    first_answers(scenario, &mut out, &crashes, &fresh, &keepalive);
    let _ = std::fs::remove_file(&fault);
    let _ = std::fs::remove_file(fault.with_extension("sock"));
    out.fresh = fresh;
    out.keepalive = keepalive;
    target.stop();
    out
}

/// The server's arguments for `scenario` (`fault`: the crash-fault file of `exuvia-rollback`).
fn server_args(scenario: Scenario, fault: &Path) -> Vec<String> {
    let mut args = vec!["--drain-timeout".to_string(), "10".to_string()];
    match scenario {
        Scenario::ReuseportOverlap => args.push("--reuseport".into()),
        Scenario::ExuviaSighupBackground => args.push("--background-init".into()),
        // Connections drain instead of moving: the same upgrade as before they could.
        Scenario::ExuviaSighupDrain => args.push("--no-move".into()),
        Scenario::ExuviaRollback => {
            args.extend(["--probation".into(), "5".into(), "--crash-fault".into()]);
            args.push(fault.display().to_string());
        }
        // Every process is started by the benchmark and takes over from the one serving the control socket
        // (a file next to the crash fault's).
        Scenario::ExuviaTakeover => {
            args.extend(["--takeover".into(), "--control-socket".into()]);
            args.push(fault.with_extension("sock").display().to_string());
        }
        _ => {}
    }
    args
}

/// Starts the first server: a process tree of ours, or under a real systemd for `exuvia-systemctl` (`Err`:
/// why that cannot run here).
fn start_target(
    scenario: Scenario,
    bin: &Path,
    port: u16,
    listen: &str,
    args: Vec<String>,
) -> Result<Target, String> {
    if scenario != Scenario::ExuviaSystemctl {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        return Ok(Target::Direct {
            servers: vec![Server::start_bare_on(bin, listen, &argv)],
            args,
        });
    }
    if let Some(why) = systemd::unavailable() {
        return Err(why);
    }
    let sd = systemd::boot("bench").expect("checked above");
    let ctl = support::binary("exuvia-ctl");
    sd.install_app(
        systemd::Shape::NotifyReload,
        bin,
        &ctl,
        port,
        &args.join(" "),
        &[],
    );
    let out = sd.systemctl(&["start", "app.socket"]);
    assert!(out.status.success(), "start app.socket: {out:?}");
    Ok(Target::Systemd { sd })
}

impl Target {
    /// Stops what runs, and leaves nothing behind.
    fn stop(self) {
        match self {
            Target::Direct { servers, .. } => {
                if let Some(s) = servers.last() {
                    s.stop();
                }
                drop(servers); // kills and reaps anything left
            }
            Target::Systemd { sd } => {
                let out = sd.systemctl(&["stop", "app.service", "app.socket"]);
                assert!(out.status.success(), "systemctl stop: {out:?}");
                drop(sd); // kills the namespace
            }
        }
    }
}

/// One replacement: when it was triggered and when it was over, the process that serves after it, and what
/// the idle clients saw.
struct Round {
    t0: Instant,
    ended: Instant,
    new: u32,
    idle: Stats,
}

/// What a replacement of a process tree of ours needs to know.
struct Direct<'a> {
    scenario: Scenario,
    bin: &'a Path,
    listen: &'a str,
    args: &'a [String],
    fault: &'a Path,
    pace: Duration,
}

impl Direct<'_> {
    /// Replaces the newest of `servers` the scenario's way, while `idle`'s clients send their requests.
    fn replace(
        &self,
        servers: &mut Vec<Server>,
        idle: Idle,
        out: &mut Outcome,
        crashes: &mut Vec<(Instant, u32)>,
    ) -> Round {
        let t0 = Instant::now();
        let wall0 = SystemTime::now();
        let old = servers.last().unwrap().current();
        let sampler = RssSampler::start(&[old], self.scenario.is_exuvia());
        let (new, idle) = match self.scenario {
            Scenario::Control => {
                // Everything the benchmark does during a replacement, without a replacement: the idle clients
                // send, the sampler runs, for as long as a typical exuvia window.
                let idle_done = idle.finish_paced(self.pace);
                // Not a readiness check: the control window has a fixed length.
                std::thread::sleep((t0 + CONTROL_WINDOW).saturating_duration_since(Instant::now()));
                (old, idle_done)
            }
            Scenario::ExuviaSighup
            | Scenario::ExuviaSighupDrain
            | Scenario::ExuviaSighupBackground => {
                self.sighup(servers.last_mut().unwrap(), idle, wall0, out)
            }
            Scenario::NaiveRestart => {
                support::signal(old, libc::SIGTERM);
                // Nothing new can serve before the old one exits: the idle clients send now.
                let idle_done = idle.finish_paced(self.pace);
                support::wait_gone(old, Duration::from_secs(30));
                let new = self.start_another(servers, &sampler);
                (new, idle_done)
            }
            Scenario::ExuviaTakeover => {
                // Returns once the new process says it serves (it took the sockets over).
                let new = self.start_another(servers, &sampler);
                let idle_done = idle.finish_paced(self.pace);
                support::wait_gone(old, Duration::from_secs(30));
                let lines = servers[servers.len() - 2].log.lines();
                if let Some(o) = overhead_of(&lines, old) {
                    out.overhead.push(o);
                }
                (new, idle_done)
            }
            Scenario::ReuseportOverlap => {
                let new = self.start_another(servers, &sampler);
                support::signal(old, libc::SIGTERM);
                let idle_done = idle.finish_paced(self.pace);
                support::wait_gone(old, Duration::from_secs(30));
                (new, idle_done)
            }
            Scenario::ExuviaRollback => {
                let s = servers.last_mut().unwrap();
                let (crash, child) = self.crash_on_probation(s, t0, wall0);
                crashes.push((crash, old));
                let idle_done = idle.finish_paced(self.pace);
                support::wait_gone(child, Duration::from_secs(30));
                (old, idle_done)
            }
            Scenario::ExuviaSystemctl => unreachable!(),
        };
        out.peak_rss.push(sampler.stop());
        Round {
            t0,
            ended: Instant::now(),
            new,
            idle,
        }
    }

    /// SIGHUP to the current process: returns the new one once the old one has exited (the idle clients send
    /// while it drains), with the library's own figures from the old process's log.
    fn sighup(
        &self,
        s: &mut Server,
        idle: Idle,
        wall0: SystemTime,
        out: &mut Outcome,
    ) -> (u32, Stats) {
        let old = s.current();
        // Returns once the new process has said it serves.
        let new = s
            .upgrade_started()
            .unwrap_or_else(|e| panic!("upgrade failed: {e}"));
        let idle_done = idle.finish_paced(self.pace);
        support::wait_gone(old, Duration::from_secs(30));
        let lines = s.log.lines();
        if let Some(o) = overhead_of(&lines, old) {
            out.overhead.push(o);
        }
        out.stages.push(stages_of(&lines, old, wall0));
        (new, idle_done)
    }

    /// Starts another server on the same address (returns once it has said it serves); the sampler watches it.
    fn start_another(&self, servers: &mut Vec<Server>, sampler: &RssSampler) -> u32 {
        let argv: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let s = Server::start_bare_on(self.bin, self.listen, &argv);
        let new = s.current();
        sampler.watch(new);
        servers.push(s);
        new
    }

    /// SIGHUP to a server whose new process exits 200 ms into its probation: once the old process has rolled
    /// back, returns when the new one crashed (by its log) and its pid.
    fn crash_on_probation(&self, s: &Server, t0: Instant, wall0: SystemTime) -> (Instant, u32) {
        let old = s.current();
        std::fs::write(self.fault, "exit 200").unwrap();
        let mark = s.log.len();
        assert!(support::signal(old, libc::SIGHUP));
        let from = |l: &str, pid: u32| {
            support::field(l, "pid").and_then(|p| p.parse::<u32>().ok()) == Some(pid)
        };
        let (_, rolled) = s
            .log
            .wait_for(mark, Duration::from_secs(30), |l| {
                from(l, old) && l.contains("rolled back")
            })
            .unwrap_or_else(|| panic!("no rollback:\n{}", s.log.dump()));
        let child: u32 = support::field(&rolled, "child_pid")
            .and_then(|p| p.parse().ok())
            .expect("the rollback names the new process");
        let crash = s
            .log
            .lines()
            .iter()
            .skip(mark)
            .find(|l| from(l, child) && l.contains("crashing now"))
            .and_then(|l| logged_at(l))
            .expect("the new process logged its crash");
        (t0 + crash.duration_since(wall0).unwrap_or_default(), child)
    }
}

/// `systemctl reload` of the unit: returns once the old main process has exited (the idle clients send
/// meanwhile), with the library's own figures from the unit's log.
fn replace_under_systemd(
    sd: &systemd::Systemd,
    idle: Idle,
    pace: Duration,
    out: &mut Outcome,
) -> Round {
    // Finding the main process (nsenter + systemctl show, tens of ms) is bookkeeping, not part of the
    // trigger: done before the clock starts, so that the window opens at `systemctl reload`.
    let old = sd.main_pid("app.service");
    let old_host = sd.host_pid(old).expect("the main process is visible");
    let old_fd = support::pidfd(old_host).expect("the main process is alive");
    let sampler = RssSampler::start(&[old_host], true);
    let t0 = Instant::now();
    let wall0 = SystemTime::now();
    let reload = sd.systemctl(&["reload", "app.service"]);
    assert!(
        reload.status.success(),
        "systemctl reload failed: {}",
        String::from_utf8_lossy(&reload.stderr)
    );
    let idle = idle.finish_paced(pace);
    support::wait_pidfd(&old_fd, Duration::from_secs(30));
    // The window ends here; asking systemd for the new main pid (nsenter + systemctl show) is the
    // benchmark's own work and stays out of it.
    let ended = Instant::now();
    let new = sd.main_pid("app.service");
    assert_ne!(new, old, "the reload did not move the main pid");
    out.peak_rss.push(sampler.stop());
    let log = std::fs::read_to_string(sd.service_log()).unwrap_or_default();
    let lines: Vec<String> = log.lines().map(str::to_string).collect();
    if let Some(o) = overhead_of(&lines, old) {
        out.overhead.push(o);
    }
    out.stages.push(stages_of(&lines, old, wall0));
    Round {
        t0,
        ended,
        new,
        idle,
    }
}

/// From the load's own requests (the benchmark sends nothing extra to find out): the time from each trigger to
/// the first response from the new process (the control scenario has no new process; in the rollback scenario
/// the old process serves on), and from each crash to the old process's first answer after it.
fn first_answers(
    scenario: Scenario,
    out: &mut Outcome,
    crashes: &[(Instant, u32)],
    fresh: &Stats,
    keepalive: &Stats,
) {
    let first_from = |pid: u32, since: Instant, answered: bool| {
        fresh
            .latencies
            .iter()
            .chain(&keepalive.latencies)
            .filter(|r| r.pid == pid && if answered { r.at + r.took } else { r.at } >= since)
            .map(|r| r.at + r.took)
            .min()
    };
    let replaced = if matches!(scenario, Scenario::Control | Scenario::ExuviaRollback) {
        &[][..]
    } else {
        &out.new_pids[..]
    };
    let to_new: Vec<Duration> = out
        .windows
        .iter()
        .zip(replaced)
        .filter_map(|((t0, _), &new)| first_from(new, *t0, true).map(|at| at - *t0))
        .collect();
    out.to_first_response.extend(to_new);
    for (crash, pid) in crashes {
        if let Some(at) = first_from(*pid, *crash, false) {
            out.takeback.push(at - *crash);
        }
    }
}

/// Handover times with `listeners` sockets and `ballast_mib` MiB of resident memory: `upgrades` SIGHUPs
/// without load, each waited for to the end. Returns (overhead, whole upgrade from request to commit) per
/// upgrade, from the old process's log.
pub fn scaling(
    bin: &Path,
    listeners: usize,
    ballast_mib: usize,
    upgrades: usize,
) -> Vec<(Duration, Duration)> {
    let extra = (listeners.max(1) - 1).to_string();
    let ballast = ballast_mib.to_string();
    let mut server = Server::start(
        bin,
        &["--extra-listeners", &extra, "--ballast-mib", &ballast],
    );
    let mut out = Vec::new();
    for _ in 0..upgrades {
        let old = server.current();
        server
            .upgrade()
            .unwrap_or_else(|e| panic!("upgrade with {listeners} listeners failed: {e}"));
        let lines = server.log.lines();
        let took = lines
            .iter()
            .rev()
            .find(|l| {
                l.contains("upgrade: handed over")
                    && support::field(l, "pid").and_then(|p| p.parse::<u32>().ok()) == Some(old)
            })
            .and_then(|l| support::field(l, "took_us"))
            .and_then(|v| v.parse().ok())
            .map(Duration::from_micros);
        if let (Some((overhead, _)), Some(took)) = (overhead_of(&lines, old), took) {
            out.push((overhead, took));
        }
    }
    server.stop();
    out
}

/// One soak sample: after `upgrade` upgrades, the serving process's descriptors and memory.
pub struct SoakSample {
    pub upgrade: usize,
    pub pid: u32,
    pub fds: usize,
    pub fds_fixed: usize,
    /// What the descriptors counted in `fds_fixed` are (`fd -> target`).
    pub fixed: Vec<String>,
    pub rss: u64,
}

pub struct Soak {
    pub samples: Vec<SoakSample>,
    pub stats: Stats,
    pub upgrades: usize,
    pub took: Duration,
}

/// `upgrades` consecutive upgrades under `shape`'s continuous load (no idle connections), sampling every
/// `every`; prints each sample as it is taken.
pub fn soak(bin: &Path, shape: &LoadShape, upgrades: usize, every: usize) -> Soak {
    let mut server = Server::start_bare(bin, &["--drain-timeout", "10"]);
    let load = shape.start(server.addr);
    load.wait_progress(500);
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let sample = |n: usize, pid: u32| {
        let (fds, fixed) = measure::fds(pid);
        let s = SoakSample {
            upgrade: n,
            pid,
            fds,
            fds_fixed: fixed.len(),
            fixed,
            rss: measure::rss(pid).unwrap_or(0),
        };
        eprintln!(
            "  soak: after {:>5} upgrades: pid {:>7}, {:>3} fds ({} without connections), RSS {} KiB",
            s.upgrade,
            s.pid,
            s.fds,
            s.fds_fixed,
            s.rss / 1024
        );
        s
    };
    samples.push(sample(0, server.current()));
    for n in 1..=upgrades {
        server
            .upgrade()
            .unwrap_or_else(|e| panic!("soak upgrade {n} failed: {e}"));
        // Every generation serves some of the load before the next upgrade.
        load.wait_progress((shape.fresh + shape.keepalive) as u64 * 2);
        if n % every == 0 || n == upgrades {
            samples.push(sample(n, server.current()));
        }
    }
    let took = t0.elapsed();
    load.wait_progress(500);
    let stats = load.stop();
    server.stop();
    Soak {
        samples,
        stats,
        upgrades,
        took,
    }
}

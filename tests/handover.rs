//! The handover core, proven with real processes and sockets through both HTTP examples: the std one
//! (`examples/http_std.rs`, threads, no runtime) and the Tokio one (`examples/http_axum.rs`, through
//! `exuvia::tokio`). Every scenario runs against each.

#[macro_use]
mod support;

use std::time::Duration;

use support::*;

for_each_example!(
    ten_upgrades_under_load_lose_nothing,
    a_child_that_crashes_or_hangs_is_killed_and_the_parent_serves_on,
    a_storm_of_sighups_never_runs_two_upgrades_at_once,
    the_binary_on_disk_is_what_runs_after_it_is_replaced,
    nothing_but_the_sockets_and_the_channel_reaches_the_child,
    a_hundred_upgrades_do_not_grow_the_fd_count,
    the_drain_deadline_bounds_a_connection_that_never_finishes,
    background_initialisation_runs_the_new_process_at_idle_priority_until_ready,
);

fn assert_clean(stats: &Stats, what: &str) {
    assert!(stats.failures.is_empty(), "{what}: {}", stats.summary());
}

fn ten_upgrades_under_load_lose_nothing(server: &str) {
    let mut server = Server::start(&example(server), &["--drain-timeout", "20"]);
    let load = Load::start(server.addr, 4, 4, Duration::from_millis(2));
    let mut idle_stats = Stats::default();
    for i in 0..10 {
        load.wait_progress(1000);
        // Idle connections opened before the upgrade send their request after it.
        let idle = Idle::open(server.addr, 8);
        let old = server.current();
        let new = server
            .upgrade_started()
            .unwrap_or_else(|e| panic!("upgrade {i} failed: {e}"));
        // The old process is draining now; the idle clients wake up and must be served (by it).
        idle_stats.merge(idle.finish());
        assert!(
            wait_gone(old, Duration::from_secs(30)),
            "old process {old} did not finish its drain"
        );
        eprintln!("upgrade {i}: now pid {new}");
    }
    load.wait_progress(1000);
    let stats = load.stop();
    eprintln!("load: {}", stats.summary());
    eprintln!("idle: {}", idle_stats.summary());
    assert_clean(&stats, "continuous load");
    assert_clean(&idle_stats, "idle-before-upgrade connections");
    assert_eq!(idle_stats.ok, 80);
    assert!(
        stats.ok >= 11_000,
        "too little load to prove anything: {}",
        stats.summary()
    );
    assert!(stats.pids.len() >= 2, "served by {:?}", stats.pids);
    // Every old generation is gone; only the last one runs.
    let gens = server.generations.clone();
    assert_eq!(gens.len(), 11);
    for &old in &gens[..gens.len() - 1] {
        assert_eq!(zombie_state(old), None, "old pid {old} still exists");
    }
    server.stop();
}

fn a_child_that_crashes_or_hangs_is_killed_and_the_parent_serves_on(server: &str) {
    let dir = tempfile::tempdir().unwrap();
    let fault = dir.path().join("fault");
    let fault_s = fault.to_str().unwrap();
    let mut server = Server::start(
        &example(server),
        &[
            "--init-fault",
            fault_s,
            "--ready-timeout",
            "1.5",
            "--drain-timeout",
            "10",
        ],
    );
    let load = Load::start(server.addr, 2, 2, Duration::from_millis(3));
    let parent = server.current();

    for (fault_text, expected) in [
        ("fail", "child exited with status 3 during initialisation"),
        ("hang", "child not ready after 1.5 s; killed"),
        (
            "refuse",
            "child reported failure during initialisation: injected fault: configuration refused",
        ),
    ] {
        std::fs::write(&fault, fault_text).unwrap();
        let mark = server.log.len();
        let err = server
            .upgrade()
            .expect_err("a failing child must not take over");
        assert!(err.contains(expected), "{fault_text}: {err}");
        let (_, spawned) = server
            .log
            .wait_for(mark, Duration::ZERO, |l| l.contains("child spawned"))
            .unwrap();
        let child: u32 = field(&spawned, "child_pid").unwrap().parse().unwrap();
        assert_eq!(
            zombie_state(child),
            None,
            "{fault_text}: child {child} left a zombie or still runs"
        );
    }

    // The parent never stopped serving, and the next upgrade works.
    let (resp, _) = get(server.addr, "/").unwrap();
    assert_eq!(resp.pid, parent);
    std::fs::remove_file(&fault).unwrap();
    let new = server.upgrade().expect("upgrade after the faults");
    assert_ne!(new, parent);
    load.wait_progress(200);
    let stats = load.stop();
    eprintln!("load: {}", stats.summary());
    assert_clean(&stats, "load through crash, hang and recovery");
    assert!(stats.pids.contains(&parent) && stats.pids.contains(&new));
    server.stop();
}

fn a_storm_of_sighups_never_runs_two_upgrades_at_once(server: &str) {
    // Each child takes 300 ms to initialise, so the storm lands on upgrades in flight.
    let mut server = Server::start(
        &example(server),
        &["--init-delay-ms", "300", "--drain-timeout", "10"],
    );
    let load = Load::start(server.addr, 2, 2, Duration::from_millis(3));
    let mark = server.log.len();
    let start = std::time::Instant::now();
    for _ in 0..20 {
        // Aim at the newest process that reported serving.
        let lines = server.log.lines();
        let line = lines
            .iter()
            .rev()
            .find(|l| l.contains(" serving "))
            .unwrap();
        signal(pid_of(line), libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(45)); // pacing of the storm itself, not a readiness wait
    }
    assert!(start.elapsed() < Duration::from_millis(1500));
    // Let the last upgrade settle: wait until no upgrade is open in the log.
    let settled = server.log.wait_until(Duration::from_secs(30), |lines| {
        let (starts, ends) = count_upgrades(&lines[mark..]);
        starts == ends
    });
    assert!(settled, "upgrades did not settle:\n{}", server.log.dump());
    let lines = server.log.lines();
    let lines = &lines[mark..];
    // Upgrades never overlap: in log order, every start is followed by its end before the next start.
    let mut open = false;
    for l in lines {
        if l.contains("upgrade requested") && !l.contains("refused") {
            assert!(
                !open,
                "two upgrades in flight at once:\n{}",
                lines.join("\n")
            );
            open = true;
        } else if l.contains("child ready; handing over") || l.contains("upgrade failed") {
            assert!(
                open,
                "an upgrade ended that never started:\n{}",
                lines.join("\n")
            );
            open = false;
        }
    }
    let refused = lines
        .iter()
        .filter(|l| l.contains("refused") || l.contains("already handed over"))
        .count();
    let (started, _) = count_upgrades(lines);
    eprintln!("storm: 20 SIGHUPs -> {started} upgrades, {refused} refused");
    assert!(refused >= 1, "the storm never hit an upgrade in flight");
    assert!(started >= 1);
    // Each child reported its own 300 ms initialisation, which the parent tells apart from its overhead.
    for l in lines
        .iter()
        .filter(|l| l.contains("child ready; handing over"))
    {
        let us = |k: &str| -> u64 { field(l, k).and_then(|v| v.parse().ok()).unwrap() };
        let (after, init, overhead) =
            (us("ready_after_us"), us("child_init_us"), us("overhead_us"));
        assert!(
            init >= 300_000,
            "child init {init} us < the 300 ms it slept: {l}"
        );
        assert_eq!(overhead, after - init, "{l}");
    }
    let stats = load.stop();
    eprintln!("load: {}", stats.summary());
    assert_clean(&stats, "load through the storm");
    // Exactly one generation is left serving: the child of the last successful handover. All others exit.
    let last: u32 = lines
        .iter()
        .rev()
        .find(|l| l.contains("child ready; handing over"))
        .and_then(|l| field(l, "child_pid"))
        .map(|p| p.parse().unwrap())
        .unwrap_or(server.current());
    assert!(
        server.log.wait_until(Duration::from_secs(30), |ls| ls
            .iter()
            .any(|l| l.contains(" serving ") && pid_of(l) == last)),
        "last generation {last} never served"
    );
    let serving: Vec<u32> = server
        .log
        .lines()
        .iter()
        .filter(|l| l.contains(" serving "))
        .map(|l| pid_of(l))
        .collect();
    server.generations.extend(serving.iter().copied());
    for &p in &server.generations {
        if p != last {
            assert!(
                wait_gone(p, Duration::from_secs(20)),
                "old pid {p} still running"
            );
        }
    }
    let (resp, _) = get(server.addr, "/").unwrap();
    assert_eq!(resp.pid, last);
    server.stop();
}

fn count_upgrades(lines: &[String]) -> (usize, usize) {
    let starts = lines
        .iter()
        .filter(|l| l.contains("upgrade requested") && !l.contains("refused"))
        .count();
    let ends = lines
        .iter()
        .filter(|l| l.contains("child ready; handing over") || l.contains("upgrade failed"))
        .count();
    (starts, ends)
}

fn the_binary_on_disk_is_what_runs_after_it_is_replaced(server: &str) {
    // Build a second version of the example, as a package upgrade would install it.
    let v1 = example(server);
    let target = v1
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("exuvia-next-version");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = std::process::Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--all-features",
            "--example",
            server,
            "--target-dir",
        ])
        .arg(&target)
        .env("EXUVIA_EXAMPLE_VERSION", "9.9.9-next")
        .status()
        .unwrap();
    assert!(st.success(), "building the next version failed");
    let v2 = target.join("debug/examples").join(server);

    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app");
    std::fs::copy(&v1, &app).unwrap();
    let mut server = Server::start(&app, &["--drain-timeout", "10"]);
    let load = Load::start(server.addr, 2, 2, Duration::from_millis(3));
    let (r, _) = get(server.addr, "/").unwrap();
    assert_eq!(r.version, env!("CARGO_PKG_VERSION"));
    // Replace the file the way package managers do: write a new file, rename it over the old one. The running
    // process's /proc/self/exe now points at a deleted inode.
    let staged = dir.path().join("app.new");
    std::fs::copy(&v2, &staged).unwrap();
    std::fs::rename(&staged, &app).unwrap();
    let old = server.current();
    let exe = std::fs::read_link(format!("/proc/{old}/exe")).unwrap();
    assert!(
        exe.to_string_lossy().ends_with("(deleted)"),
        "{}",
        exe.display()
    );

    let new = server.upgrade().expect("upgrade to the replaced binary");
    let (r, _) = get(server.addr, "/").unwrap();
    assert_eq!((r.pid, r.version.as_str()), (new, "9.9.9-next"));
    load.wait_progress(200);
    let stats = load.stop();
    assert_clean(&stats, "load across the binary replacement");
    assert!(stats.versions.contains("9.9.9-next"));
    server.stop();
}

fn nothing_but_the_sockets_and_the_channel_reaches_the_child(server: &str) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("parent-only.txt");
    std::fs::write(&secret, "x").unwrap();
    let mut server =
        Server::start_bare(&example(server), &["--hold-open", secret.to_str().unwrap()]);
    let parent = server.current();
    let parent_fds = open_fds(parent);
    assert!(
        parent_fds
            .iter()
            .any(|(_, t)| t.contains("parent-only.txt")),
        "the parent should hold the file: {parent_fds:?}"
    );
    // The new process runs with the same arguments, so it opens the file once itself; the parent's copy,
    // opened without close-on-exec, must not come along as a second one.
    let new = server.upgrade().unwrap();
    let child_fds = open_fds(new);
    let (_, env) = get(server.addr, "/env").unwrap();
    assert_eq!(
        env, "",
        "the child still sees fd-passing variables: {env:?}"
    );
    // The environment the child was executed with: LISTEN_PID is its own pid.
    let environ = std::fs::read(format!("/proc/{new}/environ")).unwrap();
    let vars: Vec<String> = environ
        .split(|&b| b == 0)
        .map(|v| String::from_utf8_lossy(v).to_string())
        .collect();
    assert!(vars.contains(&format!("LISTEN_PID={new}")), "{vars:?}");
    assert!(vars.contains(&"LISTEN_FDS=1".to_string()));
    assert!(vars.contains(&"LISTEN_FDNAMES=http".to_string()));
    assert!(vars.contains(&format!("EXUVIA_HANDOVER_PID={new}")));
    assert!(vars.contains(&"EXUVIA_HANDOVER_FD=4".to_string()));
    // No descriptor of the parent reaches the child except the listening sockets it was handed (fds 3.. per
    // LISTEN_FDS): not the file the parent holds without close-on-exec (the child opens its own, so exactly one
    // copy), not the strays the parent inherited from the test harness (cargo's jobserver pipe, say). What the
    // child opened itself (its runtime's sockets and pipes, the connection serving /env) is its own business.
    let listen_fds: usize = vars
        .iter()
        .find_map(|v| v.strip_prefix("LISTEN_FDS="))
        .and_then(|n| n.parse().ok())
        .unwrap();
    let handed: Vec<&str> = child_fds
        .iter()
        .filter(|(n, _)| (3..3 + listen_fds as i32).contains(n))
        .map(|(_, t)| t.as_str())
        .collect();
    assert_eq!(handed.len(), listen_fds, "{child_fds:?}");
    assert!(
        handed.iter().all(|t| t.starts_with("socket:")),
        "{child_fds:?}"
    );
    let parent_targets: Vec<&str> = parent_fds
        .iter()
        .filter(|(n, _)| *n > 2)
        .map(|(_, t)| t.as_str())
        .collect();
    let mut held = 0;
    for (n, t) in child_fds.iter().filter(|(n, _)| *n > 2) {
        if t.contains("parent-only.txt") {
            held += 1;
        } else if t.starts_with("anon_inode:") {
            // epoll/eventfd: every anonymous inode reads alike, so there is nothing to compare; close_range
            // treats them like every other descriptor anyway.
        } else if parent_targets.contains(&t.as_str()) {
            assert!(
                handed.contains(&t.as_str()),
                "child fd {n} ({t}) leaked from the parent"
            );
        }
    }
    assert_eq!(held, 1, "parent {parent_fds:?}\nchild {child_fds:?}");
    server.stop();
}

fn a_hundred_upgrades_do_not_grow_the_fd_count(server: &str) {
    // Bare: a control connection being closed would count as a descriptor of the new process.
    let mut server = Server::start_bare(&example(server), &["--drain-timeout", "5"]);
    let mut counts = Vec::new();
    for i in 0..100 {
        let new = server
            .upgrade()
            .unwrap_or_else(|e| panic!("upgrade {i}: {e}"));
        let (r, _) = get_and_wait_close(server.addr, "/").unwrap();
        assert_eq!(r.pid, new);
        let connections = tcp_connection_sockets(new);
        counts.push(
            open_fds(new)
                .iter()
                .filter(|(_, t)| !connections.contains(t))
                .count(),
        );
    }
    eprintln!(
        "fd counts: first {:?} last {:?}",
        &counts[..3],
        &counts[97..]
    );
    assert!(
        counts.iter().all(|&c| c == counts[0]),
        "fd count changed: {counts:?}"
    );
    server.stop();
}

fn the_drain_deadline_bounds_a_connection_that_never_finishes(server: &str) {
    // Connections that do not move (turned off), as a service that drains has them.
    let mut server = Server::start(&example(server), &["--drain-timeout", "1", "--no-move"]);
    // A keep-alive connection the parent has accepted and served once, then left idle for ever.
    let mut idle = connect(server.addr).unwrap();
    let r = request(&mut idle, "/", true).unwrap();
    let old = r.pid;
    assert_eq!(old, server.current());
    let mark = server.log.len();
    let t0 = std::time::Instant::now();
    server.upgrade_started().unwrap();
    let (_, drained) = server
        .log
        .wait_for(mark, Duration::from_secs(10), |l| {
            l.contains("drain finished") && pid_of(l) == old
        })
        .expect("the old process never finished its drain");
    assert_eq!(field(&drained, "left").as_deref(), Some("1"), "{drained}");
    assert!(wait_gone(old, Duration::from_secs(10)));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "drain ended before its deadline: {took:?}"
    );
    // The idle connection died with the old process; new ones are served by the new one.
    let (r, _) = get(server.addr, "/").unwrap();
    assert_ne!(r.pid, old);
    server.stop();
}

/// Whether this test process may return a thread from SCHED_IDLE to normal (root has CAP_SYS_NICE), which
/// the server it starts inherits.
fn may_leave_idle_priority() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a live struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut lim) };
    eff & (1 << 23) != 0 || lim.rlim_cur >= 20
}

fn background_initialisation_runs_the_new_process_at_idle_priority_until_ready(server: &str) {
    const SCHED_OTHER: i32 = 0;
    const SCHED_IDLE: i32 = 5;
    let mut server = Server::start(
        &example(server),
        &[
            "--background-init",
            "--init-delay-ms",
            "500",
            "--drain-timeout",
            "10",
        ],
    );
    let load = Load::start(server.addr, 2, 2, Duration::from_millis(3));
    let old = server.current();
    let mark = server.log.len();
    assert!(signal(old, libc::SIGHUP));
    let (_, spawned) = server
        .log
        .wait_for(mark, Duration::from_secs(30), |l| {
            l.contains("child spawned")
        })
        .unwrap_or_else(|| panic!("no child spawned:\n{}", server.log.dump()));
    let child: u32 = field(&spawned, "child_pid").unwrap().parse().unwrap();
    // The child is in its 500 ms initialisation now (spawn returns only after its exec).
    let during = thread_policies(child);
    let new = server
        .await_verdict(old, mark)
        .unwrap_or_else(|e| panic!("upgrade failed: {e}"));
    assert_eq!(new, child);
    let after = thread_policies(new);
    eprintln!("policies during initialisation {during:?}, after ready {after:?}");
    if may_leave_idle_priority() {
        assert!(
            during.iter().all(|(_, p)| *p == SCHED_IDLE),
            "not at idle priority while initialising: {during:?}"
        );
    } else {
        // Without the privilege to come back, the upgrade says so and does not demote.
        assert!(server.log.lines()[mark..]
            .iter()
            .any(|l| l.contains("background initialisation skipped")));
        assert!(during.iter().all(|(_, p)| *p == SCHED_OTHER), "{during:?}");
    }
    assert!(
        after.iter().all(|(_, p)| *p == SCHED_OTHER),
        "a thread stayed at idle priority after ready: {after:?}"
    );
    assert!(wait_gone(old, Duration::from_secs(30)));
    let stats = load.stop();
    assert_clean(&stats, "load through a background initialisation");
    server.stop();
}

//! Faults inside the upgrade window, with real processes: a stop while the new process initialises, the old
//! process killed meanwhile, a new binary that is a wrapper starting processes of its own, the OOM score, and
//! a forged environment. Each scenario runs against both HTTP examples.

#[macro_use]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::*;

for_each_example!(
    a_stop_while_the_new_process_initialises_kills_it_at_once,
    the_new_process_ends_itself_when_the_old_one_dies_before_the_handover,
    a_failed_wrapper_takes_what_it_started_with_it,
    the_new_process_is_the_oom_victim_until_it_is_committed,
    a_channel_named_among_the_sockets_is_refused_at_start,
    a_sighup_under_a_process_limit_fails_the_upgrade_and_signals_still_work,
    memory_pressure_during_an_upgrade_costs_the_upgrade_not_the_service,
    a_sighup_to_the_new_process_before_it_is_ready_is_applied_after,
    running_out_of_descriptors_while_placing_them_says_so,
    an_unnamed_inherited_file_is_closed_not_handed_on,
);

/// A cgroup (v1, one controller) of this test's own, removed on drop after its processes are moved back.
struct Cgroup {
    root: PathBuf,
    dir: PathBuf,
}

impl Cgroup {
    /// `None` (a loud skip, a failure under CI) where the controller is not there to write.
    fn new(controller: &str, name: &str) -> Option<Cgroup> {
        let root = Path::new("/sys/fs/cgroup").join(controller);
        let dir = root.join(format!("exuvia-test-{}-{name}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => Some(Cgroup { root, dir }),
            Err(e) => {
                skip(
                    &format!("a test in a {controller} cgroup ({name})"),
                    &format!(
                        "cannot create {} ({e}); needs root and the cgroup v1 {controller} controller",
                        dir.display()
                    ),
                );
                None
            }
        }
    }

    fn set(&self, file: &str, value: &str) {
        std::fs::write(self.dir.join(file), value)
            .unwrap_or_else(|e| panic!("{file} = {value}: {e}"));
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    fn tasks(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("pids.current"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn limit(&self, max: &str) {
        self.set("pids.max", max);
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for p in procs.lines() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), p);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The example copied to `dir/app` (what the server runs and re-executes on upgrade) and `dir/real`.
fn app_in(dir: &Path, server: &str) -> (PathBuf, PathBuf) {
    let app = dir.join("app");
    let real = dir.join("real");
    std::fs::copy(example(server), &app).unwrap();
    std::fs::copy(example(server), &real).unwrap();
    (app, real)
}

/// Replaces `app` (by rename, as an install does) with a shell script that starts `sleep 300` in the
/// background, writes its pid to `pidfile`, then becomes `real` with the same arguments: a wrapper whose
/// background job belongs to the new process's group.
fn install_wrapper(app: &Path, real: &Path, pidfile: &Path) {
    let tmp = app.with_extension("new");
    wrapper(
        &tmp,
        &format!("sleep 300 &\necho $! > '{}'", pidfile.display()),
        real,
    );
    std::fs::rename(&tmp, app).unwrap();
}

/// Waits for the pid in `pidfile` (written by the wrapper).
fn read_pid(pidfile: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(p) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return p;
        }
        assert!(Instant::now() < deadline, "the wrapper never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGHUPs the current generation and returns the new process's pid from the `child spawned` line.
fn start_upgrade(server: &Server) -> u32 {
    let old = server.current();
    let mark = server.log.len();
    assert!(signal(old, libc::SIGHUP));
    let (_, line) = server
        .log
        .wait_for(mark, Duration::from_secs(30), |l| {
            l.contains("upgrade: child spawned") && pid_of(l) == old
        })
        .unwrap_or_else(|| panic!("no child spawned:\n{}", server.log.dump()));
    field(&line, "child_pid").unwrap().parse().unwrap()
}

/// Waits until the new process says it hangs (it is initialising for good).
fn wait_hanging(server: &Server, child: u32) {
    server
        .log
        .wait_for(0, Duration::from_secs(30), |l| {
            l.contains("never reporting ready") && pid_of(l) == child
        })
        .unwrap_or_else(|| panic!("{child} did not start hanging:\n{}", server.log.dump()));
}

fn oom_score(pid: u32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn a_stop_while_the_new_process_initialises_kills_it_at_once(server: &str) {
    let dir = tempfile::tempdir().unwrap();
    let fault = dir.path().join("fault");
    let server = Server::start(
        &example(server),
        &[
            "--init-fault",
            fault.to_str().unwrap(),
            "--ready-timeout",
            "60",
        ],
    );
    std::fs::write(&fault, "hang").unwrap();
    let load = Load::start(server.addr, 2, 2, Duration::from_millis(3));
    load.wait_progress(200);
    let child = start_upgrade(&server);
    wait_hanging(&server, child);
    // The old process keeps serving while the new one initialises.
    load.wait_progress(200);
    let st = load.stop();
    assert!(st.failures.is_empty(), "{}", st.summary());
    let old = server.current();
    let child_fd = pidfd(child).expect("the new process is gone already");
    let t0 = Instant::now();
    assert!(signal(old, libc::SIGTERM));
    assert!(
        wait_pidfd(&child_fd, Duration::from_secs(5)),
        "the new process outlived the stop"
    );
    let child_gone = t0.elapsed();
    assert!(
        wait_gone(old, Duration::from_secs(30)),
        "{old} did not stop"
    );
    let stopped = t0.elapsed();
    eprintln!(
        "stop during an upgrade: new process gone after {child_gone:?}, old after {stopped:?}"
    );
    assert!(
        stopped < Duration::from_secs(5),
        "the stop waited for something: {stopped:?}"
    );
    // The process has exited; its last lines may still be on their way through the pipe to the log reader.
    assert!(
        server
            .log
            .wait_for(0, Duration::from_secs(5), |l| {
                l.contains("upgrade abandoned: this process is stopping")
            })
            .is_some(),
        "{}",
        server.log.dump()
    );
}

fn the_new_process_ends_itself_when_the_old_one_dies_before_the_handover(server: &str) {
    let dir = tempfile::tempdir().unwrap();
    let fault = dir.path().join("fault");
    let pidfile = dir.path().join("bg.pid");
    let (app, real) = app_in(dir.path(), server);
    let mut server = Server::start(
        &app,
        &[
            "--init-fault",
            fault.to_str().unwrap(),
            "--ready-timeout",
            "60",
        ],
    );
    std::fs::write(&fault, "hang").unwrap();
    install_wrapper(&app, &real, &pidfile);
    let child = start_upgrade(&server);
    wait_hanging(&server, child);
    let background = read_pid(&pidfile);
    let (child_fd, bg_fd) = (pidfd(child).unwrap(), pidfd(background).unwrap());
    let old = server.current();
    let t0 = Instant::now();
    assert!(signal(old, libc::SIGKILL));
    assert!(wait_gone(old, Duration::from_secs(5)));
    assert!(
        wait_pidfd(&child_fd, Duration::from_secs(5)),
        "the new process became a stray"
    );
    let child_gone = t0.elapsed();
    assert!(
        wait_pidfd(&bg_fd, Duration::from_secs(5)),
        "what the new process started became a stray"
    );
    eprintln!(
        "old process killed during an upgrade: new process and its group gone after {child_gone:?}"
    );
    // Nothing holds the port: a fresh server can bind it again.
    let addr = server.addr;
    server.generations.clear();
    let again = Server::start_on(&real, &addr.to_string(), &[]);
    let (r, _) = get(again.addr, "/").unwrap();
    assert_eq!(r.pid, again.current());
    again.stop();
}

fn a_failed_wrapper_takes_what_it_started_with_it(server: &str) {
    let dir = tempfile::tempdir().unwrap();
    let fault = dir.path().join("fault");
    let pidfile = dir.path().join("bg.pid");
    let (app, real) = app_in(dir.path(), server);
    let mut server = Server::start(&app, &["--init-fault", fault.to_str().unwrap()]);
    let load = Load::start(server.addr, 2, 2, Duration::from_millis(3));
    load.wait_progress(200);
    std::fs::write(&fault, "fail").unwrap();
    install_wrapper(&app, &real, &pidfile);
    let e = server.upgrade().unwrap_err();
    assert!(e.contains("status 3"), "{e}");
    let background = read_pid(&pidfile);
    assert!(
        wait_gone(background, Duration::from_secs(5)),
        "the wrapper's background job outlived the failed upgrade"
    );
    assert_eq!(zombie_state(background), None);
    load.wait_progress(200);
    let st = load.stop();
    assert!(st.failures.is_empty(), "{}", st.summary());
    server.stop();
}

fn the_new_process_is_the_oom_victim_until_it_is_committed(server: &str) {
    let dir = tempfile::tempdir().unwrap();
    let fault = dir.path().join("fault");
    let mut server = Server::start(
        &example(server),
        &[
            "--init-fault",
            fault.to_str().unwrap(),
            "--ready-timeout",
            "60",
        ],
    );
    let old = server.current();
    let before = oom_score(old);
    std::fs::write(&fault, "hang").unwrap();
    let child = start_upgrade(&server);
    wait_hanging(&server, child);
    assert_eq!(oom_score(child), 1000, "initialising");
    assert_eq!(oom_score(old), before, "the old process's score changed");
    // A new process killed while it initialises is a failed upgrade; then the next one succeeds.
    let mark = server.log.len();
    signal(child, libc::SIGKILL);
    server
        .log
        .wait_for(mark, Duration::from_secs(30), |l| {
            // Logged once the upgrade has ended (the next SIGHUP is then not refused as "in flight").
            l.contains("upgrade on SIGHUP did not happen")
        })
        .expect("the killed new process was not reported");
    std::fs::write(&fault, "").unwrap();
    let new = server.upgrade().unwrap();
    assert_eq!(
        oom_score(new),
        before,
        "the committed process kept the probation score"
    );
    server.stop();
}

fn a_channel_named_among_the_sockets_is_refused_at_start(server: &str) {
    // LISTEN_PID=$$ and exec keep the pid, so the variables are for the program; fd 3 is both a socket of
    // LISTEN_FDS and the channel.
    let out = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "export LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=a:b EXUVIA_HANDOVER_FD=3 EXUVIA_HANDOVER_PID=$$; \
             exec '{}' --listen 127.0.0.1:0 3</dev/null 4</dev/null",
            example(server).display()
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("EXUVIA_HANDOVER_FD=3 names one of the 2 sockets"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn a_sighup_under_a_process_limit_fails_the_upgrade_and_signals_still_work(server: &str) {
    let Some(cgroup) = Cgroup::new("pids", server) else {
        return;
    };
    let mut server = Server::start(&example(server), &[]);
    let old = server.current();
    let mut keep = connect(server.addr).unwrap();
    request(&mut keep, "/", true).unwrap();
    cgroup.add(old);
    // Not one more thread or process.
    cgroup.limit(&cgroup.tasks().to_string());
    let mark = server.log.len();
    assert!(signal(old, libc::SIGHUP));
    let (_, line) = server
        .log
        .wait_for(mark, Duration::from_secs(30), |l| {
            pid_of(l) == old
                && (l.contains("upgrade failed") || l.contains("cannot start a thread"))
        })
        .unwrap_or_else(|| panic!("no verdict under the limit:\n{}", server.log.dump()));
    eprintln!("under the limit: {line}");
    // Still serving, still handling signals.
    let r = request(&mut keep, "/", true).unwrap();
    assert_eq!(r.pid, old);
    assert!(
        !server.log.lines().iter().any(|l| l.contains("panicked")),
        "{}",
        server.log.dump()
    );
    cgroup.limit("max");
    drop(keep); // or the old process would drain it until its deadline
    let new = server
        .upgrade()
        .expect("the upgrade after the limit was lifted");
    let (r, _) = get(server.addr, "/").unwrap();
    assert_eq!(r.pid, new);
    server.stop();
}

fn memory_pressure_during_an_upgrade_costs_the_upgrade_not_the_service(server: &str) {
    let Some(cgroup) = Cgroup::new("memory", server) else {
        return;
    };
    // Each generation holds 60 MiB; the cgroup allows 100 MiB: the old one fits, not both. The program is
    // started through a wrapper that enters the cgroup first (cgroup v1 charges memory where it is
    // allocated), and every generation execs the same wrapper.
    cgroup.set("memory.limit_in_bytes", &(100u64 << 20).to_string());
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app");
    wrapper(
        &app,
        &format!("echo $$ > '{}'", cgroup.dir.join("cgroup.procs").display()),
        &example(server),
    );
    let mut server = Server::start(&app, &["--ballast-mib", "60"]);
    let old = server.current();
    let load = Load::start(server.addr, 2, 2, Duration::from_millis(3));
    load.wait_progress(200);
    // If the old process dies meanwhile, the helper cannot ask it for the verdict: say what the kernel did.
    let upgrade = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.upgrade()));
    let e = match upgrade {
        Ok(verdict) => verdict.unwrap_err(),
        Err(panic) => panic!(
            "{}\n--- the kernel's OOM kills (old pid {old}) ---\n{}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default(),
            oom_kills()
        ),
    };
    eprintln!("upgrade under memory pressure: {e}");
    assert!(
        e.contains("(SIGKILL)"),
        "the new process was not the one killed: {e}"
    );
    load.wait_progress(200);
    let st = load.stop();
    assert!(st.failures.is_empty(), "{}", st.summary());
    assert_eq!(st.pids, [old].into_iter().collect(), "{}", st.summary());
    assert_eq!(
        zombie_state(old),
        Some(false),
        "the old process was killed:\n{}",
        oom_kills()
    );
    server.stop();
}

/// The kernel log's recent OOM kills (`dmesg`; empty where it cannot be read): which process the OOM killer
/// took, in which memory cgroup, and why it was invoked.
fn oom_kills() -> String {
    let out = std::process::Command::new("dmesg").output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("invoked oom-killer")
                || l.contains("Killed process")
                || l.contains("oom-kill:")
        })
        .collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

fn a_sighup_to_the_new_process_before_it_is_ready_is_applied_after(server: &str) {
    // With `systemctl reload`, the signal goes to whatever systemd has as the main process: from the handover
    // on, the new process, possibly before its commit. Here sent to it while it initialises (1 s).
    let mut server = Server::start(&example(server), &["--init-delay-ms", "1000"]);
    let load = Load::start(server.addr, 2, 2, Duration::from_millis(3));
    load.wait_progress(100);
    let old = server.current();
    let mark = server.log.len();
    let child = start_upgrade(&server);
    // Its handlers are installed before it initialises (as a SIGHUP must never find it without them).
    server
        .log
        .wait_for(mark, Duration::from_secs(30), |l| {
            pid_of(l) == child && l.contains(" initialising ")
        })
        .expect("the new process did not start initialising");
    assert!(signal(child, libc::SIGHUP), "the new process is gone");
    server
        .log
        .wait_for(mark, Duration::from_secs(30), |l| {
            pid_of(l) == child && l.contains("the upgrade runs once it is")
        })
        .unwrap_or_else(|| panic!("the early SIGHUP was not deferred:\n{}", server.log.dump()));
    // The first upgrade completes...
    let first = server.await_verdict(old, mark).expect("the first upgrade");
    assert_eq!(first, child);
    // ...and the new process then runs the one its SIGHUP asked for.
    let second = server
        .await_verdict(child, mark)
        .expect("the deferred upgrade");
    assert_ne!(second, child);
    assert!(wait_gone(old, Duration::from_secs(30)));
    assert!(wait_gone(child, Duration::from_secs(30)));
    load.wait_progress(100);
    let st = load.stop();
    assert!(st.failures.is_empty(), "{}", st.summary());
    server.stop();
}

fn running_out_of_descriptors_while_placing_them_says_so(server: &str) {
    // 20 extra listeners under a descriptor limit of 64 (soft and hard): the old process fits, but the new one
    // also needs a second copy of each socket while it puts them in place.
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app");
    wrapper(&app, "ulimit -n 64", &example(server));
    let mut server = Server::start_bare(&app, &["--extra-listeners", "20"]);
    let e = server.upgrade().unwrap_err();
    eprintln!("placing descriptors under a limit: {e}");
    assert!(
        e.contains("cannot place the")
            && e.contains("Too many open files")
            && e.contains("LimitNOFILE="),
        "{e}"
    );
    let (r, _) = get(server.addr, "/").unwrap();
    assert_eq!(r.pid, server.current());
    server.stop();
}

fn an_unnamed_inherited_file_is_closed_not_handed_on(server: &str) {
    // fd 3 is a regular file and LISTEN_FDS=1 names it without LISTEN_FDNAMES: something in the environment
    // meant no socket for this service. It is closed at start and never reaches a later generation.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "x").unwrap();
    let wrapped = dir.path().join("wrapped");
    wrapper(
        &wrapped,
        &format!(
            "if [ -z \"$EXUVIA_HANDOVER_FD\" ]; then export LISTEN_PID=$$ LISTEN_FDS=1; unset LISTEN_FDNAMES; \
             exec 3<'{}'; fi",
            file.display()
        ),
        &example(server),
    );
    let mut s = Server::start_bare(&wrapped, &[]);
    let first = s.current();
    let holds = |pid: u32| {
        open_fds(pid)
            .iter()
            .any(|(_, target)| target.contains("not-a-socket"))
    };
    assert!(
        !holds(first),
        "{first} kept the file: {:?}",
        open_fds(first)
    );
    let new = s.upgrade().expect("an upgrade");
    assert!(
        !holds(new),
        "{new} was handed the file: {:?}",
        open_fds(new)
    );
    // It still serves on its own socket.
    let (r, _) = get(s.addr, "/").unwrap();
    assert_eq!(r.pid, new);
    s.stop();
}

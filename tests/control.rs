//! The control socket and the `exuvia-ctl` helper, driven for real (no systemd needed).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::*;

fn ctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_exuvia-ctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run exuvia-ctl")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn upgrade_verdicts_status_and_stop_through_the_helper() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let fault = dir.path().join("fault");
    let mut server = Server::start(
        &example("http_std"),
        &[
            "--control-socket",
            sock.to_str().unwrap(),
            "--init-fault",
            fault.to_str().unwrap(),
        ],
    );
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket must be private");

    let o = ctl(&sock, &["status"]);
    assert!(o.status.success(), "{}", text(&o));
    // Idle: no connection in flight (the control request itself is not one).
    assert!(
        text(&o).contains(&format!(
            "pid={} generation=0 origin=fresh connections=0 ",
            server.current()
        )),
        "{}",
        text(&o)
    );

    // A successful upgrade: exit 0 and the new pid, which then serves.
    let o = ctl(&sock, &["upgrade"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    let new: u32 = out
        .split_whitespace()
        .nth(3)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    let (r, _) = get(server.addr, "/").unwrap();
    assert_eq!(r.pid, new);
    server.generations.push(new);
    // The control socket moved with the other sockets: the new process answers on the same path.
    let o = ctl(&sock, &["status"]);
    assert!(
        text(&o).contains(&format!("pid={new} generation=1")),
        "{}",
        text(&o)
    );

    // A failed upgrade: exit 1 with the reason, and the process serves on.
    std::fs::write(&fault, "fail").unwrap();
    let o = ctl(&sock, &["upgrade"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("child exited with status 3 during initialisation"),
        "{}",
        text(&o)
    );
    let (r, _) = get(server.addr, "/").unwrap();
    assert_eq!(r.pid, new);
    std::fs::remove_file(&fault).unwrap();

    // Stop: returns once the service has drained and exited.
    let o = ctl(&sock, &["stop"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        wait_gone(new, Duration::from_secs(1)),
        "stop returned before the service exited"
    );
}

#[test]
fn another_user_is_refused_and_bad_requests_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let server = Server::start(
        &example("http_std"),
        &["--control-socket", sock.to_str().unwrap()],
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Open the file to everyone so that only the uid check stands in the way.
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // The other user must be able to run the helper: the checkout may sit in a private home directory.
        // A hard link, not a copy: a copy is open for writing for a moment, and a process forked meanwhile by
        // another test would make exec fail with "text file busy".
        let ctl_copy = dir.path().join("exuvia-ctl");
        if std::fs::hard_link(env!("CARGO_BIN_EXE_exuvia-ctl"), &ctl_copy).is_err() {
            std::fs::copy(env!("CARGO_BIN_EXE_exuvia-ctl"), &ctl_copy).unwrap();
            std::fs::set_permissions(&ctl_copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let run = || {
            Command::new(&ctl_copy)
                .arg("--socket")
                .arg(&sock)
                .arg("status")
                .uid(65534)
                .gid(65534)
                .output()
        };
        // A copy may still be "busy" while a process forked by another test holds its write fd until exec.
        let mut tries = 0;
        let o = loop {
            match run() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other.unwrap(),
            }
        };
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("permission denied"), "{}", text(&o));
    } else {
        skip(
            "the other-user part of the control socket test",
            "needs root to run a client as another uid",
        );
    }
    // Garbage and unknown commands get an error line, never a hang or a crash.
    use std::io::{Read, Write};
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.write_all(b"GET / HTTP/1.1\n").unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("error unsupported protocol"), "{reply}");
    let o = ctl(&sock, &["status"]);
    assert!(o.status.success());
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.write_all(b"exuvia-ctl/1 frobnicate\n").unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("error unknown command"), "{reply}");
    // No socket: a clear error, exit 2.
    let o = ctl(&dir.path().join("absent.sock"), &["status"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("cannot reach the control socket"),
        "{}",
        text(&o)
    );
    server.stop();
}

#[test]
fn a_deleted_control_socket_is_bound_again_and_a_planted_symlink_is_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let mut server = Server::start(
        &example("http_std"),
        &["--control-socket", sock.to_str().unwrap()],
    );
    // The verdicts come from the log here: the helper cannot reach a socket whose file is gone.
    server.control = None;
    // A tmp cleaner deletes the socket file: the next generation binds it again (the upgrade succeeds).
    std::fs::remove_file(&sock).unwrap();
    let new = server
        .upgrade()
        .expect("upgrade with the control socket's file gone");
    let o = ctl(&sock, &["status"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(&format!("pid={new} ")), "{}", text(&o));
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the re-created control socket must be private");
    // And the one after that inherits it as usual.
    let o = ctl(&sock, &["upgrade"]);
    assert!(o.status.success(), "{}", text(&o));
    let by_ctl: u32 = text(&o)
        .split_whitespace()
        .skip_while(|w| *w != "pid")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {}", text(&o)));
    assert!(wait_gone(new, Duration::from_secs(30)));
    server.generations.push(by_ctl);

    // Someone deletes it and plants a symlink to a file of theirs: nothing follows it, the upgrade succeeds.
    let target = dir.path().join("victim");
    std::fs::write(&target, "x").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::remove_file(&sock).unwrap();
    std::os::unix::fs::symlink(&target, &sock).unwrap();
    let newest = server
        .upgrade()
        .expect("upgrade with a symlink at the control socket's path");
    assert_ne!(newest, by_ctl);
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "the symlink's target was changed");
    assert!(server
        .log
        .lines()
        .iter()
        .any(|l| pid_of(l) == newest && l.contains("no longer a socket")));
    server.stop();
}

/// Threads of a process that serve control requests (named `exuvia-control-conn`, cut to 15 bytes).
fn control_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "exuvia-control-")
        })
        .count()
}

#[test]
fn many_slow_or_silent_clients_cannot_exhaust_or_hold_the_service() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let server = Server::start(
        &example("http_std"),
        &[
            "--control-socket",
            sock.to_str().unwrap(),
            "--drain-timeout",
            "30",
        ],
    );
    let pid = server.current();
    // 40 clients that connect and say nothing: all wait in the control thread's one poll (no thread each),
    // each is answered at its 2 s deadline, and meanwhile the helper is served at once.
    let mut silent: Vec<std::os::unix::net::UnixStream> = (0..40)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap())
        .collect();
    let o = ctl(&sock, &["status"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(control_threads(pid), 0, "a thread per silent client");
    let mut timed_out = 0;
    for c in &mut silent {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        assert!(reply.contains("within 2 s"), "{reply:?}");
        timed_out += 1;
    }
    eprintln!("40 silent clients: {timed_out} answered at their 2 s deadline, no thread each");
    // Every request thread ends once its client has its answer.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while control_threads(pid) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "request threads left behind: {}",
            control_threads(pid)
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // A client trickling its request one byte a second cannot hold a stop for the drain timeout.
    let mut trickle = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let trickler = std::thread::spawn(move || {
        for b in b"exuvia-ctl/1 status\n" {
            if trickle.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let t0 = std::time::Instant::now();
    let o = ctl(&sock, &["stop"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(wait_gone(pid, Duration::from_secs(10)));
    let took = t0.elapsed();
    eprintln!("stop with a trickling client connected: {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "the trickling client held the stop: {took:?}"
    );
    trickler.join().unwrap();
}

#[test]
fn the_helper_bounds_what_it_reads() {
    // Something at the control socket's path that answers with an endless line.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let flood = std::thread::spawn(move || {
        use std::io::Write;
        let (mut c, _) = listener.accept().unwrap();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..64 {
            if c.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let o = ctl(&sock, &["status"]);
    assert!(!o.status.success());
    let out = text(&o);
    assert!(out.len() < 200 * 1024, "printed {} bytes", out.len());
    assert!(
        out.contains("cut off after 65536 bytes"),
        "{}",
        &out[..out.len().min(300)]
    );
    assert!(
        !out.contains("panicked") && !out.contains("memory allocation"),
        "{out}"
    );
    flood.join().unwrap();
}

/// CPU time (user + system) a process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based over the whole line).
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn out_of_descriptors_the_control_socket_backs_off_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let app = dir.path().join("app");
    wrapper(&app, "ulimit -n 48", &example("http_std"));
    let server = Server::start(&app, &["--control-socket", sock.to_str().unwrap()]);
    let pid = server.current();
    // Fill its descriptor table with idle client connections.
    let mut clients = Vec::new();
    for _ in 0..60 {
        match connect(server.addr) {
            Ok(c) => clients.push(c),
            Err(_) => break,
        }
    }
    server
        .log
        .wait_for(0, Duration::from_secs(10), |l| {
            l.contains("Too many open files")
        })
        .expect("the descriptor table never filled");
    // A control request now waits in the backlog; the accept loop must not spin on EMFILE meanwhile.
    let waiting = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1)); // a measurement window, not a readiness wait
    let used = cpu_ticks(pid) - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    eprintln!("out of descriptors: {used} ticks of CPU in 1 s ({hz} per second)");
    assert!(used * 5 < hz, "the accept loops spin: {used} ticks in 1 s");
    // Descriptors come back: the waiting request is served.
    drop(clients);
    drop(waiting);
    let o = ctl(&sock, &["status"]);
    assert!(o.status.success(), "{}", text(&o));
    server.stop();
}

/// The pid in the helper's "upgraded to pid N ..." answer.
fn pid_after(o: &Output) -> u32 {
    let out = String::from_utf8_lossy(&o.stdout);
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "pid")
        .and_then(|w| w[1].parse().ok())
        .unwrap_or_else(|| panic!("no pid in {}", text(o)))
}

#[test]
fn sixteen_half_open_and_twenty_idle_connections_cannot_jam_the_helper() {
    // What a buggy or hostile process of the service's own user can do to the control socket: hold 16
    // connections that sent half a line and 20 that sent nothing, re-opening each as the service closes it.
    // The helper's commands (ExecReload=, ExecStop=) must still succeed every time.
    const ROUNDS: usize = 20;
    let mut verdicts = 0;
    let mut took = Vec::new();
    let mut jam_opened = 0;
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("control.sock");
        let mut server = Server::start(
            &example("http_std"),
            &[
                "--control-socket",
                sock.to_str().unwrap(),
                "--drain-timeout",
                "5",
            ],
        );
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let jammer = jam(sock.clone(), 16, 20, stop.clone());
        // Let the jam take hold: 36 connections waiting on the service.
        let t0 = std::time::Instant::now();
        while std::fs::read_dir(format!("/proc/{}/fd", server.current()))
            .map(|d| d.count())
            .unwrap_or(0)
            < 36
        {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the jam never took hold"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let t0 = std::time::Instant::now();
        let o = ctl(&sock, &["status"]);
        assert!(o.status.success(), "round {round}: status: {}", text(&o));
        // An upgrade by the helper (ExecReload= of a Type=notify unit).
        let old = server.current();
        let o = ctl(&sock, &["upgrade"]);
        assert!(o.status.success(), "round {round}: upgrade: {}", text(&o));
        let new = pid_after(&o);
        server.generations.push(new);
        assert!(wait_gone(old, Duration::from_secs(10)));
        // The reload signal and its verdict (ExecReload= of a Type=notify-reload unit).
        assert!(signal(new, libc::SIGHUP));
        let o = ctl(&sock, &["reload-verdict"]);
        assert!(
            o.status.success(),
            "round {round}: reload-verdict: {}",
            text(&o)
        );
        verdicts += 1;
        let newest = pid_after(&o);
        server.generations.push(newest);
        assert!(wait_gone(new, Duration::from_secs(10)));
        // And a stop (ExecStop=): it returns once the service has exited, not before.
        let o = ctl(&sock, &["stop"]);
        if !o.status.success() {
            std::fs::write("/tmp/ctl-stop-failure", text(&o)).ok();
        }
        assert!(o.status.success(), "round {round}: stop: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout)
                .trim_end()
                .ends_with(": exited"),
            "round {round}: stop: {}",
            text(&o)
        );
        assert!(
            zombie_state(newest).unwrap_or(true),
            "round {round}: exuvia-ctl stop returned while pid {newest} still runs"
        );
        took.push(t0.elapsed());
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        jam_opened += jammer.join().unwrap();
        assert!(wait_gone(newest, Duration::from_secs(10)));
    }
    took.sort();
    eprintln!(
        "{ROUNDS} rounds under a jam of 16 half-open + 20 idle control connections ({jam_opened} opened in \
         all): status, upgrade, reload-verdict ({verdicts}) and stop succeeded every time; a round took median \
         {:?}, max {:?}",
        took[took.len() / 2],
        took.last().unwrap()
    );
}

#[test]
fn check_refuses_hostile_unit_names_and_starts_nothing_for_them() {
    // A systemctl of our own first in PATH records every call: a hostile name must not reach any command,
    // and a good one reaches `systemctl show` only after `--`.
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    script(
        &dir.path().join("systemctl"),
        &format!(
            "printf '%s\\n' \"$*\" >> '{}'\necho LoadState=not-found\n",
            calls.display()
        ),
    );
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let check = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_exuvia-ctl"))
            .arg("check")
            .args(args)
            .env("PATH", &path)
            .output()
            .unwrap()
    };
    for name in [
        "-H",
        "--user",
        "-M.host",
        "--version",
        "*",
        "app?",
        "a b",
        "",
        "app@.service",
    ] {
        for args in [vec![name], vec!["--", name]] {
            let o = check(&args);
            assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
            assert!(
                text(&o).contains("is not a unit name"),
                "{args:?}: {}",
                text(&o)
            );
        }
    }
    assert!(
        !calls.exists(),
        "a hostile name reached systemctl: {}",
        std::fs::read_to_string(&calls).unwrap_or_default()
    );
    let o = check(&["--", "app"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("no unit \"app.service\" loaded"),
        "{}",
        text(&o)
    );
    let recorded = std::fs::read_to_string(&calls).unwrap();
    let first = recorded.lines().next().unwrap();
    assert!(
        first.starts_with("show --property=") && first.ends_with(" -- app.service"),
        "{recorded}"
    );
}

/// Reloads one right after the other, as fast as each verdict comes: every `reload-verdict` names the process
/// its own signal's upgrade started, which then answers, never the one before (a new process that caught the
/// next signal but had not recorded it yet once answered "upgraded to pid <itself>").
#[test]
fn back_to_back_reloads_each_get_their_own_verdict() {
    let mut server = Server::start(&example("http_std"), &["--drain-timeout", "5"]);
    for i in 0..60 {
        let old = server.current();
        let new = server
            .upgrade_started()
            .unwrap_or_else(|e| panic!("reload {i}: {e}\n{}", server.log.dump()));
        assert_ne!(
            new, old,
            "reload {i}: the verdict named the process signalled"
        );
        let (r, _) = get_and_wait_close(server.addr, "/").unwrap();
        assert_eq!(
            r.pid, new,
            "reload {i}: answered by another process than the verdict's"
        );
    }
    server.stop();
}

//! Blue/green instances under the REAL systemd (253+): the shipped template `units/exuvia-app@.service`, where
//! `systemctl start app@green` takes the service over from `app@blue`. The two instances run different binary
//! paths (`ExecStart=` names the instance's directory) and differ, through a drop-in each, in an environment
//! variable the responses show and in `LimitNOFILE=`. Skips loudly where systemd cannot be booted; fails in CI.

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use support::systemd::{boot, Systemd};
use support::*;

/// What each instance runs and how it differs.
const INSTANCES: [(&str, &str, u64); 2] =
    [("blue", "release-a", 1500), ("green", "release-b", 2500)];

/// Installs `app@.service` from the template: each instance runs its own copy of the axum example from
/// `<test dir>/releases/%i/bin/app` with `args`, and a drop-in per instance sets `APP_VERSION` and
/// `LimitNOFILE=`. Fault files (`<test dir>/faults/init-%i`, `crash-%i`) are named on every command line and
/// exist only when a test writes them.
fn install(sd: &Systemd, port: u16, args: &str) -> SocketAddr {
    install_with(sd, port, args, &[])
}

/// [`install`], with `more` template lines replaced (they win over the test's own).
fn install_with(sd: &Systemd, port: u16, args: &str, more: &[(&str, &str)]) -> SocketAddr {
    let ctl = sd.stage(Path::new(env!("CARGO_BIN_EXE_exuvia-ctl")));
    let app = example("http_axum");
    for (name, _, _) in INSTANCES {
        let bin = sd.dir.join("releases").join(name).join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy(&app, bin.join("app")).unwrap();
    }
    std::fs::create_dir_all(sd.dir.join("faults")).unwrap();
    let exec_start = format!(
        "{}/releases/%i/bin/app --listen 127.0.0.1:{port} --takeover --init-fault {d}/faults/init-%i \
         --crash-fault {d}/faults/crash-%i {args}",
        sd.dir.display(),
        d = sd.dir.display()
    );
    let exec_reload = format!("{} reload-verdict", ctl.display());
    let exec_stop = format!("{} stop", ctl.display());
    let stderr = format!("StandardError=append:{}", sd.service_log().display());
    let mut replace = more.to_vec();
    replace.extend_from_slice(&[
        ("ExecStart", exec_start.as_str()),
        ("ExecReload", exec_reload.as_str()),
        ("ExecStop", exec_stop.as_str()),
    ]);
    sd.install(
        "exuvia-app@.service",
        "app@.service",
        &replace,
        &[stderr.as_str()],
    );
    for (name, version, nofile) in INSTANCES {
        sd.install_dropin_text(
            &format!("app@{name}.service"),
            "release.conf",
            &format!("[Service]\nEnvironment=APP_VERSION={version}\nLimitNOFILE={nofile}\n"),
        );
    }
    format!("127.0.0.1:{port}").parse().unwrap()
}

fn log(sd: &Systemd) -> String {
    std::fs::read_to_string(sd.service_log()).unwrap_or_default()
}

/// Whether the services' log says `text` within 10 s (a process logs what it did a moment after doing it).
fn logged(sd: &Systemd, text: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log(sd).contains(text) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// `systemctl start UNIT`: its output, whether it succeeded, and how long it took.
fn start(sd: &Systemd, unit: &str) -> (bool, String, Duration) {
    let t0 = Instant::now();
    let out = sd.systemctl(&["start", unit]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text, t0.elapsed())
}

/// Waits until `unit` is `inactive` (not `failed`, not `deactivating`), with `Result=success`.
fn ends_inactive(sd: &Systemd, unit: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = sd.show(unit, "ActiveState");
        if state == "inactive" {
            assert_eq!(
                sd.show(unit, "Result"),
                "success",
                "{unit}\n{}",
                sd.status_text(unit)
            );
            return;
        }
        assert!(
            state != "failed" && Instant::now() < deadline,
            "{unit} is {state}\n{}\n--- log ---\n{}",
            sd.status_text(unit),
            log(sd)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The soft descriptor limit of a process inside the namespace.
fn nofile_of(sd: &Systemd, ns_pid: u32) -> u64 {
    let pid = sd.host_pid(ns_pid).expect("process gone");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// Installs the instances with `args`, starts `app@blue` and load against it: the address, blue's pid and the
/// load.
fn blue_under_load(sd: &Systemd, args: &str) -> (SocketAddr, u32, Load) {
    let addr = install(sd, free_port(), args);
    let (ok, text, _) = start(sd, "app@blue.service");
    assert!(ok, "{text}\n{}", log(sd));
    let blue = sd.main_pid("app@blue.service");
    let load = Load::steady(addr);
    (addr, blue, load)
}

/// 10 takeovers alternating between `app@blue` and `app@green` (green sandboxed by the shipped hardening
/// drop-in, blue not) under new-connection and keep-alive load (our generator and `ab -k`): nothing refused or
/// failed, each `systemctl start` returns with the new instance serving (its binary, environment, limit and
/// sandbox), the previous one ends `inactive` with `Result=success`.
#[test]
fn blue_green_instances_take_over_from_each_other_under_load() {
    let Some(sd) = boot("blue_green_instances_take_over_from_each_other_under_load") else {
        return;
    };
    let addr = install(&sd, free_port(), "");
    // Green also runs sandboxed (the shipped hardening drop-in), blue not: sandboxing may differ too.
    sd.install_dropin("hardening.conf", "app@green.service");
    let (ok, text, _) = start(&sd, "app@blue.service");
    assert!(ok, "{text}\n{}", log(&sd));
    let (resp, _) = get(addr, "/").unwrap();
    assert_eq!(resp.pid, sd.main_pid("app@blue.service"));

    let ab = AbKeepAlive::start(addr, 32, 40);
    let load = Load::steady(addr);

    let mut took = Vec::new();
    for i in 0..10 {
        let (from, _, _) = INSTANCES[i % 2];
        let (to, version, nofile) = INSTANCES[(i + 1) % 2];
        let (from, to) = (format!("app@{from}.service"), format!("app@{to}.service"));
        let old = sd.main_pid(&from);
        let (ok, text, t) = start(&sd, &to);
        assert!(
            ok,
            "takeover {i}: {text}\n{}\n{}",
            sd.status_text(&to),
            log(&sd)
        );
        took.push(t);
        let new = sd.main_pid(&to);
        assert_ne!(new, old);
        let (resp, _) = get(addr, "/").unwrap();
        assert_eq!(
            (resp.pid, resp.version.as_str()),
            (new, version),
            "takeover {i}"
        );
        assert_eq!(nofile_of(&sd, new), nofile);
        assert_eq!(
            sd.show(&to, "ProtectSystem"),
            if to.contains("green") { "strict" } else { "no" }
        );
        ends_inactive(&sd, &from);
        load.wait_progress(100);
    }
    load.finish_clean("all");
    took.sort();
    eprintln!(
        "systemctl start of the taking instance: median {:?}, max {:?}",
        took[took.len() / 2],
        took[took.len() - 1]
    );
    if let Some(ab) = ab {
        ab.finish("takeovers");
    }
    // After ten takeovers blue serves again; a reload upgrades it in place; a stop ends it.
    let blue = sd.main_pid("app@blue.service");
    let out = sd.systemctl(&["reload", "app@blue.service"]);
    assert!(
        out.status.success(),
        "{}",
        sd.status_text("app@blue.service")
    );
    assert_ne!(sd.main_pid("app@blue.service"), blue);
    let out = sd.systemctl(&["stop", "app@blue.service"]);
    assert!(
        out.status.success(),
        "{}",
        sd.status_text("app@blue.service")
    );
    ends_inactive(&sd, "app@blue.service");
    ends_inactive(&sd, "app@green.service");
}

/// Takeovers that fail, under load: a green that exits during its initialisation, one that hangs past blue's
/// ready timeout, one that crashes inside its probation window. Each `systemctl start app@green` fails,
/// promptly, with the reason in green's status; blue serves throughout (nothing refused) and stays the main
/// process of its unit.
#[test]
fn a_failed_takeover_fails_the_start_and_leaves_blue_serving() {
    let Some(sd) = boot("a_failed_takeover_fails_the_start_and_leaves_blue_serving") else {
        return;
    };
    let (addr, blue, load) = blue_under_load(&sd, "--ready-timeout 3 --probation 2");
    let faults = sd.dir.join("faults");
    let green = "app@green.service";

    // 1. Exits (status 3) during its initialisation.
    std::fs::write(faults.join("init-green"), "fail").unwrap();
    let (ok, text, t) = start(&sd, green);
    assert!(!ok, "{text}");
    eprintln!("exit during initialisation: start failed after {t:?}: {text}");
    assert!(t < Duration::from_secs(15), "{t:?}");
    std::fs::remove_file(faults.join("init-green")).unwrap();
    let _ = sd.systemctl(&["reset-failed", green]);

    // 2. Hangs past blue's 3 s ready timeout: blue tells it why and it exits 75 (no restart).
    sd.install_dropin_text(
        green,
        "hang.conf",
        "[Service]\nExecStart=\nExecStart=/bin/sh -c 'exec \"$0\" \"$@\" --init-delay-ms 60000' \
         RELEASE_BIN --listen 127.0.0.1:PORT --takeover\n"
            .replace(
                "RELEASE_BIN",
                &format!("{}/releases/green/bin/app", sd.dir.display()),
            )
            .replace("PORT", &addr.port().to_string())
            .as_str(),
    );
    let (ok, text, t) = start(&sd, green);
    assert!(!ok, "{text}");
    let status = sd.status_text(green);
    eprintln!("hang: start failed after {t:?}; status:\n{status}");
    assert!(t < Duration::from_secs(15), "{t:?}");
    assert!(
        status.contains("did not report ready within 3 s"),
        "{status}"
    );
    assert!(status.contains("status=75"), "{status}");
    std::fs::remove_file(sd.dir.join("units/app@green.service.d/hang.conf")).unwrap();
    let _ = sd.systemctl(&["daemon-reload"]);
    let _ = sd.systemctl(&["reset-failed", green]);

    // Up to here nothing reached green: nothing may have failed at all.
    load.finish_clean("exit, hang");

    // 3. Crashes 300 ms into its 2 s probation window: blue takes the service back. Green served the new
    // connections of its window and its crash resets those it held (as any crash does); nothing is refused.
    let load = Load::steady(addr);
    std::fs::write(faults.join("crash-green"), "abort 300").unwrap();
    let (ok, text, t) = start(&sd, green);
    eprintln!("crash on probation: start ok={ok} after {t:?}: {text}");
    assert!(!ok, "{text}\n{}", sd.status_text(green));
    assert!(logged(&sd, "rolled back"), "{}", log(&sd));

    // Blue served throughout and is still its unit's main process.
    assert_eq!(sd.main_pid("app@blue.service"), blue);
    assert_eq!(sd.show("app@blue.service", "ActiveState"), "active");
    load.wait_progress(200);
    let (resp, _) = get(addr, "/").unwrap();
    assert_eq!(resp.pid, blue);
    load.finish_unrefused("crash on probation");
    let out = sd.systemctl(&["stop", "app@blue.service"]);
    assert!(
        out.status.success(),
        "{}",
        sd.status_text("app@blue.service")
    );
    ends_inactive(&sd, "app@blue.service");
}

/// `exuvia-ctl check` on a blue/green instance: the shipped template passes; an instance with a directory of
/// its own, one whose stop removes the shared directory, and one whose service does not take over are each
/// named, with the fix.
#[test]
fn exuvia_ctl_check_validates_blue_green_instances() {
    let Some(sd) = boot("exuvia_ctl_check_validates_blue_green_instances") else {
        return;
    };
    let ctl = sd.stage(Path::new(env!("CARGO_BIN_EXE_exuvia-ctl")));
    // (template lines replaced, expected exit, expected finding)
    type Case<'a> = (&'a [(&'a str, &'a str)], i32, &'a str);
    let cases: &[Case] = &[
        (&[], 0, "RuntimeDirectoryPreserve=yes"),
        (&[("RuntimeDirectory", "%N")], 2, "names this instance"),
        (
            &[("RuntimeDirectoryPreserve", "no")],
            2,
            "RuntimeDirectoryPreserve=no",
        ),
    ];
    let port = free_port();
    for (replace, want, finding) in cases {
        install_with(&sd, port, "", replace);
        let (ok, text, _) = start(&sd, "app@blue.service");
        assert!(ok, "{text}\n{}", log(&sd));
        let out = sd.run(&[ctl.to_str().unwrap(), "check", "app@blue.service"]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("--- {replace:?}: exit {:?}\n{text}", out.status.code());
        assert_eq!(out.status.code(), Some(*want), "{replace:?}: {text}");
        assert!(
            text.contains(finding),
            "{replace:?}: no {finding:?} in:\n{text}"
        );
        let _ = sd.systemctl(&["stop", "app@blue.service"]);
        ends_inactive(&sd, "app@blue.service");
    }
    // A service that does not take over, in a blue/green unit.
    let exec_start = format!(
        "{}/releases/%i/bin/app --listen 127.0.0.1:{port}",
        sd.dir.display()
    );
    install_with(&sd, port, "", &[("ExecStart", &exec_start)]);
    let (ok, text, _) = start(&sd, "app@blue.service");
    assert!(ok, "{text}\n{}", log(&sd));
    let out = sd.run(&[ctl.to_str().unwrap(), "check", "app@blue.service"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("does not take over"), "{text}");
    let _ = sd.systemctl(&["stop", "app@blue.service"]);
}

/// Waits until `addr` answers from `pid` (a process inside the namespace).
fn answered_by(addr: SocketAddr, pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if get(addr, "/").is_ok_and(|(r, _)| r.pid == pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// With a probation window, either instance may be stopped while green serves on probation: stopping green
/// abandons the deploy (blue takes the service back: a rollback, not a stop of the service), stopping blue
/// lets green serve on (its start completes). Under load, nothing refused or failed.
#[test]
fn stopping_either_instance_inside_the_probation_window() {
    let Some(sd) = boot("stopping_either_instance_inside_the_probation_window") else {
        return;
    };
    let (addr, blue, load) = blue_under_load(&sd, "--probation 4");
    let (blue_unit, green_unit) = ("app@blue.service", "app@green.service");

    // 1. Green takes over and serves on probation (its start waits for the window); green is stopped.
    let out = sd.systemctl(&["start", "--no-block", green_unit]);
    assert!(out.status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let green = loop {
        let pid = sd.main_pid(green_unit);
        if pid != 0 && answered_by(addr, pid) {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "green never served:\n{}",
            log(&sd)
        );
    };
    assert_eq!(sd.show(green_unit, "ActiveState"), "activating");
    let out = sd.systemctl(&["stop", green_unit]);
    assert!(out.status.success(), "{}", sd.status_text(green_unit));
    assert!(
        answered_by(addr, blue),
        "blue did not take the service back:\n{}",
        log(&sd)
    );
    assert_eq!(sd.main_pid(blue_unit), blue);
    assert_eq!(sd.show(blue_unit, "ActiveState"), "active");
    assert!(logged(&sd, "rolled back"), "{}", log(&sd));
    let _ = green;
    let _ = sd.systemctl(&["reset-failed", green_unit]);

    // 2. Again; this time blue is stopped inside the window: green serves on and its start completes.
    let out = sd.systemctl(&["start", "--no-block", green_unit]);
    assert!(out.status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let green = loop {
        let pid = sd.main_pid(green_unit);
        if pid != 0 && pid != green && answered_by(addr, pid) {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "green never served:\n{}",
            log(&sd)
        );
    };
    let out = sd.systemctl(&["stop", blue_unit]);
    assert!(out.status.success(), "{}", sd.status_text(blue_unit));
    ends_inactive(&sd, blue_unit);
    let deadline = Instant::now() + Duration::from_secs(20);
    while sd.show(green_unit, "ActiveState") != "active" {
        assert!(
            Instant::now() < deadline,
            "green never became active:\n{}\n{}",
            sd.status_text(green_unit),
            log(&sd)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sd.main_pid(green_unit), green);
    assert!(answered_by(addr, green));
    load.finish_clean("all");
    let out = sd.systemctl(&["stop", green_unit]);
    assert!(out.status.success(), "{}", sd.status_text(green_unit));
    ends_inactive(&sd, green_unit);
}

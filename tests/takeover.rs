//! Takeover (`Builder::take_over`, the examples' `--takeover`): a process started by someone else, not by the
//! running one, takes the service over through the control socket. Real processes, started the way a
//! supervisor would: two releases installed in directories of their own, each started through a launcher that
//! sets what a unit's settings would (an environment variable the responses show, the descriptor limit), under
//! our own load generator and ApacheBench.

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// One release, installed in a directory of its own and started through a launcher script that sets
/// `APP_VERSION` (shown in every response) and the descriptor limit, then becomes the binary.
struct Release {
    dir: tempfile::TempDir,
    tag: &'static str,
    nofile: u64,
}

impl Release {
    fn install(example: &str, tag: &'static str, nofile: u64) -> Release {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        let binary = dir.path().join("bin").join("app");
        std::fs::copy(support::example(example), &binary).unwrap();
        // The binary beside the launcher, wherever the release is mounted.
        script(
            &dir.path().join("run"),
            &format!(
                "ulimit -n {nofile}\nexport APP_VERSION={tag}\nexec \"$(dirname \"$0\")/bin/app\" \"$@\"\n"
            ),
        );
        Release { dir, tag, nofile }
    }

    fn launcher(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn binary(&self) -> PathBuf {
        self.dir.path().join("bin").join("app")
    }
}

/// A process the test started (as a supervisor would), with its log.
struct Instance {
    child: Child,
    pid: u32,
    log: Log,
    status: Option<ExitStatus>,
}

impl Instance {
    /// Starts `program` with `args`; does not wait for anything.
    fn spawn(program: &Path, args: &[&str]) -> Instance {
        become_subreaper();
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start instance");
        let log = Log::collect(child.stderr.take().unwrap(), "instance");
        Instance {
            pid: child.id(),
            child,
            log,
            status: None,
        }
    }

    /// Starts `release` on `listen` with the control socket `control`, in takeover mode.
    fn take_over(release: &Release, listen: &str, control: &Path, extra: &[&str]) -> Instance {
        let mut args = vec![
            "--listen",
            listen,
            "--control-socket",
            control.to_str().unwrap(),
            "--takeover",
        ];
        args.extend_from_slice(extra);
        Instance::spawn(&release.launcher(), &args)
    }

    /// Waits until it serves; its address.
    fn serving(&mut self) -> SocketAddr {
        let found = self
            .log
            .wait_for(0, Duration::from_secs(30), |l| l.contains(" serving "));
        let Some((_, line)) = found else {
            let st = self.exited(Duration::ZERO);
            panic!(
                "{} never served (exit: {st:?}):\n{}",
                self.pid,
                self.log.dump()
            );
        };
        field(&line, "addr").unwrap().parse().unwrap()
    }

    /// Its exit status, waiting up to `timeout`.
    fn exited(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.status.is_none() {
                self.status = self.child.try_wait().unwrap();
            }
            if self.status.is_some() || Instant::now() >= deadline {
                return self.status;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM to `pid` (the instance's own, or its process inside a container); it must exit successfully.
    fn stop(mut self, pid: u32) {
        signal(pid, libc::SIGTERM);
        let st = self.exited(Duration::from_secs(30));
        assert!(
            st.is_some_and(|s| s.success()),
            "{st:?}\n{}",
            self.log.dump()
        );
    }

    /// Whether its log has a line containing `text`, waiting up to `timeout`.
    fn says(&self, text: &str, timeout: Duration) -> Option<String> {
        self.log
            .wait_for(0, timeout, |l| l.contains(text))
            .map(|(_, l)| l)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.exited(Duration::ZERO).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The soft descriptor limit of `pid`, from `/proc/PID/limits`.
fn nofile_of(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// `exuvia-ctl status` on `control`.
fn status(control: &Path) -> String {
    let out = Command::new(binary("exuvia-ctl"))
        .arg("--socket")
        .arg(control)
        .arg("status")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const TAKEOVERS: usize = 10;

/// 10 takeovers alternating between two releases (different binary paths, `APP_VERSION`, descriptor limit),
/// under new-connection and keep-alive load from our generator and `ab -k`: nothing refused or failed, every
/// keep-alive connection kept, each response afterwards from the new release, each old process exits 0.
#[test]
fn ten_takeovers_between_two_releases_refuse_and_fail_nothing() {
    let control_dir = tempfile::tempdir().unwrap();
    let control = control_dir.path().join("control.sock");
    let releases = [
        Release::install("http_axum", "release-a", 1500),
        Release::install("http_axum", "release-b", 2500),
    ];
    // The first instance finds nobody serving the control socket: it starts fresh.
    let mut current = Instance::take_over(&releases[0], "127.0.0.1:0", &control, &[]);
    let addr = current.serving();
    assert!(
        current
            .says(
                "nothing serves this control socket; starting fresh",
                Duration::ZERO
            )
            .is_some(),
        "{}",
        current.log.dump()
    );
    assert!(status(&control).contains("origin=fresh"));
    let listen = addr.to_string();

    let ab = AbKeepAlive::start(addr, 32, 25);
    let load = Load::steady(addr);

    let mut took = Vec::new();
    for i in 0..TAKEOVERS {
        let release = &releases[(i + 1) % 2];
        let started = Instant::now();
        let mut next = Instance::take_over(release, &listen, &control, &[]);
        next.serving();
        took.push(started.elapsed());
        assert!(
            next.says("taking over; received the sockets", Duration::from_secs(5))
                .is_some(),
            "{}",
            next.log.dump()
        );
        // The old process lets go and exits on its own, successfully.
        let old = current.pid;
        let st = current.exited(Duration::from_secs(30));
        assert!(
            st.is_some_and(|s| s.success()),
            "takeover {i}: the old process {old} ended {st:?}:\n{}",
            current.log.dump()
        );
        assert!(current
            .says("takeover: handed over", Duration::from_secs(5))
            .is_some());
        // What runs now is the other release: its binary, its environment, its limit.
        let (resp, _) = get(addr, "/").unwrap();
        assert_eq!((resp.pid, resp.version.as_str()), (next.pid, release.tag));
        assert_eq!(
            std::fs::read_link(format!("/proc/{}/exe", next.pid)).unwrap(),
            release.binary()
        );
        assert_eq!(nofile_of(next.pid), release.nofile);
        let st = status(&control);
        assert!(
            st.contains(&format!("pid={} ", next.pid)) && st.contains("origin=takeover"),
            "{st}"
        );
        current = next;
        load.wait_progress(100);
    }

    let stats = load.finish_clean("all");
    assert!(stats.pids.len() > TAKEOVERS, "{}", stats.summary());
    took.sort();
    eprintln!(
        "start to serving, per takeover: median {:?}, max {:?}",
        took[took.len() / 2],
        took[took.len() - 1]
    );
    // Every keep-alive connection moved at every takeover: none was closed.
    if let Some(ab) = ab {
        ab.finish("takeovers");
    }
    let pid = current.pid;
    current.stop(pid);
}

/// A takeover by a process that exits during its initialisation, one that hangs past the old process's ready
/// timeout, one started while another takeover runs, and one that crashes inside its probation window: the
/// old process serves throughout (nothing refused), each taker fails with the reason.
#[test]
fn failed_takeovers_leave_the_old_process_serving() {
    let control_dir = tempfile::tempdir().unwrap();
    let control = control_dir.path().join("control.sock");
    let faults = tempfile::tempdir().unwrap();
    let release = Release::install("http_axum", "release-a", 1500);
    let other = Release::install("http_axum", "release-b", 2500);
    let mut old = Instance::take_over(
        &release,
        "127.0.0.1:0",
        &control,
        &["--ready-timeout", "2", "--probation", "2"],
    );
    let addr = old.serving();
    let listen = addr.to_string();
    let load = Load::steady(addr);

    // 1. Exits during its initialisation (status 3).
    let fail = faults.path().join("fail");
    std::fs::write(&fail, "fail").unwrap();
    let mut taker = Instance::take_over(
        &other,
        &listen,
        &control,
        &["--init-fault", fail.to_str().unwrap()],
    );
    let st = taker.exited(Duration::from_secs(30));
    assert_eq!(st.and_then(|s| s.code()), Some(3), "{}", taker.log.dump());
    let line = old
        .says("takeover failed", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{}", old.log.dump()));
    assert!(
        line.contains(&format!("pid {}", taker.pid)) && line.contains("exited"),
        "{line}"
    );

    // 2. Hangs past the old process's 2 s ready timeout; a second taker meanwhile is refused (one at a time).
    let mut hung = Instance::take_over(&other, &listen, &control, &["--init-delay-ms", "60000"]);
    hung.says("taking over; received the sockets", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{}", hung.log.dump()));
    let mut second = Instance::take_over(&other, &listen, &control, &[]);
    let st = second.exited(Duration::from_secs(30));
    assert_eq!(st.and_then(|s| s.code()), Some(75), "{}", second.log.dump());
    assert!(
        second
            .says("takeover refused", Duration::from_secs(5))
            .is_some_and(|l| l.contains("in flight") || l.contains("in progress")),
        "{}",
        second.log.dump()
    );
    let st = hung.exited(Duration::from_secs(30));
    assert_eq!(
        st.and_then(|s| s.code()),
        Some(i32::from(exuvia::EXIT_TAKEOVER_FAILED)),
        "{}",
        hung.log.dump()
    );
    let why = hung
        .says("takeover failed", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{}", hung.log.dump()));
    assert!(why.contains("did not report ready within 2 s"), "{why}");

    // Up to here nothing reached a taker: nothing may have failed at all.
    load.finish_clean("exit, hang, one at a time");

    // 3. Crashes 300 ms into its 2 s probation window: the old process takes the service back. The taker
    // served the new connections of its window, and its crash resets those it held (as any crash does);
    // nothing is refused.
    let load = Load::steady(addr);
    let crash = faults.path().join("crash");
    std::fs::write(&crash, "abort 300").unwrap();
    let mut crasher = Instance::take_over(
        &other,
        &listen,
        &control,
        &["--crash-fault", crash.to_str().unwrap()],
    );
    crasher.serving();
    let st = crasher.exited(Duration::from_secs(30));
    assert!(
        st.is_some_and(|s| !s.success()),
        "{st:?}\n{}",
        crasher.log.dump()
    );
    let line = old
        .says("rolled back", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{}", old.log.dump()));
    assert!(line.contains(&crasher.pid.to_string()), "{line}");
    assert!(
        status(&control).contains(&format!("pid={} ", old.pid)),
        "{}",
        status(&control)
    );

    // The old process served throughout and serves on.
    load.wait_progress(200);
    let (resp, _) = get(addr, "/").unwrap();
    assert_eq!((resp.pid, resp.version.as_str()), (old.pid, release.tag));
    load.finish_unrefused("crash on probation");
    assert!(old.exited(Duration::ZERO).is_none());
    let pid = old.pid;
    old.stop(pid);
}

/// A process of another user cannot take over: the socket file's mode keeps it out, and with the mode opened
/// up the service itself refuses it (peer credentials) and logs it. Nothing changes.
#[test]
fn a_process_of_another_user_cannot_take_over() {
    if sys_euid() != 0 {
        skip(
            "the other-user takeover test",
            "it must run as root to start a process of another user",
        );
        return;
    }
    let control_dir = tempfile::tempdir().unwrap();
    let control = control_dir.path().join("control.sock");
    let release = Release::install("http_axum", "release-a", 1500);
    let stranger = Release::install("http_axum", "release-b", 1500);
    // The stranger (uid 65534) must be able to run its own release.
    for p in [stranger.dir.path(), &stranger.dir.path().join("bin")] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut old = Instance::take_over(&release, "127.0.0.1:0", &control, &[]);
    let addr = old.serving();
    let as_nobody = |extra: &[&str]| {
        let mut args = vec![
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            stranger.launcher().to_str().unwrap().to_string().leak(),
            "--listen",
        ];
        let listen = addr.to_string();
        args.push(listen.leak());
        args.extend(["--control-socket", control.to_str().unwrap(), "--takeover"]);
        args.extend_from_slice(extra);
        Instance::spawn(Path::new("/usr/bin/setpriv"), &args)
    };

    // The socket is the service user's, mode 0600: the kernel refuses the connection.
    let mut taker = as_nobody(&[]);
    let st = taker.exited(Duration::from_secs(30));
    assert!(st.is_some_and(|s| !s.success()), "{}", taker.log.dump());
    assert!(
        taker
            .says(
                "cannot connect to the control socket",
                Duration::from_secs(5)
            )
            .is_some_and(|l| l.contains("Permission denied")),
        "{}",
        taker.log.dump()
    );

    // Opened up (a mistaken mode, an ACL): the service reads the peer's credentials and refuses, logged.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(control_dir.path(), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let mark = old.log.len();
    let mut taker = as_nobody(&[]);
    let st = taker.exited(Duration::from_secs(30));
    assert!(st.is_some_and(|s| !s.success()), "{}", taker.log.dump());
    assert!(
        taker
            .says("permission denied", Duration::from_secs(5))
            .is_some_and(|l| l.contains("takeover refused")),
        "{}",
        taker.log.dump()
    );
    assert!(
        old.log
            .wait_for(mark, Duration::from_secs(10), |l| l
                .contains("refused a request from another user"))
            .is_some(),
        "{}",
        old.log.dump()
    );
    // Nothing changed.
    let (resp, _) = get(addr, "/").unwrap();
    assert_eq!(resp.pid, old.pid);
    assert!(status(&control).contains("origin=fresh"));
    assert!(old.exited(Duration::ZERO).is_none());
    let pid = old.pid;
    old.stop(pid);
}

fn sys_euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The shape of two containers of one pod or compose service: each instance runs in a mount namespace and a
/// PID namespace of its own (it is pid 1 there), where its own release is mounted at the same path
/// (`.../mnt/app`, empty on the host), and the two share only the network namespace and the control socket's
/// directory (bind-mounted into each). Under load, takeovers back and forth refuse and fail nothing.
#[test]
fn containers_sharing_only_the_network_and_the_control_directory_take_over() {
    if sys_euid() != 0 {
        skip(
            "the separate-mount-namespace takeover test",
            "it must run as root to create mount namespaces",
        );
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let shared = base.path().join("shared");
    let mnt_app = base.path().join("mnt/app");
    let mnt_run = base.path().join("mnt/run");
    for d in [&shared, &mnt_app, &mnt_run] {
        std::fs::create_dir_all(d).unwrap();
    }
    let releases = [
        Release::install("http_axum", "release-a", 1500),
        Release::install("http_axum", "release-b", 2500),
    ];
    // Inside each "container": its own release at mnt/app, the shared directory at mnt/run, then the
    // release's launcher from the container's own path.
    let container = |release: &Release, listen: &str, extra: &str| {
        let script = format!(
            "set -e\nmount --bind '{rel}' '{app}'\nmount --bind '{shared}' '{run}'\n\
             exec '{app}/run' --listen {listen} --control-socket '{run}/control.sock' --takeover {extra}\n",
            rel = release.dir.path().display(),
            app = mnt_app.display(),
            shared = shared.display(),
            run = mnt_run.display(),
        );
        Instance::spawn(
            Path::new("unshare"),
            &[
                "--mount",
                "--pid",
                "--fork",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ],
        )
    };
    // The container's process as the host sees it: unshare's only child.
    let app_of = |unshare: u32| -> u32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let children =
                std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
                    .unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next() {
                return pid.parse().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "unshare {unshare} started nothing"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let mut current = container(&releases[0], "127.0.0.1:0", "--ready-timeout 2");
    let addr = current.serving();
    let listen = addr.to_string();
    // The host sees neither release at that path: each lives in its own container's mounts only.
    assert_eq!(std::fs::read_dir(&mnt_app).unwrap().count(), 0);
    assert!(shared.join("control.sock").exists());
    let load = Load::steady(addr);
    for i in 0..4 {
        let release = &releases[(i + 1) % 2];
        let mut next = container(release, &listen, "--ready-timeout 2");
        next.serving();
        let st = current.exited(Duration::from_secs(30));
        assert!(
            st.is_some_and(|s| s.success()),
            "takeover {i}: {st:?}\n{}",
            current.log.dump()
        );
        // Each is pid 1 of its own PID namespace: the old process cannot see the new one's pid, which it
        // names by the new one's own account, and cannot signal it.
        let (resp, _) = get(addr, "/").unwrap();
        assert_eq!((resp.pid, resp.version.as_str()), (1, release.tag));
        assert!(
            current
                .says("same_pid_namespace=false", Duration::from_secs(5))
                .is_some(),
            "{}",
            current.log.dump()
        );
        // Each runs its own release's binary, at the same path inside its own mounts.
        let exe = std::fs::read_link(format!("/proc/{}/exe", app_of(next.pid))).unwrap();
        assert_eq!(exe, mnt_app.join("bin/app"));
        current = next;
        load.wait_progress(100);
    }
    // A container whose process hangs in its initialisation past the 2 s ready timeout: the running process
    // cannot signal it (another PID namespace), so it tells it why; its own watch ends it (status 75), and
    // the running process serves on.
    let mut hung = container(&releases[1], &listen, "--init-delay-ms 60000");
    let st = hung.exited(Duration::from_secs(30));
    assert_eq!(
        st.and_then(|s| s.code()),
        Some(i32::from(exuvia::EXIT_TAKEOVER_FAILED)),
        "{}",
        hung.log.dump()
    );
    assert!(
        hung.says("did not report ready within 2 s", Duration::from_secs(5))
            .is_some(),
        "{}",
        hung.log.dump()
    );
    assert!(current.exited(Duration::ZERO).is_none());
    let (resp, _) = get(addr, "/").unwrap();
    assert_eq!(resp.version, releases[0].tag);
    load.finish_clean("all");
    // To the container's process itself (unshare passes no signal on).
    let pid = app_of(current.pid);
    current.stop(pid);
}

/// The README's deploy script for a takeover without systemd (`scripts/deploy-takeover`, verbatim in the
/// README): it starts a release in takeover mode and exits 0 once it serves, 1 if its takeover failed. Under
/// load: a fresh start, two takeovers, and one whose new process exits during its initialisation.
#[test]
fn the_readme_deploy_script_takes_over_and_reports_a_failed_takeover() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("scripts/deploy-takeover");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(
        readme.contains(&format!("```sh\n{text}```\n")),
        "README.md must show scripts/deploy-takeover verbatim"
    );
    let control_dir = tempfile::tempdir().unwrap();
    let control = control_dir.path().join("control.sock");
    let releases = [
        Release::install("http_axum", "release-a", 1500),
        Release::install("http_axum", "release-b", 2500),
    ];
    let ctl = binary("exuvia-ctl");
    let path = format!(
        "{}:{}",
        ctl.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let out_dir = tempfile::tempdir().unwrap();
    // Runs the script for `release`; its exit status and the pid it says serves. Its standard output goes to
    // a file: the process it starts inherits it and keeps it open.
    let deploy = |release: &Release, extra: &[&str]| -> (Option<i32>, Option<u32>, Log) {
        become_subreaper();
        let said_at = out_dir.path().join(release.tag);
        let stdout = std::fs::File::create(&said_at).unwrap();
        let mut child = Command::new(&script)
            .arg(release.dir.path())
            .args(["--listen", &listen])
            .args(extra)
            .env("PATH", &path)
            .env("APP_CONTROL_SOCKET", &control)
            .env("APP_VERSION", release.tag)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Log::collect(child.stderr.take().unwrap(), "deploy");
        let status = child.wait().unwrap();
        let said = std::fs::read_to_string(&said_at).unwrap();
        let pid = said
            .strip_prefix("deploy-takeover: pid ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok());
        (status.code(), pid, log)
    };
    let (code, first, log) = deploy(&releases[0], &[]);
    assert_eq!(code, Some(0), "{}", log.dump());
    let mut current = first.expect("the script names the pid that serves");
    let addr: SocketAddr = listen.parse().unwrap();
    let load = Load::steady(addr);
    for i in 0..2 {
        let release = &releases[(i + 1) % 2];
        let (code, pid, log) = deploy(release, &[]);
        assert_eq!(code, Some(0), "{}", log.dump());
        let pid = pid.unwrap();
        let (resp, _) = get(addr, "/").unwrap();
        assert_eq!((resp.pid, resp.version.as_str()), (pid, release.tag));
        assert!(
            wait_gone(current, Duration::from_secs(30)),
            "{current} lingered"
        );
        current = pid;
        load.wait_progress(100);
    }
    // A release whose process exits during its initialisation: the script says so, exits 1; nothing changes.
    let faults = tempfile::tempdir().unwrap();
    let fail = faults.path().join("fail");
    std::fs::write(&fail, "fail").unwrap();
    let (code, pid, log) = deploy(&releases[1], &["--init-fault", fail.to_str().unwrap()]);
    assert_eq!((code, pid), (Some(1), None), "{}", log.dump());
    assert!(
        log.wait_for(0, Duration::from_secs(5), |l| l
            .contains("the takeover failed (exit status 3)"))
            .is_some(),
        "{}",
        log.dump()
    );
    let (resp, _) = get(addr, "/").unwrap();
    assert_eq!(resp.pid, current);
    load.finish_clean("all");
    signal(current, libc::SIGTERM);
    assert!(wait_gone(current, Duration::from_secs(30)));
}

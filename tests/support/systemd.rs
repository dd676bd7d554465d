//! A real systemd (253+) booted as PID 1 of a private PID + mount namespace, driven with `systemctl`.
//!
//! What keeps the machine safe (see the project's systemd notes): the unit path holds ONLY the test's unit
//! directory; every unit gets `DefaultDependencies=no` (otherwise systemd pulls in sysinit.target and
//! systemd-tmpfiles would clean the machine's /tmp); /run and /tmp are fresh tmpfs inside the namespace; and
//! all test files live under /var/lib/exuvia-tests, never in /tmp or the checkout. [`boot_as_a_host`], for
//! commands run as a user writes them, adds a `/etc/systemd/system` that is a tmpfs of the namespace to the
//! unit path and keeps the units' default dependencies, which then resolve to empty stand-in targets in the
//! test's directory: still nothing of the machine's boot.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Systemd {
    /// systemd's pid as seen from the host.
    pub pid: u32,
    pub dir: PathBuf,
    unshare_pid: u32,
    // Dropped last: the next test may boot only once this one's systemd is gone.
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

/// Test systemds share the host's cgroup tree, where every test's `system.slice/app.service` is the same
/// directory: two at once could kill each other's processes. One runs at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Why the real-systemd tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    unavailable_with(Path::new("systemctl"))
}

/// [`unavailable`], asking `systemctl` (a path, or a name looked up in `PATH`) for the version.
pub fn unavailable_with(systemctl: &Path) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (booting systemd in a namespace needs root)".into());
    }
    for tool in [
        "unshare",
        "nsenter",
        "/usr/lib/systemd/systemd",
        "systemctl",
    ] {
        let found = if tool.starts_with('/') {
            Path::new(tool).exists()
        } else {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !found {
            return Some(format!("{tool} not found"));
        }
    }
    let v = Command::new(systemctl).arg("--version").output().ok()?;
    let version: u32 = String::from_utf8_lossy(&v.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if version < 253 {
        return Some(format!(
            "systemd {version} is older than 253 (run scripts/install-systemd)"
        ));
    }
    None
}

/// Where each test systemd's units, logs and binaries live (see `boot`).
const TESTS_DIR: &str = "/var/lib/exuvia-tests";

/// Removes what tests of processes that no longer exist left behind (one killed mid-way cannot clean up).
fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let owner = name
            .rsplit_once('-')
            .and_then(|(_, p)| p.parse::<u32>().ok());
        if owner.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Which systemd a test boots.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Version {
    /// The machine's (253+: scripts/install-systemd installs 254 on Debian 12).
    Installed,
    /// Debian 12's own systemd 252, unpacked by scripts/install-systemd beside the installed one: its manager,
    /// systemctl, journald and libraries are bind-mounted over the installed ones inside the namespace only.
    Debian12,
}

/// Where scripts/install-systemd unpacks Debian 12's systemd 252.
const DEBIAN12_ROOT: &str = "/var/lib/exuvia-systemd-252/root";

/// The multiarch directory (`x86_64-linux-gnu`, ...) that holds systemd's private libraries.
fn multiarch() -> String {
    std::fs::read_dir(Path::new(DEBIAN12_ROOT).join("usr/lib"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.contains("-linux-") && Path::new(&format!("/usr/lib/{n}/systemd")).is_dir())
        .expect("systemd 252's libraries: no usr/lib/<multiarch>/systemd (rerun scripts/install-systemd)")
}

/// Boots a private systemd for `test`, or returns `None` after saying loudly why it cannot (a failure under CI).
pub fn boot(test: &str) -> Option<Systemd> {
    boot_version(test, Version::Installed)
}

/// [`boot`], choosing the systemd.
pub fn boot_version(test: &str, version: Version) -> Option<Systemd> {
    boot_with(test, version, false)
}

/// [`boot`] for a user's own commands, run as written: `/etc/systemd/system` (on the unit path) and
/// `/usr/local/bin` are empty tmpfs of this namespace only (the machine's are untouched), and the targets that
/// units' default dependencies name (`sysinit.target`, `basic.target`, ...) exist as empty stand-ins, so
/// that the shipped units run unmodified, with their default dependencies, and nothing of the machine's
/// boot (systemd-tmpfiles and the like) is ever pulled in.
pub fn boot_as_a_host(test: &str) -> Option<Systemd> {
    boot_with(test, Version::Installed, true)
}

fn boot_with(test: &str, version: Version, as_a_host: bool) -> Option<Systemd> {
    let why = unavailable().or_else(|| {
        let manager = Path::new(DEBIAN12_ROOT).join("lib/systemd/systemd");
        (version == Version::Debian12 && !manager.exists())
            .then(|| format!("Debian 12's systemd 252 is not unpacked at {DEBIAN12_ROOT}"))
    });
    if let Some(why) = why {
        super::skip(
            &format!("real-systemd test {test}"),
            &format!("{why}; run scripts/install-systemd as root (CI does)"),
        );
        return None;
    }
    let guard = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    super::become_subreaper();
    // Outside the checkout, and outside every directory the namespace or the hardened units hide (/tmp and /run
    // are fresh tmpfs inside the namespace; PrivateTmp= hides /tmp and /var/tmp, ProtectHome= /home, /root and
    // /run/user): a checkout may sit in any of them. Binaries under test are copied here too (`stage`).
    let base = Path::new(TESTS_DIR);
    remove_stale(base);
    let dir = base.join(format!("{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("units")).unwrap();
    std::fs::write(
        dir.join("units/test.target"),
        "[Unit]\nDescription=exuvia test target\nDefaultDependencies=no\n",
    )
    .unwrap();
    let mut unit_path = dir.join("units").display().to_string();
    let mut host_dirs = String::new();
    if as_a_host {
        for target in [
            "sysinit.target",
            "basic.target",
            "sockets.target",
            "network.target",
            "multi-user.target",
            "shutdown.target",
        ] {
            std::fs::write(
                dir.join("units").join(target),
                "[Unit]\nDescription=stand-in of the test systemd\nDefaultDependencies=no\n",
            )
            .unwrap();
        }
        host_dirs =
            "mount -t tmpfs tmpfs /etc/systemd/system\nmount -t tmpfs tmpfs /usr/local/bin\n"
                .into();
        unit_path.push_str(":/etc/systemd/system");
    }
    let console = dir.join("console.log");
    std::fs::write(&console, "").unwrap();
    let boot_log = dir.join("boot.log");
    // systemd 252: its binaries over the installed ones, its libraries overlaid on theirs (the installed tools
    // the tests also run, ps and the like, keep what they link), in this mount namespace only.
    let debian12 = match version {
        Version::Installed => String::new(),
        Version::Debian12 => format!(
            "mount --bind '{r}/lib/systemd/systemd' /usr/lib/systemd/systemd\n\
             mount --bind '{r}/lib/systemd/systemd-journald' /usr/lib/systemd/systemd-journald\n\
             mount --bind '{r}/bin/systemctl' /usr/bin/systemctl\n\
             mount --bind '{r}/bin/journalctl' /usr/bin/journalctl\n\
             mount -t overlay overlay -o 'lowerdir={r}/usr/lib/{multiarch}/systemd:/usr/lib/{multiarch}/systemd' \
             /usr/lib/{multiarch}/systemd\n",
            r = DEBIAN12_ROOT,
            multiarch = multiarch(),
        ),
    };
    let script = format!(
        "exec 2>>'{boot_log}'\n\
         set -ex\n\
         mount --make-rprivate /\n\
         mount -t tmpfs tmpfs /run\n\
         mount -t tmpfs tmpfs /tmp\n\
         mkdir -p /run/systemd/system\n\
         mount --bind '{console}' /dev/console\n\
         {debian12}\
         {host_dirs}\
         SYSTEMD_UNIT_PATH='{unit_path}' exec /usr/lib/systemd/systemd --system --log-target=${{EXUVIA_SYSTEMD_LOG_TARGET:-console}} \
         --log-level=${{EXUVIA_SYSTEMD_LOG_LEVEL:-info}} --unit=test.target >>'{console}' 2>&1\n",
        console = console.display(),
        boot_log = boot_log.display(),
    );
    let child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--mount-proc",
            "--kill-child",
            "sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare");
    let unshare_pid = child.id();
    std::mem::forget(child); // reaped by pid in Drop
                             // systemd is unshare's only child.
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid = loop {
        let children =
            std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))
                .unwrap_or_default();
        if let Some(p) = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse::<u32>().ok())
        {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            if comm.trim() == "systemd" {
                break p;
            }
        }
        // The boot script ended (a mount refused, systemd failed to execute): say why at once.
        let ended = super::zombie_state(unshare_pid) != Some(false);
        if ended || Instant::now() >= deadline {
            super::signal(unshare_pid, libc::SIGKILL);
            super::wait_gone(unshare_pid, Duration::from_secs(5));
            panic!(
                "systemd did not start ({}): the boot script (unshare --pid --fork --mount --mount-proc \
                 --kill-child sh -c ...) traced:\n{}\n--- console ---\n{}",
                if ended { "the boot script ended" } else { "not up after 20 s" },
                std::fs::read_to_string(&boot_log).unwrap_or_default(),
                std::fs::read_to_string(&console).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let sd = Systemd {
        pid,
        dir,
        unshare_pid,
        _one_at_a_time: guard,
    };
    // Ready when the manager answers and has finished booting into test.target.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = sd.systemctl(&["is-system-running"]);
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if state == "running" || state == "degraded" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "systemd never reached running (last: {state:?}); console:\n{}",
            sd.console()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(sd)
}

/// Which service template, and the `exuvia-ctl` command its `ExecReload=` runs.
#[derive(Clone, Copy, Debug)]
pub enum Shape {
    NotifyReload,
    Portable,
}

impl Systemd {
    /// Installs app.socket and app.service from the shipped templates, running `server` with `args` and the
    /// helper `ctl`: only the marked lines (`ExecStart=`, the helper paths, the socket address) are
    /// substituted, plus `more`. The service's stderr goes to `service.log` in the test directory.
    pub fn install_app(
        &self,
        shape: Shape,
        server: &Path,
        ctl: &Path,
        port: u16,
        args: &str,
        more: &[(&str, &str)],
    ) -> std::net::SocketAddr {
        let (template, reload) = match shape {
            Shape::NotifyReload => ("exuvia-app.service", "reload-verdict"),
            Shape::Portable => ("exuvia-app-portable.service", "upgrade"),
        };
        let (server, ctl) = (self.stage(server), self.stage(ctl));
        let stderr = format!("StandardError=append:{}", self.service_log().display());
        self.install(
            "exuvia-app.socket",
            "app.socket",
            &[("ListenStream", &format!("127.0.0.1:{port}"))],
            &[],
        );
        let exec_start = format!("{} {args}", server.display());
        let exec_reload = format!("{} {reload}", ctl.display());
        let exec_stop = format!("{} stop", ctl.display());
        // `more` first: a test's own value for a line wins over these.
        let mut replace = more.to_vec();
        replace.extend_from_slice(&[
            ("ExecStart", exec_start.as_str()),
            ("Requires", "app.socket"),
            ("After", "app.socket"),
            ("ExecReload", exec_reload.as_str()),
            ("ExecStop", exec_stop.as_str()),
        ]);
        self.install(template, "app.service", &replace, &[stderr.as_str()]);
        format!("127.0.0.1:{port}").parse().unwrap()
    }

    /// A copy of `binary` in this test's directory, which the namespace and the hardened units can see
    /// wherever the checkout is.
    pub fn stage(&self, binary: &Path) -> PathBuf {
        let bin = self.dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let to = bin.join(binary.file_name().unwrap());
        if !to.exists() {
            std::fs::copy(binary, &to)
                .unwrap_or_else(|e| panic!("staging {}: {e}", binary.display()));
        }
        to
    }

    /// Where the app service's stderr goes (see [`install_app`](Self::install_app)).
    pub fn service_log(&self) -> PathBuf {
        self.dir.join("service.log")
    }

    /// The host's pid for `ns_pid`, a pid inside this systemd's namespace (to read its `/proc` entries from
    /// outside), if that process exists.
    pub fn host_pid(&self, ns_pid: u32) -> Option<u32> {
        let ns = std::fs::read_link(format!("/proc/{}/ns/pid", self.pid)).ok()?;
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                .ok()
                .as_ref()
                != Some(&ns)
            {
                continue;
            }
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let inner = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|v| v.split_whitespace().last())
                .and_then(|v| v.parse::<u32>().ok());
            if inner == Some(ns_pid) {
                return Some(pid);
            }
        }
        None
    }

    /// Runs a command inside the namespace.
    pub fn run(&self, argv: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-m", "-p"])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .expect("nsenter")
    }

    pub fn systemctl(&self, args: &[&str]) -> Output {
        let mut argv = vec!["systemctl", "--no-pager"];
        argv.extend_from_slice(args);
        self.run(&argv)
    }

    /// `systemctl show -p PROP --value UNIT`.
    pub fn show(&self, unit: &str, prop: &str) -> String {
        let out = self.systemctl(&["show", "-p", prop, "--value", unit]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The manager's own property `prop` (`systemctl show -p PROP --value`), e.g. `Version`.
    pub fn manager(&self, prop: &str) -> String {
        let out = self.systemctl(&["show", "-p", prop, "--value"]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn main_pid(&self, unit: &str) -> u32 {
        self.show(unit, "MainPID").parse().unwrap_or(0)
    }

    /// Installs a shipped template from `units/` under `name`, adapted for the test the way a user adapts it:
    /// `replace` swaps whole lines by key (`ExecStart=`, `ListenStream=`, ...), and every unit gets
    /// `DefaultDependencies=no` (see the module docs for why).
    pub fn install(
        &self,
        template: &str,
        name: &str,
        replace: &[(&str, &str)],
        extra_service: &[&str],
    ) {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("units")
            .join(template);
        let text =
            std::fs::read_to_string(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        let mut out = String::new();
        for line in text.lines() {
            let key = line.split_once('=').map(|(k, _)| k);
            match replace.iter().find(|(k, _)| Some(*k) == key) {
                Some((k, v)) => out.push_str(&format!("{k}={v}\n")),
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            if line.trim() == "[Unit]" {
                out.push_str("DefaultDependencies=no\n");
            }
            if line.trim() == "[Service]" {
                for l in extra_service {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        std::fs::write(self.dir.join("units").join(name), out).unwrap();
        let r = self.systemctl(&["daemon-reload"]);
        assert!(
            r.status.success(),
            "daemon-reload: {}",
            String::from_utf8_lossy(&r.stderr)
        );
    }

    /// Installs a shipped drop-in from `units/` for `unit` (as `UNIT.d/NAME`).
    pub fn install_dropin(&self, template: &str, unit: &str) {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("units")
            .join(template);
        let dir = self.dir.join("units").join(format!("{unit}.d"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&src, dir.join(template)).unwrap();
        let r = self.systemctl(&["daemon-reload"]);
        assert!(
            r.status.success(),
            "daemon-reload: {}",
            String::from_utf8_lossy(&r.stderr)
        );
    }

    /// Installs a drop-in written by the test (not a shipped one) for `unit`.
    pub fn install_dropin_text(&self, unit: &str, name: &str, text: &str) {
        let dir = self.dir.join("units").join(format!("{unit}.d"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
        let r = self.systemctl(&["daemon-reload"]);
        assert!(
            r.status.success(),
            "daemon-reload: {}",
            String::from_utf8_lossy(&r.stderr)
        );
    }

    /// Starts a journald in this systemd (units written here: the machine's carry settings a test namespace
    /// does not need), keeping its journal in the namespace's /run only: `Storage=volatile`, never the
    /// machine's /var/log/journal. Services started afterwards log to it by default.
    pub fn start_journald(&self) {
        let units = self.dir.join("units");
        std::fs::write(
            units.join("systemd-journald.socket"),
            "[Unit]\nDefaultDependencies=no\n[Socket]\nListenStream=/run/systemd/journal/stdout\n\
             ListenDatagram=/run/systemd/journal/socket\nSocketMode=0666\nPassCredentials=yes\n\
             PassSecurity=yes\nReceiveBuffer=8M\nService=systemd-journald.service\n",
        )
        .unwrap();
        std::fs::write(
            units.join("systemd-journald.service"),
            "[Unit]\nDefaultDependencies=no\nRequires=systemd-journald.socket\nAfter=systemd-journald.socket\n\
             [Service]\nType=notify\nExecStart=/usr/lib/systemd/systemd-journald\n\
             Sockets=systemd-journald.socket\nStandardOutput=null\nRuntimeDirectory=systemd/journal\n\
             RuntimeDirectoryPreserve=yes\n",
        )
        .unwrap();
        let conf = "mkdir -p /run/systemd/journald.conf.d && \
                    printf '[Journal]\\nStorage=volatile\\nRateLimitBurst=0\\n' \
                    > /run/systemd/journald.conf.d/exuvia-test.conf";
        let out = self.run(&["sh", "-c", conf]);
        assert!(out.status.success(), "journald.conf: {out:?}");
        let r = self.systemctl(&["daemon-reload"]);
        assert!(r.status.success(), "daemon-reload: {r:?}");
        let r = self.systemctl(&["start", "systemd-journald.service"]);
        assert!(
            r.status.success(),
            "journald did not start: {}\n{}",
            String::from_utf8_lossy(&r.stderr),
            self.console()
        );
    }

    /// `journalctl -o json` of `args` (a unit, matches), one map per entry; text fields only.
    pub fn journal(&self, args: &[&str]) -> Vec<std::collections::HashMap<String, String>> {
        let mut argv = vec!["journalctl", "--no-pager", "-o", "json"];
        argv.extend_from_slice(args);
        let out = self.run(&argv);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(json_strings)
            .collect()
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// Processes in the namespace whose command is `comm`, by namespace pid.
    pub fn pids_of(&self, comm: &str) -> Vec<u32> {
        let out = self.run(&["ps", "-eo", "pid=,comm="]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let pid = it.next()?.parse().ok()?;
                (it.next()? == comm).then_some(pid)
            })
            .collect()
    }

    /// The journal of a unit as systemd logged it to the console (`STATUS=` changes, job results).
    pub fn status_text(&self, unit: &str) -> String {
        let out = self.systemctl(&["status", unit]);
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        // PID 1 of the namespace: killing it kills everything in the namespace.
        super::signal(self.pid, libc::SIGKILL);
        super::wait_gone(self.pid, Duration::from_secs(10));
        super::wait_gone(self.unshare_pid, Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The string fields of one line of `journalctl -o json` (a flat object; binary fields, arrays of bytes, are
/// skipped): enough of JSON for what journald writes, without a JSON crate for the tests.
pub fn json_strings(line: &str) -> Option<std::collections::HashMap<String, String>> {
    let body = line.trim().strip_prefix('{')?.strip_suffix('}')?;
    let mut map = std::collections::HashMap::new();
    let mut chars = body.chars().peekable();
    let string = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| -> Option<String> {
        let mut s = String::new();
        loop {
            match chars.next()? {
                '"' => return Some(s),
                '\\' => match chars.next()? {
                    'n' => s.push('\n'),
                    't' => s.push('\t'),
                    'u' => {
                        let hex: String = (0..4).filter_map(|_| chars.next()).collect();
                        s.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?).unwrap_or('?'));
                    }
                    c => s.push(c),
                },
                c => s.push(c),
            }
        }
    };
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => return Some(map),
            Some('"') => {}
            Some(_) => return None,
        }
        let key = string(&mut chars)?;
        while chars.peek().is_some_and(|c| *c == ':' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() == Some(&'"') {
            chars.next();
            map.insert(key, string(&mut chars)?);
        } else {
            // A number array (binary field) or null: skip to the next top-level comma.
            let mut depth = 0;
            while let Some(&c) = chars.peek() {
                match c {
                    '[' => depth += 1,
                    ']' => depth -= 1,
                    ',' if depth == 0 => break,
                    _ => {}
                }
                chars.next();
            }
        }
    }
}

//! Shared helpers for the integration tests: real processes, real sockets, a load generator that counts every
//! failure by kind, and a log watcher so that tests wait on what the processes say rather than on sleeps.
// Each test file uses a different subset, and `pub` here is for the test files, not a crate API.
#![allow(dead_code, unreachable_pub)]

/// Runs each named scenario (a function taking the example server's name) once per HTTP example: the std one
/// and the axum one.
#[allow(unused_macros)] // not every test file runs per-example scenarios
macro_rules! for_each_example {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[test]
                fn http_std() {
                    super::$scenario("http_std")
                }
                #[test]
                fn http_axum() {
                    super::$scenario("http_axum")
                }
            }
        )*
    };
}

pub mod systemd;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

/// Makes this test process the reaper of every process it starts and their descendants, so that an old
/// generation's orphaned child comes back to us and can be waited for (and no zombie outlives a test).
pub fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER failed");
    });
}

/// The path of a built example, rebuilt once per test process if its sources changed (`cargo test --test X`
/// does not rebuild examples, and a stale server binary would test old code).
pub fn example(name: &str) -> PathBuf {
    build("--example", name)
}

/// The path of a built binary of this package (`exuvia-ctl`), built like [`example`] for the programs that
/// have no `CARGO_BIN_EXE_*` (the benchmark).
pub fn binary(name: &str) -> PathBuf {
    build("--bin", name)
}

/// Builds `name` (`kind` is `--example` or `--bin`) once per process in this program's profile.
fn build(kind: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test>-<hash>, or target/<profile>/examples/<program>
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = match kind {
        "--example" => profile_dir.join("examples").join(name),
        _ => profile_dir.join(name),
    };
    static BUILT: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let mut built = BUILT.lock().unwrap();
    let key = format!("{kind} {name}");
    if !built.contains(&key) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // The same features as scripts/test builds with, so that this never flips the binary's feature set.
        cmd.args(["build", "--quiet", "--all-features", kind, name]);
        if profile_dir.file_name().unwrap() == "release" {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("cannot run cargo");
        assert!(st.success(), "building {name} failed");
        built.insert(key);
    }
    assert!(path.exists(), "{} missing", path.display());
    path
}

/// Writes an executable shell script at `path`.
pub fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Writes at `path` a script that runs `setup` (shell lines), then becomes `program` with its own arguments:
/// a program started (and re-executed by every upgrade) with something set up first.
pub fn wrapper(path: &Path, setup: &str, program: &Path) {
    script(
        path,
        &format!("{setup}\nexec '{}' \"$@\"\n", program.display()),
    );
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Lines a process tree wrote to stderr, shared with the test.
#[derive(Clone, Default)]
pub struct Log {
    inner: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Log {
    pub fn collect(stderr: impl Read + Send + 'static, echo: &'static str) -> Log {
        let log = Log::default();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("EXUVIA_TEST_ECHO").is_some() {
                    eprintln!("[{echo}] {line}");
                }
                let (m, cv) = &*l.inner;
                m.lock().unwrap().push(line);
                cv.notify_all();
            }
        });
        log
    }

    pub fn len(&self) -> usize {
        self.inner.0.lock().unwrap().len()
    }

    pub fn lines(&self) -> Vec<String> {
        self.inner.0.lock().unwrap().clone()
    }

    /// Waits for a line at index >= `from` that satisfies `pred`; returns its index and text.
    pub fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<(usize, String)> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.inner;
        let mut lines = m.lock().unwrap();
        loop {
            if let Some(i) = (from..lines.len()).find(|&i| pred(&lines[i])) {
                return Some((i, lines[i].clone()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            lines = cv.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Waits until `pred` holds for all lines so far; true if it did within `timeout`.
    pub fn wait_until(&self, timeout: Duration, pred: impl Fn(&[String]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.inner;
        let mut lines = m.lock().unwrap();
        loop {
            if pred(&lines) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            lines = cv.wait_timeout(lines, left).unwrap().0;
        }
    }

    pub fn dump(&self) -> String {
        self.lines().join("\n")
    }
}

/// `pid=N` as written by the example's log format and by the library's fields.
pub fn field(line: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    let mut search = 0;
    while let Some(i) = line[search..].find(&pat) {
        let at = search + i;
        // Must be a whole key, not the tail of another one (child_pid vs pid).
        let whole = at == 0
            || !line.as_bytes()[at - 1].is_ascii_alphanumeric() && line.as_bytes()[at - 1] != b'_';
        if whole {
            let rest = &line[at + pat.len()..];
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            return Some(rest[..end].trim_matches('"').to_string());
        }
        search = at + pat.len();
    }
    None
}

pub fn pid_of(line: &str) -> u32 {
    field(line, "pid")
        .and_then(|p| p.parse().ok())
        .expect("line without pid=")
}

/// A pidfd for `pid`: it keeps naming that process even after its pid is reused. `None` if there is no such
/// process.
pub fn pidfd(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: raw syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a new descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until the process behind `fd` has exited. True if it did within `timeout`.
pub fn wait_pidfd(fd: &std::os::fd::OwnedFd, timeout: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) > 0 }
}

/// Waits until `pid` has exited and reaps it if it is ours (we are the subreaper). True if it is gone.
/// Only for a pid that cannot have been reused yet: our child or descendant not yet reaped.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let Some(fd) = pidfd(pid) else {
        return true; // no such process
    };
    if !wait_pidfd(&fd, timeout) {
        return false;
    }
    let mut status = 0;
    // SAFETY: status is a live int. ECHILD (not ours) is fine: then init reaps it.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
    true
}

/// Whether `pid` is a zombie or gone entirely (`None`: gone; `Some(true)`: zombie).
pub fn zombie_state(pid: u32) -> Option<bool> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    Some(after.trim_start().starts_with('Z'))
}

/// Whether `pid` is a process (not a thread) whose parent chain reaches this process: one we started, or one
/// of their descendants (orphans come back to us, the subreaper). A pid that fails this may have been reused.
pub fn descends_from_us(pid: u32) -> bool {
    let me = std::process::id();
    let mut p = pid;
    for _ in 0..64 {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{p}/status")) else {
            return false;
        };
        let get = |key: &str| -> Option<u32> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
        };
        if get("Tgid:") != Some(p) {
            return false; // a thread id
        }
        match get("PPid:") {
            Some(pp) if pp == me => return true,
            Some(pp) if pp > 1 => p = pp,
            _ => return false,
        }
    }
    false
}

pub fn signal(pid: u32, sig: i32) -> bool {
    // SAFETY: kill with integer arguments.
    unsafe { libc::kill(pid as libc::pid_t, sig) == 0 }
}

/// Descriptors a process has open: fd number → link target.
pub fn open_fds(pid: u32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for e in dir.flatten() {
        let n: i32 = e.file_name().to_string_lossy().parse().unwrap_or(-1);
        let target = std::fs::read_link(e.path())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        out.push((n, target));
    }
    out.sort();
    out
}

/// Scheduling policy of every thread of `pid` (field 41 of `/proc/PID/task/TID/stat`): 0 is SCHED_OTHER,
/// 5 SCHED_IDLE.
pub fn thread_policies(pid: u32) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let tid: u32 = e.file_name().to_str().unwrap().parse().unwrap();
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue; // the thread exited meanwhile
        };
        let policy = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(41 - 3))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected stat format: {stat}"));
        out.push((tid, policy));
    }
    out
}

/// Socket inodes (`socket:[N]`) of TCP connections (any state but LISTEN) in `pid`'s network namespace: they
/// come and go with clients, so fd counts and comparisons leave them out.
pub fn tcp_connection_sockets(pid: u32) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
            if cols.len() > 9 && cols[3] != "0A" {
                out.insert(format!("socket:[{}]", cols[9]));
            }
        }
    }
    out
}

/// A running http_std process tree (the first generation and its successors).
pub struct Server {
    /// The program's file name (`http_std`, `http_axum`).
    pub program_name: String,
    pub addr: SocketAddr,
    pub log: Log,
    /// Every pid the tree reported serving with, in order.
    pub generations: Vec<u32>,
    /// The control socket (`--control-socket`), which the upgrades' verdicts come from; `None` for a bare
    /// server.
    pub control: Option<PathBuf>,
    _control_dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts `program` on a free port with `args`, and a control socket of its own unless `args` name one.
    pub fn start(program: &Path, args: &[&str]) -> Server {
        Server::start_on(program, "127.0.0.1:0", args)
    }

    /// Like [`start`](Self::start) on a given address.
    pub fn start_on(program: &Path, listen: &str, args: &[&str]) -> Server {
        Server::start_with(program, listen, args, true)
    }

    /// Without a control socket (unless `args` name one): for tests that pin exactly what a process holds,
    /// and for the benchmark, whose windows nothing else may share. Upgrade verdicts come from the log.
    pub fn start_bare(program: &Path, args: &[&str]) -> Server {
        Server::start_with(program, "127.0.0.1:0", args, false)
    }

    /// Like [`start_bare`](Self::start_bare) on a given address.
    pub fn start_bare_on(program: &Path, listen: &str, args: &[&str]) -> Server {
        Server::start_with(program, listen, args, false)
    }

    fn start_with(program: &Path, listen: &str, args: &[&str], control: bool) -> Server {
        become_subreaper();
        let named = args
            .iter()
            .position(|a| *a == "--control-socket")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from);
        let control_dir = (control && named.is_none()).then(|| tempfile::tempdir().unwrap());
        let own = control_dir.as_ref().map(|d| d.path().join("control.sock"));
        let mut cmd = Command::new(program);
        cmd.args(["--listen", listen]).args(args);
        if let Some(path) = &own {
            cmd.arg("--control-socket").arg(path);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // A program the test has just written (a wrapper script) may still be open for writing in a child
        // another test thread is forking: exec then fails with ETXTBSY until that child has exec'd.
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => break other.expect("start server"),
            }
        };
        let log = Log::collect(child.stderr.take().unwrap(), "server");
        let Some((_, line)) = log.wait_for(0, Duration::from_secs(30), |l| l.contains(" serving "))
        else {
            // Leave nothing behind on the way out.
            let _ = child.kill();
            let _ = child.wait();
            panic!("server did not start:\n{}", log.dump());
        };
        let addr: SocketAddr = field(&line, "addr").unwrap().parse().unwrap();
        let pid = pid_of(&line);
        assert_eq!(pid, child.id());
        // The Child handle is not needed: we reap by pid as the subreaper.
        std::mem::forget(child);
        Server {
            program_name: program
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            addr,
            log,
            generations: vec![pid],
            control: named.or(own),
            _control_dir: control_dir,
        }
    }

    pub fn current(&self) -> u32 {
        *self.generations.last().unwrap()
    }

    /// Sends SIGHUP to the current generation and waits for its verdict. `Ok(new pid)` once the new process
    /// serves and the old one has exited; `Err(reason)` if the upgrade failed.
    pub fn upgrade(&mut self) -> Result<u32, String> {
        let old = self.current();
        let new = self.upgrade_started()?;
        assert!(
            wait_gone(old, Duration::from_secs(30)),
            "old process {old} did not exit"
        );
        Ok(new)
    }

    /// Like [`upgrade`](Self::upgrade) but returns as soon as the new process serves, while the old one may
    /// still be draining. The verdict is `exuvia-ctl reload-verdict`'s, as a reload helper gets it (with a
    /// probation window: once the window has passed); a bare server's, its log's.
    pub fn upgrade_started(&mut self) -> Result<u32, String> {
        let old = self.current();
        let mark = self.log.len();
        // Found (built, the first time in this test process) before the signal: systemd starts the helper
        // right after it, and a helper that starts seconds later takes the signal for someone else's.
        let helper = self.control.as_ref().map(|_| binary("exuvia-ctl"));
        assert!(
            signal(old, libc::SIGHUP),
            "SIGHUP to {old} failed: it has exited\n{}",
            self.log.dump()
        );
        let (Some(control), Some(helper)) = (&self.control, helper) else {
            return self.await_verdict(old, mark);
        };
        // Started after the signal was sent: the verdict of the upgrade that signal started.
        let out = Command::new(helper)
            .arg("--socket")
            .arg(control)
            .args(["--timeout", "60", "reload-verdict"])
            .output()
            .expect("run exuvia-ctl");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        match out.status.code() {
            Some(0) => {}
            Some(1) => {
                // Shown only if the test then fails (the test harness captures it otherwise).
                eprintln!(
                    "upgrade of {old} failed; its log so far:\n{}",
                    self.log.dump()
                );
                return Err(stderr.trim().to_string());
            }
            _ => panic!(
                "exuvia-ctl reload-verdict could not ask {old}: {stderr}\n{}",
                self.log.dump()
            ),
        }
        // "upgraded to pid N in ..." (or, when a reload was merged into one already done, "... pid N ...").
        let new: u32 = stdout
            .split("pid ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("no new pid in the verdict: {stdout}"));
        self.generations.push(new);
        Ok(new)
    }

    /// The verdict of the upgrade a SIGHUP sent to `old` started, from `old`'s log lines from `mark` on: for a
    /// bare server, and for an upgrade the test did not start itself (a deferred SIGHUP).
    pub fn await_verdict(&mut self, old: u32, mark: usize) -> Result<u32, String> {
        let (_, line) = self
            .log
            .wait_for(mark, Duration::from_secs(60), |l| {
                // Both are logged once the upgrade has ended, so that a SIGHUP sent right after is not
                // refused as "in flight".
                field(l, "pid").and_then(|p| p.parse::<u32>().ok()) == Some(old)
                    && (l.contains("upgrade: handed over")
                        || l.contains("upgrade on SIGHUP did not happen"))
            })
            .unwrap_or_else(|| panic!("no upgrade verdict from {old}:\n{}", self.log.dump()));
        if line.contains("did not happen") {
            return Err(line);
        }
        let new: u32 = field(&line, "child_pid").unwrap().parse().unwrap();
        self.log
            .wait_for(mark, Duration::from_secs(30), |l| {
                l.contains(" serving ")
                    && field(l, "pid").and_then(|p| p.parse::<u32>().ok()) == Some(new)
            })
            .unwrap_or_else(|| panic!("{new} never served:\n{}", self.log.dump()));
        self.generations.push(new);
        Ok(new)
    }

    /// SIGTERM to the current generation; waits for it to exit.
    pub fn stop(&self) {
        let pid = self.current();
        signal(pid, libc::SIGTERM);
        assert!(
            wait_gone(pid, Duration::from_secs(30)),
            "server {pid} did not stop"
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Leave nothing behind, even when a test fails half-way: kill every pid the tree ever logged.
        let mut pids: BTreeSet<u32> = self.generations.iter().copied().collect();
        for l in self.log.lines() {
            if let Some(p) = field(&l, "pid").and_then(|p| p.parse().ok()) {
                pids.insert(p);
            }
            if let Some(p) = field(&l, "child_pid").and_then(|p| p.parse().ok()) {
                pids.insert(p);
            }
        }
        // Pids are reused (fast, where pid_max is 32768 and servers start a thread per connection): only a
        // process that still descends from this one is ours to kill or wait for.
        let ours: Vec<u32> = pids.into_iter().filter(|&p| descends_from_us(p)).collect();
        for &p in &ours {
            if zombie_state(p) == Some(false) {
                signal(p, libc::SIGKILL);
            }
        }
        for p in ours {
            wait_gone(p, Duration::from_secs(5));
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// HTTP client and load

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailKind {
    Refused,
    Reset,
    Timeout,
    ShortRead,
    BadResponse,
    Other,
}

#[derive(Debug)]
pub struct Response {
    pub pid: u32,
    pub version: String,
    pub close: bool,
}

fn classify(e: &std::io::Error) -> FailKind {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => FailKind::Refused,
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => FailKind::Reset,
        K::WouldBlock | K::TimedOut => FailKind::Timeout,
        K::UnexpectedEof => FailKind::ShortRead,
        _ => FailKind::Other,
    }
}

pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub fn connect(addr: SocketAddr) -> Result<TcpStream, (FailKind, String)> {
    let s = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)
        .map_err(|e| (classify(&e), e.to_string()))?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// One GET on an open connection. Reads exactly one response.
pub fn request(
    s: &mut TcpStream,
    path: &str,
    keep_alive: bool,
) -> Result<Response, (FailKind, String)> {
    request_as(s, path, keep_alive, "HTTP/1.1")
}

/// One GET in the given protocol version (`HTTP/1.0` or `HTTP/1.1`), asking for keep-alive or not.
pub fn request_as(
    s: &mut TcpStream,
    path: &str,
    keep_alive: bool,
    proto: &str,
) -> Result<Response, (FailKind, String)> {
    let conn = if keep_alive { "keep-alive" } else { "close" };
    let req = format!("GET {path} {proto}\r\nhost: test\r\nconnection: {conn}\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| (classify(&e), format!("write: {e}")))?;
    read_response(s).map(|(r, _)| r)
}

pub fn read_response(s: &mut TcpStream) -> Result<(Response, String), (FailKind, String)> {
    let mut buf = Vec::with_capacity(256);
    let mut byte = [0u8; 1024];
    let head_end;
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            head_end = i + 4;
            break;
        }
        match s.read(&mut byte) {
            Ok(0) => {
                let kind = if buf.is_empty() {
                    FailKind::ShortRead
                } else {
                    FailKind::BadResponse
                };
                return Err((kind, format!("eof after {} bytes", buf.len())));
            }
            Ok(n) => buf.extend_from_slice(&byte[..n]),
            Err(e) => return Err((classify(&e), format!("read: {e}"))),
        }
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let http10 = head.starts_with("HTTP/1.0 200");
    if !head.starts_with("HTTP/1.1 200") && !http10 {
        return Err((
            FailKind::BadResponse,
            head.lines().next().unwrap_or("").to_string(),
        ));
    }
    let mut len = 0usize;
    let mut pid = 0u32;
    let (mut close_token, mut keep_alive_token, mut connection_headers) = (0, 0, 0);
    for l in head.lines().skip(1) {
        if let Some((k, v)) = l.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap_or(0),
                "x-pid" => pid = v.trim().parse().unwrap_or(0),
                "connection" => {
                    connection_headers += 1;
                    for t in v.split(',').map(str::trim) {
                        close_token += usize::from(t.eq_ignore_ascii_case("close"));
                        keep_alive_token += usize::from(t.eq_ignore_ascii_case("keep-alive"));
                    }
                }
                _ => {}
            }
        }
    }
    // A response must not contradict itself: a client that believes `keep-alive` in `close, keep-alive`
    // sends on a connection the server closes.
    if connection_headers > 1 || close_token > 1 || (close_token > 0 && keep_alive_token > 0) {
        return Err((
            FailKind::BadResponse,
            format!("contradictory or repeated Connection header: {head:?}"),
        ));
    }
    // HTTP/1.0 closes unless the response says keep-alive; HTTP/1.1 keeps alive unless it says close.
    let close = if http10 {
        keep_alive_token == 0
    } else {
        close_token > 0
    };
    while buf.len() < head_end + len {
        match s.read(&mut byte) {
            Ok(0) => return Err((FailKind::ShortRead, "eof in body".into())),
            Ok(n) => buf.extend_from_slice(&byte[..n]),
            Err(e) => return Err((classify(&e), format!("read body: {e}"))),
        }
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string();
    let version = field(&body, "version").unwrap_or_default();
    // A service without the X-Pid header (the README's) says `pid=N` in its body.
    let pid = if pid == 0 {
        field(&body, "pid")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    } else {
        pid
    };
    if field(&body, "pid").and_then(|p| p.parse::<u32>().ok()) != Some(pid)
        && !body.is_empty()
        && pid != 0
    {
        // /env and other paths have no pid in the body; only / must agree with X-Pid.
        if body.starts_with("pid=") {
            return Err((
                FailKind::BadResponse,
                format!("x-pid {pid} disagrees with body {body:?}"),
            ));
        }
    }
    Ok((
        Response {
            pid,
            version,
            close,
        },
        body,
    ))
}

/// A GET on a new connection, then waits until the server has closed it (so that the server holds no
/// descriptor for it any more when this returns).
pub fn get_and_wait_close(
    addr: SocketAddr,
    path: &str,
) -> Result<(Response, String), (FailKind, String)> {
    let mut s = connect(addr)?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| (classify(&e), format!("write: {e}")))?;
    let r = read_response(&mut s)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .map_err(|e| (classify(&e), format!("waiting for close: {e}")))?;
    Ok(r)
}

/// A GET on a new connection.
pub fn get(addr: SocketAddr, path: &str) -> Result<(Response, String), (FailKind, String)> {
    let mut s = connect(addr)?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| (classify(&e), format!("write: {e}")))?;
    read_response(&mut s)
}

/// One served request.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub took: Duration,
    pub pid: u32,
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub ok: u64,
    pub failures: Vec<(FailKind, String)>,
    pub pids: BTreeSet<u32>,
    pub versions: BTreeSet<String>,
    /// Every successful request: when it started, how long it took, which pid answered.
    pub latencies: Vec<Sample>,
    /// When each failure happened.
    pub failed_at: Vec<Instant>,
    /// HTTP/2 requests not sent because the server had announced GOAWAY, then sent on a new connection.
    pub retried: u64,
    /// Keep-alive clients: connections opened after the first (the server closed one, or a request failed).
    pub reconnects: u64,
}

impl Stats {
    /// How many requests failed this way.
    pub fn count(&self, kind: FailKind) -> usize {
        self.failures.iter().filter(|(k, _)| *k == kind).count()
    }

    fn record_timed(&mut self, started: Instant, r: Result<Response, (FailKind, String)>) -> bool {
        match &r {
            Ok(resp) => self.latencies.push(Sample {
                at: started,
                took: started.elapsed(),
                pid: resp.pid,
            }),
            Err(_) => self.failed_at.push(started),
        }
        self.record(r)
    }

    fn record(&mut self, r: Result<Response, (FailKind, String)>) -> bool {
        match r {
            Ok(resp) => {
                self.ok += 1;
                self.pids.insert(resp.pid);
                self.versions.insert(resp.version);
                true
            }
            Err(f) => {
                self.failures.push(f);
                false
            }
        }
    }

    pub fn merge(&mut self, o: Stats) {
        self.ok += o.ok;
        self.failures.extend(o.failures);
        self.pids.extend(o.pids);
        self.versions.extend(o.versions);
        self.latencies.extend(o.latencies);
        self.failed_at.extend(o.failed_at);
        self.retried += o.retried;
        self.reconnects += o.reconnects;
    }

    pub fn summary(&self) -> String {
        let mut by: std::collections::BTreeMap<FailKind, usize> = Default::default();
        for (k, _) in &self.failures {
            *by.entry(*k).or_default() += 1;
        }
        format!(
            "ok={} failed={} {:?} pids={} first failures: {:?}",
            self.ok,
            self.failures.len(),
            by,
            self.pids.len(),
            self.failures.iter().take(5).collect::<Vec<_>>()
        )
    }
}

/// How a load client talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// A new connection per request (HTTP/1.1, `Connection: close`).
    Fresh,
    /// One HTTP/1.1 keep-alive connection, reconnecting only when a response says `Connection: close`.
    KeepAlive,
    /// One HTTP/1.0 connection asking for keep-alive (as `ab -k`), reconnecting when a response does not
    /// say `keep-alive`.
    KeepAlive10,
    /// HTTP/2 with prior knowledge (hyper's client), a new connection after GOAWAY.
    Http2,
}

/// Continuous load: clients of each [`Mode`], each starting one request every `pace` on a fixed schedule (at
/// once when it is late; a zero `pace` is as fast as the server answers). Bounded by `stop()`.
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<std::sync::atomic::AtomicU64>,
    clients: Vec<(Mode, std::thread::JoinHandle<Stats>)>,
}

/// Sleeps until the next slot of a fixed schedule. A client that fell behind (a slow response, a late
/// wake-up) catches up by starting its next requests at once, but never by more than a few slots: after a
/// long stall it starts again from now rather than bursting.
fn pace_until(next: &mut Instant, pace: Duration) {
    if pace.is_zero() {
        return;
    }
    *next += pace;
    let now = Instant::now();
    if *next > now {
        std::thread::sleep(*next - now);
    } else if now - *next > pace * 20 {
        *next = now;
    }
}

impl Load {
    /// `fresh` new-connection clients and `keepalive` HTTP/1.1 keep-alive clients.
    pub fn start(addr: SocketAddr, fresh: usize, keepalive: usize, pace: Duration) -> Load {
        Load::start_modes(
            addr,
            &[(Mode::Fresh, fresh), (Mode::KeepAlive, keepalive)],
            pace,
        )
    }

    /// `n` clients of each listed mode.
    pub fn start_modes(addr: SocketAddr, modes: &[(Mode, usize)], pace: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut clients = Vec::new();
        for &(mode, n) in modes {
            for _ in 0..n {
                let stop = stop.clone();
                let done = done.clone();
                let client = move || match mode {
                    Mode::Fresh => fresh_client(addr, pace, &stop, &done),
                    Mode::KeepAlive => keepalive_client(addr, pace, &stop, &done, "HTTP/1.1"),
                    Mode::KeepAlive10 => keepalive_client(addr, pace, &stop, &done, "HTTP/1.0"),
                    Mode::Http2 => http2_client(addr, pace, &stop, &done),
                };
                clients.push((mode, std::thread::spawn(client)));
            }
        }
        Load {
            stop,
            done,
            clients,
        }
    }

    /// Requests completed so far (served or failed).
    /// The mixed load most tests run under: 2 clients opening a connection per request and 4 keep-alive
    /// ones, each sending every 2 ms; returns once it runs (200 requests done).
    pub fn steady(addr: SocketAddr) -> Load {
        let load = Load::start(addr, 2, 4, Duration::from_millis(2));
        load.wait_progress(200);
        load
    }

    /// Lets 200 more requests through, stops, prints what happened (`what`), and asserts nothing failed.
    pub fn finish_clean(self, what: &str) -> Stats {
        self.wait_progress(200);
        let stats = self.stop();
        eprintln!("load ({what}): {}", stats.summary());
        assert!(stats.failures.is_empty(), "{what}: {}", stats.summary());
        stats
    }

    /// Stops, prints (`what`), and asserts nothing was refused and nothing timed out: for a stretch in which a
    /// process crashed (the connections it held end with it, as with any crash).
    pub fn finish_unrefused(self, what: &str) -> Stats {
        let stats = self.stop();
        eprintln!("load ({what}): {}", stats.summary());
        assert_eq!(
            stats.count(FailKind::Refused),
            0,
            "{what}: {}",
            stats.summary()
        );
        assert_eq!(
            stats.count(FailKind::Timeout),
            0,
            "{what}: {}",
            stats.summary()
        );
        stats
    }

    pub fn completed(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Blocks until `n` more requests have completed (the load has made progress), or panics after 60 s.
    pub fn wait_progress(&self, n: u64) {
        let target = self.completed() + n;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.completed() < target {
            assert!(Instant::now() < deadline, "load made no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stop(self) -> Stats {
        let mut all = Stats::default();
        for (_, st) in self.stop_each() {
            all.merge(st);
        }
        all
    }

    /// Stops the load; returns the new-connection clients' figures and the keep-alive clients' apart.
    pub fn stop_by_mode(self) -> (Stats, Stats) {
        let mut each = self.stop_each();
        (
            each.remove(&Mode::Fresh).unwrap_or_default(),
            each.remove(&Mode::KeepAlive).unwrap_or_default(),
        )
    }

    /// Stops the load; the figures of each mode.
    pub fn stop_each(self) -> std::collections::BTreeMap<Mode, Stats> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = std::collections::BTreeMap::<Mode, Stats>::new();
        for (mode, t) in self.clients {
            out.entry(mode).or_default().merge(t.join().unwrap());
        }
        out
    }
}

fn fresh_client(
    addr: SocketAddr,
    pace: Duration,
    stop: &AtomicBool,
    done: &std::sync::atomic::AtomicU64,
) -> Stats {
    let mut st = Stats::default();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        st.record_timed(t, get(addr, "/").map(|(r, _)| r));
        done.fetch_add(1, Ordering::Relaxed);
        pace_until(&mut next, pace);
    }
    st
}

fn keepalive_client(
    addr: SocketAddr,
    pace: Duration,
    stop: &AtomicBool,
    done: &std::sync::atomic::AtomicU64,
    proto: &str,
) -> Stats {
    let mut st = Stats::default();
    let mut conn: Option<TcpStream> = None;
    let mut next = Instant::now();
    let mut opened = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            match connect(addr) {
                Ok(c) => {
                    conn = Some(c);
                    st.reconnects += u64::from(opened > 0);
                    opened += 1;
                }
                Err(f) => {
                    st.failed_at.push(Instant::now());
                    st.failures.push(f);
                    pace_until(&mut next, pace.max(Duration::from_millis(1)));
                    continue;
                }
            }
        }
        let t = Instant::now();
        let r = request_as(conn.as_mut().unwrap(), "/", true, proto);
        let close = matches!(&r, Ok(resp) if resp.close) || r.is_err();
        st.record_timed(t, r);
        done.fetch_add(1, Ordering::Relaxed);
        if close {
            conn = None;
        }
        pace_until(&mut next, pace);
    }
    st
}

/// An HTTP/2 client with prior knowledge on hyper's client connection. A request refused because the server
/// sent GOAWAY before it was sent is not a failure: it goes on a new connection, as every HTTP/2 client does;
/// those retries are counted in `Stats::retried`.
fn http2_client(
    addr: SocketAddr,
    pace: Duration,
    stop: &AtomicBool,
    done: &std::sync::atomic::AtomicU64,
) -> Stats {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut st = Stats::default();
        let mut sender: Option<hyper::client::conn::http2::SendRequest<String>> = None;
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if sender.as_ref().map_or(true, |s| s.is_closed()) {
                let stream = match tokio::net::TcpStream::connect(addr).await {
                    Ok(s) => s,
                    Err(e) => {
                        st.failed_at.push(Instant::now());
                        st.failures.push((classify(&e), format!("connect: {e}")));
                        pace_until(&mut next, pace.max(Duration::from_millis(1)));
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                match hyper::client::conn::http2::handshake(
                    TokioExecutor::new(),
                    TokioIo::new(stream),
                )
                .await
                {
                    Ok((s, conn)) => {
                        tokio::spawn(conn);
                        sender = Some(s);
                    }
                    Err(e) => {
                        st.failed_at.push(Instant::now());
                        st.failures
                            .push((FailKind::Other, format!("h2 handshake: {e}")));
                        continue;
                    }
                }
            }
            let s = sender.as_mut().unwrap();
            let t = Instant::now();
            if s.ready().await.is_err() {
                // GOAWAY arrived: nothing was sent on this connection; open a new one.
                sender = None;
                st.retried += 1;
                continue;
            }
            let req = hyper::Request::builder()
                .uri(format!("http://{addr}/"))
                .body(String::new())
                .unwrap();
            let r = match s.send_request(req).await {
                Ok(resp) => h2_response(resp).await,
                Err(e) if e.is_canceled() => {
                    // Refused before the server processed it (GOAWAY's last stream id says so): retry.
                    sender = None;
                    st.retried += 1;
                    continue;
                }
                Err(e) => Err((FailKind::Other, format!("h2: {e}"))),
            };
            if r.is_err() {
                sender = None;
            }
            st.record_timed(t, r);
            done.fetch_add(1, Ordering::Relaxed);
            pace_until(&mut next, pace);
        }
        st
    })
}

async fn h2_response(
    resp: hyper::Response<hyper::body::Incoming>,
) -> Result<Response, (FailKind, String)> {
    use http_body::Body as _;
    if resp.status() != 200 {
        return Err((FailKind::BadResponse, format!("status {}", resp.status())));
    }
    if resp.headers().contains_key("connection") {
        return Err((FailKind::BadResponse, "connection header in HTTP/2".into()));
    }
    let pid = resp
        .headers()
        .get("x-pid")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    let mut body = std::pin::pin!(resp.into_body());
    let mut bytes = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    bytes.extend_from_slice(&d);
                }
            }
            Err(e) => return Err((FailKind::ShortRead, format!("h2 body: {e}"))),
        }
    }
    let body = String::from_utf8_lossy(&bytes);
    let pid = if pid == 0 {
        field(&body, "pid")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    } else {
        pid
    };
    Ok(Response {
        pid,
        version: field(&body, "version").unwrap_or_default(),
        close: false,
    })
}

/// Connections opened now (accepted or still queued) that send their request only when `finish` is called:
/// they catch a drain that cuts idle clients, or a queue lost in a handover.
pub struct Idle {
    conns: Vec<Result<TcpStream, (FailKind, String)>>,
}

impl Idle {
    pub fn open(addr: SocketAddr, n: usize) -> Idle {
        Idle {
            conns: (0..n).map(|_| connect(addr)).collect(),
        }
    }

    pub fn finish(self) -> Stats {
        self.finish_paced(Duration::ZERO)
    }

    /// Sends on each connection in turn, one request per `pace` (like one more client of the load rather
    /// than a burst).
    pub fn finish_paced(self, pace: Duration) -> Stats {
        let mut st = Stats::default();
        let mut next = Instant::now();
        for (i, c) in self.conns.into_iter().enumerate() {
            if i > 0 {
                pace_until(&mut next, pace);
            }
            match c {
                Ok(mut s) => {
                    st.record(request(&mut s, "/", false));
                }
                Err(f) => st.failures.push(f),
            }
        }
        st
    }
}

// ------------------------------------------------------------------------------------------------------------
// Off-the-shelf client programs (wrk, ab, h2load, curl)

/// The path of a client program, or `None` (a loud skip locally, a failure under CI).
pub fn client(name: &str, package: &str) -> Option<String> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    });
    match found {
        Some(p) => Some(p.display().to_string()),
        None => {
            skip(
                &format!("the {name} part of the off-the-shelf client tests"),
                &format!("{name} is missing: apt-get install {package} (.ci/run does)"),
            );
            None
        }
    }
}

/// Clients connected to `port` on this machine: established sockets whose remote end is that port.
pub fn established_to(port: u16) -> usize {
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 3 && cols[3] == "01" {
                let remote_port = cols[2]
                    .rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
                if remote_port == Some(port) {
                    n += 1;
                }
            }
        }
    }
    n
}

/// Waits until `clients` connections to the service are established (the client program is running).
pub fn wait_clients(addr: SocketAddr, clients: usize, child: &mut std::process::Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while established_to(addr.port()) < clients {
        assert!(
            child.try_wait().unwrap().is_none(),
            "{what} ended before it connected"
        );
        assert!(Instant::now() < deadline, "{what} never connected");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn output(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "client failed: {text}");
    text
}

/// The number after `key` in a client's report (`Failed requests:        0`).
pub fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    text[at..]
        .trim_start_matches([':', ' ', '\t'])
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// `ab -k` (ApacheBench, HTTP/1.0 keep-alive) against `addr` with `clients` connections for `secs` seconds:
/// the off-the-shelf client that sees any keep-alive connection the server closes.
pub struct AbKeepAlive {
    pub child: std::process::Child,
}

impl AbKeepAlive {
    /// Starts it and waits until every client is connected; `None` (a loud skip, a failure under CI) without ab.
    pub fn start(addr: SocketAddr, clients: usize, secs: u32) -> Option<AbKeepAlive> {
        let ab = client("ab", "apache2-utils")?;
        // -l: the body's length varies with the pid.
        let mut child = Command::new(ab)
            .args([
                "-k",
                "-l",
                "-q",
                "-c",
                &clients.to_string(),
                "-t",
                &secs.to_string(),
            ])
            .args(["-n", "100000000", &format!("http://{addr}/")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_clients(addr, clients, &mut child, "ab");
        Some(AbKeepAlive { child })
    }

    /// Checks that it still runs (what was measured happened under it), waits for its report, and asserts 0
    /// failed, every response 2xx, and every request on a kept-alive connection (none closed by the server:
    /// "Keep-Alive requests" equals "Complete requests"). Returns the number of requests.
    pub fn finish(mut self, during: &str) -> u64 {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "ab ended before the {during} did: make it run longer"
        );
        let out = output(self.child);
        eprintln!("ab:\n{out}");
        let complete = number_after(&out, "Complete requests").expect("Complete requests");
        let failed = number_after(&out, "Failed requests").expect("Failed requests");
        let keep_alive = number_after(&out, "Keep-Alive requests").expect("Keep-Alive requests");
        assert_eq!(failed, 0, "ab:\n{out}");
        assert!(!out.contains("Non-2xx"), "ab:\n{out}");
        assert!(complete > 1000, "too little load: {complete}");
        assert_eq!(
            keep_alive, complete,
            "the server closed a keep-alive connection:\n{out}"
        );
        complete
    }
}

// ------------------------------------------------------------------------------------------------------------

/// Says loudly that `what` did not run and why, and records it for the summary `scripts/test` prints
/// (`EXUVIA_SKIP_LOG`). Panics under CI instead: there every test must really run.
pub fn skip(what: &str, why: &str) {
    assert!(!in_ci(), "{what} cannot run in CI: {why}");
    eprintln!("SKIPPED {what}: {why}");
    if let Some(path) = std::env::var_os("EXUVIA_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{what}: {why}");
        }
    }
}

/// Whether CI demands that every test really runs.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Keeps `half_open` connections that sent half a request line and `idle` ones that sent nothing open on
/// `sock`, opening a new one whenever the service closes one, until `stop` is set. Returns how many it opened.
pub fn jam(
    sock: std::path::PathBuf,
    half_open: usize,
    idle: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    std::thread::spawn(move || {
        let open = |half: bool| -> Option<UnixStream> {
            let mut c = UnixStream::connect(&sock).ok()?;
            if half {
                c.write_all(b"exuvia-ctl/1 sta").ok()?;
            }
            c.set_nonblocking(true).ok()?;
            Some(c)
        };
        let mut conns: Vec<(bool, Option<UnixStream>)> = (0..half_open)
            .map(|_| (true, None))
            .chain((0..idle).map(|_| (false, None)))
            .collect();
        let mut opened = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            for (half, c) in &mut conns {
                let closed = match c {
                    None => true,
                    Some(s) => s.read(&mut [0u8; 256]).is_ok(),
                };
                if closed {
                    *c = open(*half);
                    opened += usize::from(c.is_some());
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        opened
    })
}

/// Raises this process's descriptor limit to `want` (the hard limit too, where allowed: root), or as far as
/// it goes; returns the soft limit. The servers started from here inherit it.
pub fn raise_fd_limit(want: u64) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a live rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        if r.rlim_cur >= want {
            return r.rlim_cur;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: r.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return want;
        }
        r.rlim_cur = r.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
    }
    r.rlim_cur
}

/// WebSocket clients of a library nobody here wrote (Python's `websockets`, `tests/support/ws_clients.py`):
/// each sends its next number every `interval` and checks that the answer carries its session's counter.
pub struct WsClients {
    child: std::process::Child,
    stop: tempfile::TempDir,
    /// Their output, line by line (`all <pid>`, then the report).
    lines: std::sync::mpsc::Receiver<String>,
    report: Option<String>,
}

/// What the WebSocket clients saw, from their report.
#[derive(Debug)]
pub struct WsReport {
    pub messages: u64,
    pub per_second: u64,
    pub disconnects: u64,
    /// Sessions that ended without a close handshake (a reset, a dropped connection): websockets' 1006.
    pub abnormal: u64,
    /// Sessions the server closed with 1001 "going away", reconnected (clients started with `reconnecting`).
    pub going_away: u64,
    pub error_count: u64,
    /// Every pid that answered, and those that gave each client never cut off its last answer.
    pub pids: Vec<u32>,
    pub last_pids: Vec<u32>,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub raw: String,
}

impl WsReport {
    /// Every session ended `closes` times, each with a 1001 "going away" close handshake: none abnormal, no
    /// client error.
    pub fn assert_every_close_going_away(&self, closes: usize) {
        assert_eq!(self.abnormal, 0, "{}", self.raw);
        assert_eq!(self.error_count, 0, "{}", self.raw);
        assert_eq!(self.going_away, closes as u64, "{}", self.raw);
    }
}

impl WsClients {
    /// The Debian interpreter with the Debian package (`python3-websockets`), or a loud skip (a failure in CI).
    pub fn python(what: &str) -> Option<PathBuf> {
        let python = PathBuf::from("/usr/bin/python3");
        let ok = Command::new(&python)
            .args(["-c", "import websockets"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            skip(
                what,
                "Python's websockets is missing: apt-get install python3-websockets (.ci/run does)",
            );
            return None;
        }
        Some(python)
    }

    /// Starts `n` clients of `url` and returns once every one is connected.
    pub fn start(python: &Path, url: &str, n: usize, interval: Duration) -> WsClients {
        WsClients::start_with(python, url, n, interval, false)
    }

    /// Like [`start`](Self::start), but a session the server closes with 1001 "going away" reconnects
    /// (counted in `going_away`) instead of counting as an error.
    pub fn reconnecting(python: &Path, url: &str, n: usize, interval: Duration) -> WsClients {
        WsClients::start_with(python, url, n, interval, true)
    }

    fn start_with(
        python: &Path,
        url: &str,
        n: usize,
        interval: Duration,
        reconnect: bool,
    ) -> WsClients {
        let stop = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/ws_clients.py");
        let mut child = Command::new(python)
            .arg(script)
            .arg(url)
            .arg(n.to_string())
            .arg(interval.as_millis().to_string())
            .arg(stop.path().join("stop"))
            .args(reconnect.then_some("reconnect"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the WebSocket clients");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        if line.trim() != format!("connected {n}") {
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("the WebSocket clients did not connect: {line}{err}");
        }
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        WsClients {
            child,
            stop,
            lines,
            report: None,
        }
    }

    /// Waits until every client has had an answer from process `pid` (they say so), at most `timeout`.
    pub fn all_answered_by(&mut self, pid: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let want = format!("all {pid}");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == want => return true,
                Ok(line) if line.starts_with('{') => {
                    self.report = Some(line);
                    return false;
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    /// Stops the clients (each closes its connection normally) and returns their report.
    pub fn finish(mut self) -> WsReport {
        std::fs::write(self.stop.path().join("stop"), b"").unwrap();
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let raw = self
            .report
            .take()
            .or_else(|| self.lines.iter().find(|l| l.starts_with('{')))
            .unwrap_or_default();
        assert!(
            status.success() && !raw.is_empty(),
            "the WebSocket clients failed ({status}): {raw}{err}"
        );
        let number = |key: &str| -> f64 {
            let at = raw
                .find(&format!("\"{key}\": "))
                .unwrap_or_else(|| panic!("{key} missing in {raw}"));
            raw[at + key.len() + 4..]
                .split([',', '}'])
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap_or(f64::NAN)
        };
        let list = |key: &str| -> Vec<u32> {
            let at = raw.find(&format!("\"{key}\": [")).unwrap() + key.len() + 5;
            let end = raw[at..].find(']').unwrap();
            raw[at..at + end]
                .split(',')
                .filter_map(|p| p.trim().parse().ok())
                .collect()
        };
        WsReport {
            messages: number("messages") as u64,
            per_second: number("per_second") as u64,
            disconnects: number("disconnects") as u64,
            abnormal: number("abnormal") as u64,
            going_away: number("going_away") as u64,
            error_count: number("error_count") as u64,
            pids: list("pids"),
            last_pids: list("last_pids"),
            p99_ms: number("p99_ms"),
            max_ms: number("max_ms"),
            raw,
        }
    }
}

/// `examples/grpc_tonic.rs`'s client (a stock tonic `Channel`): unary calls, server-streaming and
/// bidirectional streams against one address, reporting each stream opened and ended as it happens.
pub struct GrpcClients {
    child: std::process::Child,
    /// Its stdout, line by line.
    pub out: Log,
}

/// What a [`GrpcClients`] run saw in all.
#[derive(Debug)]
pub struct GrpcReport {
    pub ok: u64,
    pub failed: u64,
    pub resent: u64,
    pub resent_cancelled: u64,
    pub resent_internal: u64,
    /// The processes that answered unary calls, with how many each answered.
    pub unary_pids: std::collections::BTreeMap<u32, u64>,
    /// Every line the client wrote.
    pub lines: Vec<String>,
}

impl GrpcClients {
    /// `unary` tasks of unary calls, `watch` server-streaming and `bidi` bidirectional streams, started once
    /// every stream is open.
    pub fn start(addr: SocketAddr, unary: usize, watch: usize, bidi: usize) -> GrpcClients {
        let mut child = Command::new(example("grpc_tonic"))
            .arg("client")
            .args(["--connect", &format!("http://{addr}")])
            .args(["--unary", &unary.to_string()])
            .args(["--watch", &watch.to_string()])
            .args(["--bidi", &bidi.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the gRPC client");
        let out = Log::collect(child.stdout.take().unwrap(), "grpc client");
        let clients = GrpcClients { child, out };
        assert!(
            clients.out.wait_until(Duration::from_secs(30), |l| {
                l.iter().filter(|l| l.starts_with("open ")).count() >= watch + bidi
            }),
            "the gRPC client did not open its streams:\n{}",
            clients.out.dump()
        );
        clients
    }

    /// Lines `end ...` or `open ...` of `kind` for streams of process `pid`.
    pub fn events(&self, what: &str, kind: &str, pid: u32) -> Vec<String> {
        let head = format!("{what} kind={kind} ");
        self.out
            .lines()
            .into_iter()
            .filter(|l| l.starts_with(&head) && field(l, "pid") == Some(pid.to_string()))
            .collect()
    }

    /// Waits until `n` streams of `kind` were opened on `pid`.
    pub fn opened_on(&self, kind: &str, pid: u32, n: usize, timeout: Duration) -> bool {
        let head = format!("open kind={kind} pid={pid}");
        self.out
            .wait_until(timeout, |l| l.iter().filter(|l| **l == head).count() >= n)
    }

    /// After `old` handed over to `new`: every stream `old` served ended with `UNAVAILABLE` from the layer,
    /// and `watch` server-streaming plus `bidi` bidirectional streams re-opened on `new` (within 10 s).
    pub fn streams_moved(
        &self,
        old: u32,
        new: u32,
        watch: usize,
        bidi: usize,
    ) -> Result<(), String> {
        for (kind, n) in [("watch", watch), ("bidi", bidi)] {
            if !self.opened_on(kind, new, n, Duration::from_secs(10)) {
                return Err(format!(
                    "not every {kind} stream re-opened on {new}:\n{}",
                    self.out.dump()
                ));
            }
            let ends = self.events("end", kind, old);
            let unavailable = ends
                .iter()
                .filter(|e| e.contains("code=Unavailable") && e.contains("server going away"))
                .count();
            if ends.len() != n || unavailable != n {
                return Err(format!("{kind} streams of {old}: {ends:#?}"));
            }
        }
        Ok(())
    }

    /// SIGINT, then the client's report.
    pub fn finish(mut self) -> GrpcReport {
        signal(self.child.id(), libc::SIGINT);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the gRPC client failed: {status}");
        let found = self
            .out
            .wait_until(Duration::from_secs(10), |l| l.iter().any(|l| l == "done"));
        assert!(
            found,
            "no report from the gRPC client:\n{}",
            self.out.dump()
        );
        let lines = self.out.lines();
        let summary = lines.iter().find(|l| l.starts_with("unary ok=")).unwrap();
        let n = |k: &str| field(summary, k).and_then(|v| v.parse().ok()).unwrap();
        let unary_pids = lines
            .iter()
            .filter(|l| l.starts_with("unary_pid "))
            .map(|l| (n_of(l, "pid"), n_of(l, "calls")))
            .collect();
        GrpcReport {
            ok: n("ok"),
            failed: n("failed"),
            resent: n("resent"),
            resent_cancelled: n("resent_cancelled"),
            resent_internal: n("resent_internal"),
            unary_pids,
            lines,
        }
    }
}

fn n_of<T: std::str::FromStr>(line: &str, key: &str) -> T {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

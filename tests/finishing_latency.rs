//! `finishing()` never waits for I/O: while the old process waits for systemd to acknowledge the handover (a
//! stand-in notification socket that takes 1 s to answer the sd_notify barrier), calls on another thread
//! keep answering within a millisecond.
//!
//! The test binary plays three roles: the test itself (the slow notification socket), the old process (started
//! with `FINISHING_LATENCY_DIR`, it measures while it upgrades) and the new process it starts (the same binary
//! again, which only reports ready).

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use exuvia::Upgrader;
use support::*;

/// Not `EXUVIA_*`: the library never passes its own variables on.
const ROLE: &str = "FINISHING_LATENCY_DIR";
const TEST_NAME: &str = "finishing_answers_within_a_millisecond_while_the_barrier_takes_a_second";
const BARRIER_HOLD: Duration = Duration::from_secs(1);

#[test]
fn finishing_answers_within_a_millisecond_while_the_barrier_takes_a_second() {
    if let Some(dir) = std::env::var_os(ROLE) {
        return old_or_new(Path::new(&dir));
    }
    become_subreaper();
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let barriers = slow_notify_socket(&notify);
    let mut old = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(ROLE, dir.path())
        .env("NOTIFY_SOCKET", &notify)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Log::collect(old.stderr.take().unwrap(), "finishing-latency");
    let status = old.wait().unwrap();
    assert!(
        status.success(),
        "the old process failed ({status}):\n{}",
        log.dump()
    );
    let report = std::fs::read_to_string(dir.path().join("report"))
        .unwrap_or_else(|e| panic!("no report from the old process ({e}):\n{}", log.dump()));
    eprintln!("finishing() during an upgrade whose barrier takes 1 s: {report}");
    let field = |k: &str| -> u64 {
        report
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} missing from {report:?}"))
    };
    assert!(
        barriers.load(Ordering::SeqCst),
        "no BARRIER=1 reached the notification socket"
    );
    assert!(
        field("upgrade_ms") >= BARRIER_HOLD.as_millis() as u64,
        "the upgrade did not wait for the barrier: {report}"
    );
    // Millions of calls over the second; a call that waited for the barrier would take about a second.
    assert!(field("calls") > 10_000, "too few calls: {report}");
    assert!(
        field("p999_us") < 1_000,
        "finishing() took over 1 ms: {report}"
    );
    // The slowest single call includes whatever the scheduler did to the measuring thread on a busy machine;
    // waiting for the barrier would be a whole second.
    assert!(
        field("max_us") < 100_000,
        "a finishing() call waited: {report}"
    );
    let gen1: u32 = std::fs::read_to_string(dir.path().join("new.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(wait_gone(gen1, Duration::from_secs(30)));
}

/// A stand-in for systemd's notification socket that answers each barrier after [`BARRIER_HOLD`] (it holds
/// the barrier's pipe end that long). Sets the flag once a barrier arrived.
fn slow_notify_socket(path: &Path) -> Arc<AtomicBool> {
    let sock = UnixDatagram::bind(path).unwrap();
    let seen = Arc::new(AtomicBool::new(false));
    let flag = seen.clone();
    std::thread::spawn(move || loop {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        let mut buf = [0u8; 4096];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let Ok(got) = rustix::net::recvmsg(
            &sock,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) else {
            return;
        };
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = message {
                fds.extend(rights);
            }
        }
        if String::from_utf8_lossy(&buf[..got.bytes]).contains("BARRIER=1") {
            flag.store(true, Ordering::SeqCst);
            std::thread::spawn(move || {
                std::thread::sleep(BARRIER_HOLD); // the slow systemd this test stands for
                drop(fds);
            });
        }
    });
    seen
}

fn old_or_new(dir: &Path) {
    let up = Upgrader::builder()
        .program(std::env::current_exe().unwrap())
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .drain_timeout(Duration::from_secs(1))
        .build()
        .expect("build");
    if up.is_upgraded() {
        std::fs::write(dir.join("new.pid"), std::process::id().to_string()).unwrap();
        up.ready().expect("ready");
        return;
    }
    up.ready().expect("ready");
    let stop = Arc::new(AtomicBool::new(false));
    let measure = {
        let (up, stop) = (up.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut took = Vec::with_capacity(1 << 20);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let f = up.finishing();
                took.push(t.elapsed());
                if f.is_some() {
                    break;
                }
            }
            took
        })
    };
    let t0 = Instant::now();
    let report = up.upgrade().expect("upgrade");
    let upgrade = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut took = measure.join().unwrap();
    took.sort();
    let p999 = took[(took.len() - 1) * 999 / 1000];
    std::fs::write(
        dir.join("report"),
        format!(
            "calls={} p999_us={} max_us={} upgrade_ms={} child={}",
            took.len(),
            p999.as_micros(),
            took.last().unwrap().as_micros(),
            upgrade.as_millis(),
            report.child_pid
        ),
    )
    .unwrap();
    up.drain();
}

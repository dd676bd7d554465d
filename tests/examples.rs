//! The smaller examples do what their headers say: the Tokio echo server keeps open sessions across an upgrade,
//! and the state example hands its key and counter to the next generation.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// Starts an example on port 0 and returns its pid, address and log.
fn start(name: &'static str, args: &[&str], ready: &str) -> (u32, SocketAddr, Log) {
    become_subreaper();
    let mut child = Command::new(example(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Log::collect(child.stderr.take().unwrap(), name);
    let Some((_, line)) = log.wait_for(0, Duration::from_secs(30), |l| l.contains(ready)) else {
        // Leave nothing behind on the way out.
        let _ = child.kill();
        let _ = child.wait();
        panic!("{name} did not start:\n{}", log.dump());
    };
    let addr = field(&line, "addr").unwrap().parse().unwrap();
    let pid = child.id();
    std::mem::forget(child);
    (pid, addr, log)
}

fn line_from(addr: SocketAddr) -> String {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

/// Polls (new connections) until `pred` holds for the served line.
fn until(addr: SocketAddr, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let line = line_from(addr);
        if pred(&line) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "never saw the expected line; last {line:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn state_handover_carries_the_key_and_the_counter() {
    let (pid, addr, _log) = start("state_handover", &["--listen", "127.0.0.1:0"], "serving");
    let first = line_from(addr);
    assert!(
        first.starts_with("generation=0 served_before=0 key="),
        "{first}"
    );
    let key = field(&first, "key").unwrap();
    assert_eq!(key.len(), 64);
    assert!(signal(pid, libc::SIGHUP));
    let next = until(addr, |l| l.starts_with("generation=1"));
    assert_eq!(
        field(&next, "key").unwrap(),
        key,
        "the key must survive the upgrade"
    );
    let before: u64 = field(&next, "served_before").unwrap().parse().unwrap();
    assert!(before >= 1, "{next}");
    assert!(wait_gone(pid, Duration::from_secs(30)));
    // Stop the new generation (the only process left): it is the one that served `next`.
    let newest: u32 = {
        let l = _log.wait_for(0, Duration::from_secs(5), |l| {
            l.contains("generation=1") && l.contains("serving")
        });
        field(&l.unwrap().1, "pid").unwrap().parse().unwrap()
    };
    assert!(signal(newest, libc::SIGTERM));
    assert!(wait_gone(newest, Duration::from_secs(30)));
}

#[test]
fn echo_sessions_stay_with_the_old_process_across_an_upgrade() {
    let (pid, addr, log) = start("echo_tokio", &["127.0.0.1:0"], "echoing");
    let old = TcpStream::connect(addr).unwrap();
    old.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut old_r = BufReader::new(old.try_clone().unwrap());
    let mut old_w = old;
    let echo = |w: &mut TcpStream, r: &mut BufReader<TcpStream>, text: &str| {
        w.write_all(format!("{text}\n").as_bytes()).unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        line
    };
    assert_eq!(
        echo(&mut old_w, &mut old_r, "hello"),
        format!("{pid}: hello\n")
    );
    assert!(signal(pid, libc::SIGHUP));
    // A new session is served by the new process...
    let (_, line) = log
        .wait_for(0, Duration::from_secs(30), |l| {
            l.contains("echoing") && !l.contains(&format!("pid={pid}"))
        })
        .expect("the new generation never started");
    let new: u32 = field(&line, "pid").unwrap().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let got = echo(&mut w, &mut r, "again");
        if got == format!("{new}: again\n") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new sessions still served by {got}"
        );
    }
    // ...while the open session is still served by the old one, which exits once it ends.
    assert_eq!(
        echo(&mut old_w, &mut old_r, "still here"),
        format!("{pid}: still here\n")
    );
    drop((old_w, old_r));
    assert!(
        wait_gone(pid, Duration::from_secs(30)),
        "the old process did not exit after its last session"
    );
    assert!(signal(new, libc::SIGTERM));
    assert!(wait_gone(new, Duration::from_secs(30)));
}

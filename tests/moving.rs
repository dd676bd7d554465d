//! Established connections move to the new process with their state (`exuvia::moving`), through real
//! upgrades of the `tcp_lines` example: a line protocol whose per-connection count carries on across them.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::*;

/// One client of `tcp_lines`: what it sent, what came back.
struct Client {
    stream: TcpStream,
    sent: u64,
    buf: Vec<u8>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Client {
            stream,
            sent: 0,
            buf: Vec::new(),
        }
    }

    /// Sends `lines` in one write (pipelined when there are several).
    fn send(&mut self, lines: &[&str]) {
        let mut out = String::new();
        for l in lines {
            out.push_str(l);
            out.push('\n');
        }
        self.stream.write_all(out.as_bytes()).unwrap();
    }

    /// The next answer: (count, pid, line). Panics on the end of the connection or a timeout: a moved
    /// connection never ends.
    fn answer(&mut self) -> (u64, u32, String) {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let line = String::from_utf8(line).unwrap();
                let mut parts = line.trim_end().splitn(3, ' ');
                let count = parts.next().unwrap().parse().unwrap();
                let pid = parts.next().unwrap()["pid=".len()..].parse().unwrap();
                return (count, pid, parts.next().unwrap_or("").to_string());
            }
            let mut b = [0u8; 4096];
            let n = self
                .stream
                .read(&mut b)
                .unwrap_or_else(|e| panic!("after {} lines: {e}", self.sent));
            assert!(n > 0, "the connection ended after {} lines", self.sent);
            self.buf.extend_from_slice(&b[..n]);
        }
    }

    /// Sends one line and checks its answer: the next count, from `pid` if given. Returns the pid.
    fn exchange(&mut self, text: &str) -> u32 {
        self.send(&[text]);
        self.sent += 1;
        let (count, pid, echoed) = self.answer();
        assert_eq!(count, self.sent, "count broke at line {}", self.sent);
        assert_eq!(echoed, text);
        pid
    }
}

/// Raises this process's descriptor limit to its hard limit (the servers started from here inherit it).
fn raise_fd_limit(want: u64) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a live rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        r.rlim_cur = r.rlim_max.min(want);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
    }
    r.rlim_cur
}

#[test]
fn line_connections_keep_their_count_and_pipelined_bytes_across_five_upgrades() {
    let mut server = Server::start(&example("tcp_lines"), &["--drain-timeout", "60"]);
    let mut clients: Vec<Client> = (0..20).map(|_| Client::connect(server.addr)).collect();
    let first = server.current();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.exchange(&format!("hello {i}")), first);
    }
    for round in 0..5 {
        let old = server.current();
        // Half the clients leave a line and a half in flight right at the upgrade: the complete one is
        // answered by whichever process has the connection, the half travels as unread bytes.
        for c in clients.iter_mut().step_by(2) {
            c.stream.write_all(b"early\nhal").unwrap();
        }
        let new = server
            .upgrade_started()
            .unwrap_or_else(|e| panic!("upgrade {round}: {e}\n{}", server.log.dump()));
        for c in clients.iter_mut().step_by(2) {
            c.sent += 1;
            let (count, _, text) = c.answer();
            assert_eq!((count, text.as_str()), (c.sent, "early"));
        }
        // The old process had nothing left to wait for: it exits long before its drain deadline (60 s), every
        // connection moved (until it has, the old process may still answer: the verdict comes at the commit).
        assert!(wait_gone(old, Duration::from_secs(20)), "{old} lingered");
        for c in clients.iter_mut().step_by(2) {
            c.stream.write_all(b"f\n").unwrap();
            c.sent += 1;
            let (count, pid, text) = c.answer();
            assert_eq!((count, text.as_str()), (c.sent, "half"));
            assert_eq!(
                pid, new,
                "round {round}: the half line was answered by {pid}"
            );
        }
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(
                c.exchange(&format!("round {round} client {i}")),
                new,
                "round {round}: client {i} was not moved"
            );
        }
        // What the old process reports, once its last line is in (it has exited).
        let report = server
            .log
            .wait_for(0, Duration::from_secs(10), |l| {
                pid_of(l) == old && l.contains("connections moved")
            })
            .map(|(_, l)| (field(&l, "moved"), field(&l, "kept"), field(&l, "lost")));
        let twenty = Some("20".to_string());
        let zero = Some("0".to_string());
        assert_eq!(
            report,
            Some((twenty, zero.clone(), zero)),
            "{}",
            server.log.dump()
        );
    }
    // A stop drains: the connections are served until their clients leave.
    drop(clients);
    server.stop();
}

#[test]
fn a_thousand_idle_connections_move_at_once_and_the_old_process_exits() {
    const N: usize = 1000;
    if raise_fd_limit(8192) < (2 * N as u64 + 200) {
        skip(
            "moving",
            "the descriptor limit is too low for 1000 connections",
        );
        return;
    }
    let mut server = Server::start(&example("tcp_lines"), &["--drain-timeout", "60"]);
    let mut clients: Vec<Client> = (0..N).map(|_| Client::connect(server.addr)).collect();
    let first = server.current();
    for c in &mut clients {
        assert_eq!(c.exchange("before"), first);
    }
    let started = Instant::now();
    let new = server.upgrade_started().unwrap();
    assert!(
        wait_gone(first, Duration::from_secs(30)),
        "{first} lingered"
    );
    let exited = started.elapsed();
    for c in &mut clients {
        assert_eq!(c.exchange("after"), new);
    }
    eprintln!(
        "{N} idle connections: the old process exited {} ms after the reload signal",
        exited.as_millis()
    );
    drop(clients);
    server.stop();
}

//! WebSocket sessions move to the new process with their state (`exuvia::hyper::WebSocketIo`), through real
//! upgrades of the `websocket` example, driven by Python's `websockets` library (a client nobody here
//! wrote): no disconnect, no message lost, duplicated or reordered, each client's counter continuous.

mod support;

use std::time::{Duration, Instant};

use support::*;

const CLIENTS: usize = 1000;
const UPGRADES: usize = 10;

/// The `websocket` example started with `args` and `n` Python clients connected to it, each sending every
/// 10 ms; `None` (after a loud skip, a failure in CI) where Python's websockets or the descriptors are missing.
fn sessions(n: usize, args: &[&str]) -> Option<(Server, WsClients)> {
    let python = WsClients::python("websocket sessions")?;
    let limit = raise_fd_limit(2 * n as u64 + 4096);
    if limit < 2 * n as u64 + 300 {
        skip(
            "websocket sessions",
            &format!("the descriptor limit ({limit}) is too low for {n} clients"),
        );
        return None;
    }
    let server = Server::start(&example("websocket"), args);
    let url = format!("ws://{}/ws", server.addr);
    let clients = WsClients::start(&python, &url, n, Duration::from_millis(10));
    Some((server, clients))
}

#[test]
fn a_thousand_websocket_sessions_keep_their_counters_across_ten_upgrades() {
    let Some((mut server, mut clients)) = sessions(CLIENTS, &["--drain-timeout", "60"]) else {
        return;
    };
    let mut slowest = Duration::ZERO;
    for i in 0..UPGRADES {
        let old = server.current();
        let mark = server.log.len();
        let t0 = Instant::now();
        // Returns once the old process has exited: every session moved (or ended).
        let new = server
            .upgrade()
            .unwrap_or_else(|e| panic!("upgrade {i}: {e}\n{}", server.log.dump()));
        slowest = slowest.max(t0.elapsed());
        let (_, moved) = server
            .log
            .wait_for(mark, Duration::from_secs(10), |l| {
                pid_of(l) == old && l.contains("connections moved to the new process")
            })
            .unwrap_or_else(|| panic!("upgrade {i}: no move report\n{}", server.log.dump()));
        assert!(
            moved.contains(&format!("moved={CLIENTS} kept=0 lost=0")),
            "upgrade {i} to {new}: {moved}"
        );
        // Every client has had an answer from the new process before the next upgrade.
        assert!(
            clients.all_answered_by(new, Duration::from_secs(60)),
            "upgrade {i}: not every client was answered by {new}"
        );
    }
    let report = clients.finish();
    eprintln!("{}", report.raw);
    assert_eq!(report.disconnects, 0, "{}", report.raw);
    assert_eq!(report.error_count, 0, "{}", report.raw);
    // Every generation answered, and every session ended with the last one.
    let mut generations = server.generations.clone();
    generations.sort_unstable();
    assert_eq!(report.pids, generations, "{}", report.raw);
    assert_eq!(report.last_pids, vec![server.current()], "{}", report.raw);
    eprintln!(
        "{CLIENTS} WebSocket clients across {UPGRADES} upgrades: {} messages ({} per second), 0 disconnects, \
         0 lost, duplicated or reordered; p99 {} ms, max {} ms; slowest upgrade (signal to old process gone) {} ms",
        report.messages,
        report.per_second,
        report.p99_ms,
        report.max_ms,
        slowest.as_millis()
    );
    server.stop();
}

/// An upgrade right after another, before the first old process is done moving its sessions: the process in
/// the middle takes the rest of them and passes them on, and none is lost.
#[test]
fn sessions_move_on_through_back_to_back_upgrades() {
    let Some((mut server, mut clients)) = sessions(CLIENTS, &["--drain-timeout", "60"]) else {
        return;
    };
    for i in 0..3 {
        let first = server.current();
        let middle = server
            .upgrade_started()
            .unwrap_or_else(|e| panic!("round {i}: {e}\n{}", server.log.dump()));
        // At once: the first old process is still handing its sessions over.
        let last = server
            .upgrade_started()
            .unwrap_or_else(|e| panic!("round {i}, second: {e}\n{}", server.log.dump()));
        for pid in [first, middle] {
            assert!(wait_gone(pid, Duration::from_secs(60)), "{pid} lingered");
        }
        assert!(
            clients.all_answered_by(last, Duration::from_secs(60)),
            "round {i}: not every client was answered by {last}"
        );
    }
    let report = clients.finish();
    eprintln!("{}", report.raw);
    assert_eq!(report.disconnects, 0, "{}", report.raw);
    assert_eq!(report.error_count, 0, "{}", report.raw);
    assert_eq!(report.last_pids, vec![server.current()], "{}", report.raw);
    let reports: Vec<String> = server
        .log
        .lines()
        .into_iter()
        .filter(|l| l.contains("connections moved to the new process"))
        .collect();
    eprintln!("{}", reports.join("\n"));
    assert_eq!(reports.len(), 6, "{reports:?}");
    assert!(reports.iter().all(|l| l.contains("lost=0")), "{reports:?}");
    server.stop();
}

/// A new process short of descriptors takes the sessions it can (keeping 64 free); the rest stay with the old
/// process, whose sessions then close politely (a close frame: `examples/websocket.rs` does not serve on in a
/// finishing process). What the old process reports is what the clients see, and the moved ones go on.
#[test]
fn a_new_process_out_of_descriptors_takes_the_sessions_it_can() {
    const N: usize = 300;
    let fault = tempfile::NamedTempFile::new().unwrap();
    let fault_path = fault.path().to_str().unwrap().to_string();
    let args = ["--drain-timeout", "60", "--init-fault", &fault_path];
    let Some((mut server, mut clients)) = sessions(N, &args) else {
        return;
    };
    let first = server.current();
    assert!(clients.all_answered_by(first, Duration::from_secs(60)));
    // Only the next generation runs short.
    std::fs::write(fault.path(), "fdlimit 150").unwrap();
    let mark = server.log.len();
    let new = server
        .upgrade()
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log.dump()));
    let (_, line) = server
        .log
        .wait_for(mark, Duration::from_secs(10), |l| {
            pid_of(l) == first && l.contains("connections moved to the new process")
        })
        .unwrap_or_else(|| panic!("no move report\n{}", server.log.dump()));
    let count = |key: &str| -> usize { field(&line, key).unwrap().parse().unwrap() };
    let (moved, kept, lost) = (count("moved"), count("kept"), count("lost"));
    assert!(moved > 0 && kept > 0, "{line}");
    assert_eq!(moved + kept, N, "{line}");
    assert_eq!(lost, 0, "{line}");
    // The sessions that moved are all answered by the new process; the others were closed.
    assert!(
        clients.all_answered_by(new, Duration::from_secs(60)),
        "the moved sessions were not all answered by {new}"
    );
    let report = clients.finish();
    eprintln!("{line}\n{}", report.raw);
    assert_eq!(report.disconnects as usize, kept, "{}", report.raw);
    assert_eq!(report.error_count as usize, kept, "{}", report.raw);
    // Each closed politely: 1001 "going away", which the client library reports as a normal close.
    assert!(
        !report.raw.contains("ConnectionClosedError"),
        "{}",
        report.raw
    );
    assert_eq!(report.last_pids, vec![new], "{}", report.raw);
    eprintln!(
        "a new process with a limit of 150 descriptors: {moved} sessions moved, {kept} stayed and were closed \
         with a close frame, 0 lost"
    );
    server.stop();
}

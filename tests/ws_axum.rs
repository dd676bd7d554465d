//! WebSocket sessions written with axum's own `WebSocketUpgrade` (`examples/ws_axum.rs`), which cannot move:
//! at each upgrade every one ends with a close handshake, status 1001 "going away", and no reset. Python's
//! `websockets` (a client nobody here wrote) reports the close; the kernel's own counters report resets, which
//! a client library cannot see once the close frames have been exchanged. This file holds this one test, so
//! that nothing else runs beside it while it reads those machine-wide counters.

mod support;

use std::time::{Duration, Instant};

use support::*;

const CLIENTS: usize = 200;
const UPGRADES: usize = 10;

/// The kernel's count of resets this machine sent because a socket was closed with data unread in it, or
/// because data arrived for a socket already closed (`TcpExt: TCPAbortOnClose`, `TCPAbortOnData` in
/// `/proc/net/netstat`).
fn resets_sent() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let names: Vec<&str> = names.split_whitespace().skip(1).collect();
        let values: Vec<u64> = values
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap())
            .collect();
        return names
            .iter()
            .zip(values)
            .filter(|(n, _)| matches!(**n, "TCPAbortOnClose" | "TCPAbortOnData"))
            .map(|(_, v)| v)
            .sum();
    }
    panic!("no TcpExt counters in /proc/net/netstat");
}

/// 200 clients sending as fast as they are answered (so that messages are always in flight when a session
/// closes), 10 upgrades: every session ends with a 1001 close handshake and reconnects to the new process;
/// the old process waits for its clients' close frames, so the machine sends no reset meanwhile. (With the
/// session dropped right after its close frame, the same run sent 260 + 469 resets here, and every client
/// still reported a normal close: the counters are what can tell.)
#[test]
fn axum_websocket_sessions_close_with_going_away_and_no_reset_at_each_upgrade() {
    let Some(python) = WsClients::python("axum WebSocket sessions") else {
        return;
    };
    let mut server = Server::start(&example("ws_axum"), &["--drain-timeout", "30"]);
    let url = format!("ws://{}/ws", server.addr);
    let mut clients = WsClients::reconnecting(&python, &url, CLIENTS, Duration::ZERO);
    assert!(
        clients.all_answered_by(server.current(), Duration::from_secs(60)),
        "not every client was answered"
    );
    let resets_before = resets_sent();
    for i in 0..UPGRADES {
        let old = server.current();
        let t0 = Instant::now();
        let new = server
            .upgrade()
            .unwrap_or_else(|e| panic!("upgrade {i}: {e}\n{}", server.log.dump()));
        let gone = t0.elapsed();
        assert!(
            clients.all_answered_by(new, Duration::from_secs(60)),
            "upgrade {i}: not every client reconnected to {new}"
        );
        // The old process waited for the close handshakes, not for its 30 s drain deadline.
        assert!(
            gone < Duration::from_secs(10),
            "upgrade {i}: {old} took {gone:?}"
        );
    }
    let resets = resets_sent() - resets_before;
    let report = clients.finish();
    eprintln!("{}", report.raw);
    report.assert_every_close_going_away(CLIENTS * UPGRADES);
    assert_eq!(report.disconnects, 0, "{}", report.raw);
    assert_eq!(resets, 0, "resets sent during the upgrades");
    eprintln!(
        "{CLIENTS} axum WebSocket clients across {UPGRADES} upgrades: {} closes, every one 1001 with a close \
         handshake, 0 abnormal, 0 errors, 0 resets sent; {} messages",
        report.going_away, report.messages
    );
    server.stop();
}

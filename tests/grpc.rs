//! gRPC through upgrades, tonic on both sides (`examples/grpc_tonic.rs`): tonic's health and reflection
//! services served by `exuvia::hyper::serve`, a stock tonic `Channel` as the client. No unary call fails; every
//! server-streaming and bidirectional stream ends with `UNAVAILABLE` at the end of the stream grace and is
//! re-opened on the new process; the old process exits then, not at its drain deadline.

mod support;

use std::time::{Duration, Instant};

use support::*;

const UPGRADES: usize = 10;
const WATCH: usize = 4;
const BIDI: usize = 1;
/// The stream grace the server runs with, and its drain timeout (far above it).
const GRACE: Duration = Duration::from_secs(1);
const DRAIN: Duration = Duration::from_secs(20);

/// 8 tasks of unary calls (health `Check`), 4 server-streaming (`Watch`) and 1 bidirectional stream
/// (reflection), 10 upgrades by SIGHUP.
#[test]
fn tonic_loses_no_unary_call_and_streams_end_with_unavailable_at_each_upgrade() {
    let mut server = Server::start(
        &example("grpc_tonic"),
        &[
            "--stream-grace",
            &GRACE.as_secs_f64().to_string(),
            "--drain-timeout",
            &DRAIN.as_secs_f64().to_string(),
        ],
    );
    let clients = GrpcClients::start(server.addr, 8, WATCH, BIDI);
    let mut took = Vec::new();
    for i in 0..UPGRADES {
        let old = server.current();
        let mark = server.log.len();
        let t0 = Instant::now();
        let new = server
            .upgrade()
            .unwrap_or_else(|e| panic!("upgrade {i}: {e}\n{}", server.log.dump()));
        let gone = t0.elapsed();
        // The old process drained in about the grace: its streams ended then, not at the drain deadline.
        let (_, drained) = server
            .log
            .wait_for(mark, Duration::from_secs(5), |l| {
                l.contains("drain finished") && field(l, "pid") == Some(old.to_string())
            })
            .unwrap_or_else(|| {
                panic!(
                    "upgrade {i}: no drain report from {old}\n{}",
                    server.log.dump()
                )
            });
        assert_eq!(
            field(&drained, "left").as_deref(),
            Some("0"),
            "upgrade {i}: {drained}"
        );
        let ms: u64 = field(&drained, "took_ms").unwrap().parse().unwrap();
        assert!(
            Duration::from_millis(ms) < GRACE + Duration::from_secs(2) && gone < DRAIN / 2,
            "upgrade {i}: {old} drained in {ms} ms, gone after {gone:?} (grace {GRACE:?})"
        );
        took.push(ms);
        // Every stream of the old process ended with UNAVAILABLE and was re-opened on the new one.
        if let Err(e) = clients.streams_moved(old, new, WATCH, BIDI) {
            panic!("upgrade {i}: {e}");
        }
    }
    let report = clients.finish();
    server.stop();
    let failures: Vec<&String> = report
        .lines
        .iter()
        .filter(|l| l.starts_with("failure "))
        .collect();
    eprintln!(
        "unary calls: {} ok, {} failed, {} re-sent after the client's own GOAWAY race ({} Cancelled, {} \
         Internal); drains took {took:?} ms",
        report.ok, report.failed, report.resent, report.resent_cancelled, report.resent_internal
    );
    assert_eq!(report.failed, 0, "{failures:#?}");
    assert!(failures.is_empty(), "{failures:#?}");
    // Every generation answered unary calls.
    for pid in &server.generations {
        assert!(
            report.unary_pids.get(pid).is_some_and(|n| *n > 0),
            "{pid} answered no unary call: {:?}",
            report.unary_pids
        );
    }
}

//! The Tokio layer in one process: accepts until the process is finishing, then ends; `finished()` says why;
//! the async drain waits for guards.

use std::time::{Duration, Instant};

use exuvia::{Finish, Upgrader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_loop_ends_when_finishing_and_the_drain_waits() {
    let upgrader = Upgrader::builder()
        .drain_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let std_listener = upgrader.listen_tcp("t", "127.0.0.1:0").unwrap();
    let addr = std_listener.local_addr().unwrap();
    upgrader.ready().unwrap();
    let mut incoming = exuvia::tokio::TcpIncoming::new(&upgrader, std_listener).unwrap();
    let u = upgrader.clone();
    let server = tokio::spawn(async move {
        let mut served = 0;
        while let Some(conn) = incoming.accept().await {
            let (mut s, _) = conn.unwrap();
            let guard = u.track();
            served += 1;
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                // Echo one byte after the client asks, however long that takes (the drain waits for it).
                if s.read_exact(&mut b).await.is_ok() {
                    let _ = s.write_all(&b).await;
                }
                drop(guard);
            });
        }
        served
    });
    // Two connections served; the second stays open across the stop and is drained.
    let mut c1 = tokio::net::TcpStream::connect(addr).await.unwrap();
    c1.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    c1.read_exact(&mut b).await.unwrap();
    let mut c2 = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Wait until the server has it (readiness by observation: the guard count).
    while upgrader.in_flight() < 1 {
        tokio::task::yield_now().await;
    }
    let finished = tokio::spawn({
        let u = upgrader.clone();
        async move { u.finished().await }
    });
    upgrader.shutdown();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .unwrap()
            .unwrap(),
        Finish::Stopped {
            by: exuvia::StopCause::Api
        }
    );
    let served = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        served, 2,
        "the accept loop must end once the process is finishing"
    );
    // The in-flight connection is still served after the stop; the drain waits for it.
    let drain = tokio::spawn({
        let u = upgrader.clone();
        async move { u.drain_async().await }
    });
    // While c2 is open the drain keeps waiting (a negative observation: nothing may happen meanwhile).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !drain.is_finished(),
        "the drain returned while a connection was in flight"
    );
    c2.write_all(b"z").await.unwrap();
    c2.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"z");
    let report = tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((report.at_start, report.left), (1, 0), "{report:?}");
    assert!(report.took < Duration::from_secs(5));
}

#[tokio::test]
async fn upgrade_async_refuses_before_ready_without_blocking_the_runtime() {
    let upgrader = Upgrader::builder().build().unwrap();
    let e = upgrader.upgrade_async().await.unwrap_err();
    assert_eq!(e.kind(), exuvia::ErrorKind::NotReady, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_report_a_failed_upgrade_then_why_the_process_finishes() {
    let upgrader = Upgrader::builder()
        .program("/nonexistent/exuvia-next")
        .build()
        .unwrap();
    upgrader.ready().unwrap();
    // The events future counts from this call: it is first polled only after the upgrade has failed, and
    // must still report that failure.
    let events = upgrader.next_event();
    let e = upgrader.upgrade_async().await.unwrap_err();
    assert_eq!(e.kind(), exuvia::ErrorKind::Spawn);
    let Ok(event) = tokio::time::timeout(Duration::from_secs(5), events).await else {
        // Release the blocking waiter first, so that the runtime can shut down and the test fail promptly.
        upgrader.shutdown();
        panic!("the failed upgrade was not reported");
    };
    assert_eq!(
        event,
        exuvia::Event::UpgradeFailed(
            "cannot execute /nonexistent/exuvia-next: No such file or directory".into()
        )
    );
    // The process serves on; then it is stopped, and the next event says so.
    assert!(upgrader.finishing().is_none());
    let next = tokio::spawn(upgrader.next_event());
    upgrader.shutdown();
    let event = tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        event,
        exuvia::Event::Finishing(Finish::Stopped {
            by: exuvia::StopCause::Api
        })
    );
}

/// `wait_event` checks for a finish under one lock and the finish is published under another: the wake-up
/// that follows the publication must never fall between the check and the wait (before the fix it could, by
/// reading of the code; the window is nanoseconds wide, so this stress test, many rounds of a waiter racing a
/// stop under busy cores, catches a regression only by chance).
#[test]
fn wait_event_never_misses_the_finish() {
    // Busy threads on every core, so that the waiter is preempted at arbitrary points (that is how the race
    // showed up: under a loaded test run).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinners: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    for round in 0..2000u32 {
        let upgrader = Upgrader::builder().build().unwrap();
        upgrader.ready().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let u = upgrader.clone();
        std::thread::spawn(move || {
            let _ = started_tx.send(());
            let _ = tx.send(u.wait_event());
        });
        started_rx.recv().unwrap();
        // A varying head start (a busy wait of 0 to ~30 us) moves the stop across the waiter's check.
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_nanos(u64::from(round % 64) * 500) {
            std::hint::spin_loop();
        }
        upgrader.shutdown();
        let event = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("round {round}: wait_event missed the finish"));
        assert_eq!(
            event,
            exuvia::Event::Finishing(Finish::Stopped {
                by: exuvia::StopCause::Api
            })
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
}

/// A `next_event` future that is dropped before any event (a `select!` that took another branch) leaves
/// nothing waiting: the runtime shuts down at once. (When it waited on Tokio's blocking pool, the dropped
/// future's thread kept waiting for the next event, and dropping the runtime waited for that thread.)
#[test]
fn a_dropped_next_event_leaves_nothing_waiting() {
    let upgrader = Upgrader::builder().build().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let u = upgrader.clone();
    rt.block_on(async move {
        let mut events = std::pin::pin!(u.next_event());
        // Polled once, so that it has started waiting; then dropped.
        tokio::select! {
            biased;
            e = &mut events => panic!("no event was due: {e:?}"),
            _ = std::future::ready(()) => {}
        }
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(rt);
        let _ = tx.send(());
    });
    let shut_down = rx.recv_timeout(Duration::from_secs(5));
    // Releases a waiter left behind, if any, so that a failure ends instead of hanging.
    upgrader.shutdown();
    assert!(
        shut_down.is_ok(),
        "the runtime waited for a dropped next_event"
    );
}

/// Many async event waiters, each registered before a stop that lands at a varying moment: every one of them
/// reports the finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_async_event_waiter_sees_the_finish() {
    for round in 0..200u32 {
        let upgrader = Upgrader::builder().build().unwrap();
        upgrader.ready().unwrap();
        let waiters: Vec<_> = (0..4)
            .map(|_| tokio::spawn(upgrader.next_event()))
            .collect();
        if round % 2 == 0 {
            tokio::task::yield_now().await;
        }
        upgrader.shutdown();
        for w in waiters {
            let event = tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .unwrap_or_else(|_| panic!("round {round}: a waiter missed the finish"))
                .unwrap();
            assert_eq!(
                event,
                exuvia::Event::Finishing(Finish::Stopped {
                    by: exuvia::StopCause::Api
                })
            );
        }
    }
}

/// `grace_ended()` resolves the stream grace after the finish was published, for every waiter, whenever it
/// started waiting: one waiting before the stop, one that starts 250 ms after it (due 50 ms later: it must not
/// count its own 300 ms, so it resolves before a 150 ms timer started beside it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_ended_resolves_the_stream_grace_after_the_finish_for_every_waiter() {
    const GRACE: Duration = Duration::from_millis(300);
    let upgrader = Upgrader::builder().stream_grace(GRACE).build().unwrap();
    upgrader.ready().unwrap();
    let early = tokio::spawn({
        let u = upgrader.clone();
        async move {
            let finish = u.grace_ended().await;
            (finish, Instant::now())
        }
    });
    // Not before the finish: still pending a while later (a negative observation).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !early.is_finished(),
        "grace_ended resolved before any finish"
    );
    let stopped = Instant::now();
    upgrader.shutdown();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let late = upgrader.grace_ended();
    tokio::pin!(late);
    tokio::select! {
        biased;
        finish = &mut late => assert!(matches!(finish, Finish::Stopped { .. }), "{finish:?}"),
        _ = tokio::time::sleep(GRACE / 2) => panic!("a late waiter counted the grace from its own start"),
    }
    let (finish, at) = tokio::time::timeout(Duration::from_secs(5), early)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(finish, Finish::Stopped { .. }), "{finish:?}");
    assert!(
        at.duration_since(stopped) >= GRACE,
        "resolved {:?} after the stop, before the grace",
        at.duration_since(stopped)
    );
}

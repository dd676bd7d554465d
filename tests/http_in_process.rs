//! `exuvia::axum::serve` in one process, over a Unix socket: what a stop does to a busy keep-alive
//! connection, to an idle one, and to one that never sends again (closed at the drain deadline, counted).
#![cfg(feature = "axum")]

use std::time::{Duration, Instant};

use exuvia::Upgrader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

async fn get(c: &mut UnixStream) -> String {
    c.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"hello") {
        assert_eq!(c.read(&mut byte).await.unwrap(), 1, "closed: {buf:?}");
        buf.push(byte[0]);
    }
    String::from_utf8(buf).unwrap()
}

async fn closed(c: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(c.read(&mut b).await, Ok(0) | Err(_))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_closes_each_connection_after_its_next_response_and_cuts_the_silent_at_the_deadline()
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("http.sock");
    let upgrader = Upgrader::builder()
        .drain_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let listener = upgrader.listen_unix("http", &path).unwrap();
    upgrader.ready().unwrap();
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
    let server = tokio::spawn({
        let u = upgrader.clone();
        async move { exuvia::axum::serve(&u, listener, app).await }
    });

    let mut busy = UnixStream::connect(&path).await.unwrap();
    let mut idle = UnixStream::connect(&path).await.unwrap();
    let mut silent = UnixStream::connect(&path).await.unwrap();
    for c in [&mut busy, &mut idle, &mut silent] {
        let head = get(c).await;
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
    }
    assert_eq!(upgrader.in_flight(), 3);

    let stopped = Instant::now();
    upgrader.shutdown();
    // The next response on a keep-alive connection closes it, and the connection then closes.
    let head = get(&mut busy).await;
    assert!(
        head.to_ascii_lowercase().contains("connection: close\r\n"),
        "{head}"
    );
    assert!(closed(&mut busy).await);
    // A connection idle at the stop is still served (not cut), then closed.
    let head = get(&mut idle).await;
    assert!(
        head.to_ascii_lowercase().contains("connection: close\r\n"),
        "{head}"
    );
    assert!(closed(&mut idle).await);
    // One that never sends again is closed at the deadline and counted as left.
    assert!(closed(&mut silent).await);
    let report = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("serve did not return after its drain deadline")
        .unwrap()
        .unwrap();
    assert!(
        stopped.elapsed() >= Duration::from_secs(1),
        "cut before the deadline"
    );
    // The drain may begin before or after the first two closed: only the silent one is left in any case.
    assert_eq!(report.left, 1, "{report:?}");
    assert_eq!(report.drained, report.at_start - 1, "{report:?}");
    assert_eq!(upgrader.in_flight(), 0);
}

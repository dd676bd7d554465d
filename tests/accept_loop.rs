//! The std accept loop ([`exuvia::Incoming`]) when another accept loop shares its kernel socket, as the old
//! and new process do during a handover.
//!
//! `poll(2)` wakes every waiter when a connection arrives, and only one `accept` gets it. On a blocking
//! socket the loser's `accept` would then wait for the *next* connection, deaf to the finishing signal: an
//! old process that had handed over would linger, and its drain never start, until someone connected again.

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use exuvia::Upgrader;

/// Two accept loops on one socket, one connection, then stop: both loops must end promptly. Repeated,
/// because which loop wins each connection (and whether the loser was already past `poll`) is up to the
/// scheduler; with the loser's `accept` blocking, rounds hang at a rate of several per hundred here.
#[test]
fn both_of_two_accept_loops_on_one_socket_end_when_the_process_stops() {
    for round in 0..200 {
        let upgrader = Upgrader::builder().build().unwrap();
        let listener = upgrader.listen_tcp("http", "127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (ended_tx, ended) = mpsc::channel();
        let (accepted_tx, accepted_one) = mpsc::channel();
        for l in [listener.try_clone().unwrap(), listener] {
            let (u, accepted, ended_tx, accepted_tx) = (
                upgrader.clone(),
                accepted.clone(),
                ended_tx.clone(),
                accepted_tx.clone(),
            );
            std::thread::spawn(move || {
                for conn in u.incoming(l) {
                    if conn.is_ok() {
                        accepted.fetch_add(1, Ordering::SeqCst);
                        let _ = accepted_tx.send(());
                    }
                }
                let _ = ended_tx.send(());
            });
        }
        let _client = TcpStream::connect(addr).unwrap();
        accepted_one
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("round {round}: nothing accepted"));
        upgrader.shutdown();
        for _ in 0..2 {
            ended
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|_| {
                    panic!("round {round}: an accept loop did not end after the stop (stuck in accept?)")
                });
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "round {round}");
    }
}

/// The loop puts the socket in non-blocking mode (on the open file description, which every process
/// holding the socket shares): that is what keeps a lost race from blocking.
#[test]
fn the_accept_loop_makes_its_socket_non_blocking() {
    let upgrader = Upgrader::builder().build().unwrap();
    let listener = upgrader.listen_tcp("http", "127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let probe: TcpListener = listener.try_clone().unwrap();
    // SAFETY: F_GETFL on an open descriptor.
    let flags = || unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(flags() & libc::O_NONBLOCK, 0, "a fresh listener blocks");
    let mut incoming = upgrader.incoming(listener);
    let _client = TcpStream::connect(addr).unwrap();
    assert!(incoming.next().unwrap().is_ok());
    assert_ne!(flags() & libc::O_NONBLOCK, 0);
}

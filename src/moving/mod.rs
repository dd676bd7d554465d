//! Connections that move to the new process: established connections handed over at an upgrade, with the
//! application's per-connection state and the bytes already read but not used, instead of being drained.
//!
//! The kernel keeps a connection's whole state with its socket: a descriptor passed to another process
//! carries on there as if nothing happened (same peer, same sequence numbers, nothing for the client to
//! notice). What must travel besides is what the application keeps per connection. This module moves both,
//! over a channel of their own between the old process and the new one:
//!
//! - **The new process** calls [`Upgrader::arrivals`](crate::Upgrader::arrivals) before it reports ready
//!   (that call tells the old process it takes connections) and serves every [`Arrived`] connection its
//!   iterator yields, starting with the [`unread`](Arrived::unread) bytes and the
//!   [`state`](Arrived::state) it came with. (With Tokio: `Upgrader::arrivals_tokio`, feature `tokio`.)
//! - **The old process**, once it has handed over ([`Upgrader::finishing`](crate::Upgrader::finishing) says so),
//!   gets [`Departures`] from [`Upgrader::departures`](crate::Upgrader::departures) (`None` when the new
//!   process does not take connections) and hands each connection over at a boundary of its protocol:
//!   between two requests, after a message, never in the middle of one. [`Departures::hand_over`] returns
//!   once the new process has the connection; the old process then drops its stream (its copy of the
//!   descriptor: the connection stays open, nothing is sent to the client).
//!
//! ```no_run
//! use std::io::{BufRead, BufReader, Write};
//! use std::net::TcpStream;
//! use exuvia::moving::Departing;
//!
//! // The old process's side, in a connection's thread: between two lines, it moves if it can.
//! fn serve(upgrader: &exuvia::Upgrader, stream: TcpStream, mut count: u64) -> std::io::Result<()> {
//!     let mut reader = BufReader::new(stream.try_clone()?);
//!     let mut line = String::new();
//!     while reader.read_line(&mut line)? > 0 {
//!         count += 1;
//!         (&stream).write_all(format!("{count} {line}").as_bytes())?;
//!         line.clear();
//!         if let Some(departures) = upgrader.departures() {
//!             let leaving = Departing {
//!                 stream,
//!                 state: count.to_le_bytes().to_vec(),
//!                 unread: reader.buffer().to_vec(), // read from the socket, not yet used
//!             };
//!             return match departures.hand_over(leaving) {
//!                 Ok(()) => Ok(()), // the new process serves it now
//!                 Err(kept) => serve(upgrader, kept.connection.stream, count), // still ours
//!             };
//!         }
//!     }
//!     Ok(())
//! }
//! ```
//!
//! # The contract
//!
//! - **When**: after the handover (with a probation window, after the window has passed: until then the old
//!   process may take the service back, and keeps its connections), at a message boundary of the
//!   application's protocol, with nothing of the connection left in the old process but what travels: the
//!   state (at most [`MAX_CONNECTION_STATE`] bytes, the application's own format: put a version in it) and
//!   the unread bytes (at most [`MAX_UNREAD`]).
//! - **What the new process must do**: call `arrivals()` before `ready()`, and keep taking from it (a thread
//!   or task of its own) until it ends, which is when the old process has exited. The old process waits for
//!   the new one to take each batch; a connection the new process does not take stays with the old one.
//! - **If the new process dies** while connections are moving: the ones it has confirmed die with it (as its
//!   own connections do); the ones sent but not confirmed are closed by the old process, counted and logged
//!   (the new process may have read from them: nobody can serve them on safely); the ones not sent yet come
//!   back to the application ([`NotMoved`], [`Refusal::SuccessorGone`]), which serves or closes them as
//!   before this feature.
//! - **If the new process runs short of descriptors**, it takes what it can while keeping 64 free (for the
//!   connections it accepts, its control socket); the rest come back ([`Refusal::SuccessorFull`]) and both
//!   processes say so in their logs.
//! - **What cannot move**: a connection in the middle of a message; TLS whose session lives in the process's
//!   memory (rustls, OpenSSL: the keys and sequence numbers would have to travel too; kernel TLS could, not
//!   supported); an HTTP/2 connection (its streams, flow-control windows and HPACK tables live in the
//!   process; it gets GOAWAY). The HTTP layer (`exuvia::hyper`, feature `hyper`) moves HTTP/1.1 keep-alive connections by
//!   itself.
//!
//! The wire format is in the crate's `docs/DESIGN.md` and in `src/moving/wire.rs`: a versioned,
//! bounded packet protocol over a `SOCK_SEQPACKET` pair created for each upgrade.

mod arrivals;
mod departures;
mod successor;
pub(crate) mod wire;

use std::fmt;

#[cfg(feature = "tokio")]
pub(crate) use arrivals::{announce, Inbox, Progress};
pub use arrivals::{Arrivals, Arrived, ArrivedStream};
pub use departures::{Departures, Movable, MoveReport};
pub(crate) use successor::Successor;
pub use wire::{StreamKind, MAX_CONNECTION_STATE, MAX_UNREAD};

/// A connection on its way to the new process: its stream, the application's state for it and the bytes read
/// from it but not consumed.
#[derive(Debug)]
pub struct Departing<S> {
    /// The connection (`std::net::TcpStream`, `std::os::unix::net::UnixStream` or their Tokio types).
    pub stream: S,
    /// The application's state for this connection, at most [`MAX_CONNECTION_STATE`] bytes.
    pub state: Vec<u8>,
    /// Bytes read from the connection and not consumed (a pipelined next request), at most [`MAX_UNREAD`].
    pub unread: Vec<u8>,
}

/// A connection that did not move: it is still this process's, to serve or close.
#[derive(Debug)]
pub struct NotMoved<S> {
    /// The connection, as it was handed in.
    pub connection: Departing<S>,
    /// Why it did not move.
    pub reason: Refusal,
}

/// Why a connection did not move.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The new process died or closed the channel before this connection was sent.
    SuccessorGone,
    /// The new process is out of descriptors (or stopped taking connections).
    SuccessorFull,
    /// The state or the unread bytes are larger than the protocol carries.
    TooLarge {
        /// `state` or `unread bytes`.
        what: &'static str,
        /// How many bytes there were.
        len: usize,
        /// The most there may be.
        max: usize,
    },
    /// The stream is not a connected TCP or Unix stream socket (or has already moved).
    NotAConnection,
    /// The connection is in the middle of a message of its protocol: hand it over after a whole one.
    MidMessage,
    /// The channel failed in a way that left the connection here (the reason, for the log).
    Failed(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::SuccessorGone => write!(f, "the new process is gone"),
            Refusal::SuccessorFull => write!(
                f,
                "the new process takes no more connections (out of file descriptors? raise its LimitNOFILE=)"
            ),
            Refusal::TooLarge { what, len, max } => write!(
                f,
                "its {what} ({len} bytes) is more than a connection carries ({max} bytes)"
            ),
            Refusal::NotAConnection => write!(f, "it is not a connected TCP or Unix stream socket"),
            Refusal::MidMessage => write!(
                f,
                "it is in the middle of a message (hand it over after a whole one)"
            ),
            Refusal::Failed(why) => write!(f, "the connection channel failed: {why}"),
        }
    }
}

impl<S> fmt::Display for NotMoved<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the connection stays in this process: {}", self.reason)
    }
}

impl<S: fmt::Debug> std::error::Error for NotMoved<S> {}

#[cfg(test)]
mod tests {
    //! Both sides in one process, over a real packet pair and real TCP connections.

    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{AsFd, OwnedFd};
    use std::time::Duration;

    use super::*;
    use crate::sys;

    /// `n` connected pairs: (the server's end, the client's end).
    fn connections(n: usize) -> Vec<(TcpStream, TcpStream)> {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        (0..n)
            .map(|_| {
                let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
                let (s, _) = l.accept().unwrap();
                (s, c)
            })
            .collect()
    }

    /// The old process's side and the new one's, as they are once handed over.
    fn channel() -> (Departures, Arrivals, OwnedFd) {
        let (ours, theirs) = sys::packet_pair().unwrap();
        sys::set_nonblocking(theirs.as_fd(), true).unwrap();
        let raw = theirs.try_clone().unwrap();
        // The new process's side announces itself; the old one reads that at the handover.
        let arrivals = Arrivals::new(Some(theirs));
        let max = departures::read_takes(ours.as_fd(), std::time::Instant::now()).expect("Takes");
        assert_eq!(max, wire::MAX_BATCH);
        (Departures::start(ours, max).unwrap(), arrivals, raw)
    }

    fn read_line(c: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while c.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            out.push(b[0]);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn connections_move_with_their_state_and_unread_bytes_from_many_threads() {
        const N: usize = 300;
        let (departures, mut arrivals, _) = channel();
        let pairs = connections(N);
        let mut clients = Vec::new();
        let senders: Vec<_> = pairs
            .into_iter()
            .enumerate()
            .map(|(i, (server, client))| {
                clients.push(client);
                let d = departures.clone();
                std::thread::spawn(move || {
                    d.hand_over(Departing {
                        stream: server,
                        state: format!("state {i}").into_bytes(),
                        unread: format!("unread {i}\n").into_bytes(),
                    })
                    .map_err(|e| e.to_string())
                })
            })
            .collect();
        let mut arrived: Vec<Arrived> = (0..N).map(|_| arrivals.next().unwrap()).collect();
        for s in senders {
            s.join().unwrap().unwrap();
        }
        assert_eq!(
            departures.report(),
            MoveReport {
                moved: N as u64,
                kept: 0,
                lost: 0
            }
        );
        // Each arrived connection is the one its state names: what its client sends arrives there.
        arrived.sort_by_key(|a| String::from_utf8(a.state.clone()).unwrap());
        for a in &mut arrived {
            let i: usize = String::from_utf8_lossy(&a.state)[6..].parse().unwrap();
            assert_eq!(a.unread, format!("unread {i}\n").into_bytes());
            let ArrivedStream::Tcp(s) = &mut a.stream else {
                panic!("not TCP")
            };
            clients[i]
                .write_all(format!("to {i}\n").as_bytes())
                .unwrap();
            let mut got = [0u8; 32];
            let n = s.read(&mut got).unwrap();
            assert_eq!(&got[..n], format!("to {i}\n").as_bytes());
            s.write_all(b"back\n").unwrap();
            assert_eq!(read_line(&mut clients[i]), "back");
        }
    }

    #[test]
    fn nothing_moves_to_a_process_that_is_gone_and_the_connection_comes_back_intact() {
        let (departures, arrivals, raw) = channel();
        drop((arrivals, raw));
        let (server, mut client) = connections(1).pop().unwrap();
        let kept = departures
            .hand_over(Departing {
                stream: server,
                state: b"s".to_vec(),
                unread: Vec::new(),
            })
            .unwrap_err();
        assert_eq!(kept.reason, Refusal::SuccessorGone);
        assert_eq!(kept.connection.state, b"s");
        // Still a working connection, here.
        let mut s = kept.connection.stream;
        s.write_all(b"still here\n").unwrap();
        assert_eq!(read_line(&mut client), "still here");
        // Every later one stays at once too.
        let (server, _client) = connections(1).pop().unwrap();
        let again = departures.hand_over(Departing {
            stream: server,
            state: Vec::new(),
            unread: Vec::new(),
        });
        assert_eq!(again.unwrap_err().reason, Refusal::SuccessorGone);
        assert_eq!(departures.report().kept, 2);
    }

    #[test]
    fn sent_but_never_confirmed_is_lost_closed_and_counted() {
        let (departures, arrivals, theirs) = channel();
        drop(arrivals);
        // A new process that receives the batch and dies before confirming it.
        let receiver = std::thread::spawn(move || {
            let mut set = sys::PollSet::new();
            set.readable(theirs.as_fd());
            set.wait(None).unwrap();
            let mut buf = vec![0u8; wire::HEADER_LEN + wire::MAX_PAYLOAD];
            let packet = sys::recv_packet(theirs.as_fd(), &mut buf, wire::MAX_BATCH).unwrap();
            assert_eq!(packet.fds.len(), 1);
            // Dies: its end and the descriptors it received close.
        });
        let (server, mut client) = connections(1).pop().unwrap();
        departures
            .hand_over(Departing {
                stream: server,
                state: Vec::new(),
                unread: Vec::new(),
            })
            .unwrap();
        receiver.join().unwrap();
        assert_eq!(
            departures.report(),
            MoveReport {
                moved: 0,
                kept: 0,
                lost: 1
            }
        );
        // Closed in both processes: the client sees the end.
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut b = [0u8; 1];
        assert_eq!(client.read(&mut b).unwrap(), 0);
    }

    #[test]
    fn what_cannot_move_stays_and_says_why() {
        let (departures, _arrivals, _raw) = channel();
        let (server, _client) = connections(1).pop().unwrap();
        let big = departures.hand_over(Departing {
            stream: server,
            state: vec![0; MAX_CONNECTION_STATE + 1],
            unread: Vec::new(),
        });
        let big = big.unwrap_err();
        assert!(matches!(
            big.reason,
            Refusal::TooLarge { what: "state", .. }
        ));
        assert!(big.to_string().contains("stays in this process"), "{big}");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let not = departures.hand_over(Departing {
            stream: TcpStream::from(OwnedFd::from(listener)),
            state: Vec::new(),
            unread: Vec::new(),
        });
        assert_eq!(not.unwrap_err().reason, Refusal::NotAConnection);
    }
}

//! Watching a new process through its probation window, from the old process: whether it lives, whether a
//! stop reached it (it says so on the channel before it can exit), and whether it still accepts connections
//! (the kernel's own accept-queue figures for the listening sockets this process still holds).
//!
//! How each end of the window is told apart (see docs/DESIGN.md, "Probation: why an end cannot be mistaken"):
//!
//! - **A stop** is known only from the new process's `Stopping` message, which it sends while deciding to stop,
//!   before its finish is published and so before it can exit. Bytes written to a socket are readable by the
//!   peer before the writer's exit is visible through its pidfd, and the channel is a socket pair only the two
//!   processes hold (close-on-exec, never passed on), so no exit is taken for a stop unless the message came.
//! - **Any other end** (exit 0 included, a signal, an exit status nobody can read because the application set
//!   `SIGCHLD` to `SIG_IGN` or reaps children itself) is a crash: the pidfd turns readable whoever reaps.
//! - **Not serving**: a listener whose accept queue holds connections at every sample for the stall time, never
//!   shrinking from one sample to the next, has nobody accepting on it. Only an `accept` takes a connection off
//!   the queue (a client that resets a queued connection leaves it there until accepted), and this process's
//!   own accept loops are paused, so a shrinking queue is the new process at work: a busy process that accepts
//!   at all resets the count.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sys;

/// How often the accept queues are read during a window.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// The stall rule for one listener, fed one queue length per sample. Pure: no clock of its own, no I/O.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StallRule {
    /// Since when connections have waited with no sign of an accept.
    since: Option<Instant>,
    last: u32,
}

impl StallRule {
    pub(crate) fn new() -> StallRule {
        StallRule {
            since: None,
            last: 0,
        }
    }

    /// Takes a sample (`queued` connections at `now`); returns for how long the queue has been held without
    /// an accept.
    pub(crate) fn sample(&mut self, now: Instant, queued: u32) -> Duration {
        if queued == 0 {
            self.since = None;
        } else if self.since.is_none() || queued < self.last {
            // A first waiting connection, or fewer than before: somebody accepted.
            self.since = Some(now);
        }
        self.last = queued;
        self.since
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s))
    }
}

impl Default for StallRule {
    fn default() -> Self {
        StallRule::new()
    }
}

/// A listener that has not been accepted on for the stall time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stalled {
    /// The socket's name.
    pub(crate) name: String,
    /// Connections waiting at the last sample.
    pub(crate) queued: u32,
    /// How long they have waited with none accepted.
    pub(crate) held: Duration,
}

/// The accept queues of the listening sockets this process still holds, watched during a window.
#[derive(Debug)]
pub(crate) struct QueueWatch {
    after: Duration,
    listeners: Vec<(String, Arc<OwnedFd>, StallRule)>,
}

impl QueueWatch {
    /// Watches every stream listener among `sockets` (others have no accept queue); `after` is the stall
    /// time (zero: watch nothing).
    pub(crate) fn new(sockets: Vec<(String, Arc<OwnedFd>)>, after: Duration) -> QueueWatch {
        let listeners = if after.is_zero() {
            Vec::new()
        } else {
            sockets
                .into_iter()
                .filter(|(_, fd)| matches!(sys::accept_queue(fd.as_fd()), Ok(Some(_))))
                .map(|(name, fd)| (name, fd, StallRule::new()))
                .collect()
        };
        QueueWatch { after, listeners }
    }

    /// Whether anything is watched at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.listeners.is_empty()
    }

    /// Reads every queue once; the first listener held for the stall time, if any.
    pub(crate) fn sample(&mut self, now: Instant) -> Option<Stalled> {
        let mut stalled = None;
        for (name, fd, rule) in &mut self.listeners {
            let queued = match sys::accept_queue(fd.as_fd()) {
                Ok(Some(n)) => n,
                // Unreadable now: no evidence either way.
                Ok(None) | Err(_) => 0,
            };
            let held = rule.sample(now, queued);
            if held >= self.after && stalled.is_none() {
                stalled = Some(Stalled {
                    name: name.clone(),
                    queued,
                    held,
                });
            }
        }
        stalled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(samples: &[u32]) -> Vec<Duration> {
        let t0 = Instant::now();
        let mut rule = StallRule::new();
        samples
            .iter()
            .enumerate()
            .map(|(i, q)| rule.sample(t0 + SAMPLE_EVERY * i as u32, *q))
            .collect()
    }

    #[test]
    fn an_empty_queue_is_never_held() {
        assert!(run(&[0; 100]).iter().all(Duration::is_zero));
    }

    #[test]
    fn a_queue_that_never_shrinks_is_held_from_its_first_connection() {
        let held = run(&[0, 1, 1, 2, 5, 5, 9]);
        assert_eq!(held[0], Duration::ZERO);
        assert_eq!(held[1], Duration::ZERO);
        assert_eq!(held[6], SAMPLE_EVERY * 5);
    }

    #[test]
    fn any_accept_resets_it_even_when_the_queue_never_empties() {
        // A busy process that accepts slower than connections arrive, but accepts: every shrink restarts.
        let held = run(&[3, 4, 5, 4, 6, 7, 6, 8]);
        assert_eq!(*held.iter().max().unwrap(), SAMPLE_EVERY * 2);
        // And an empty queue forgets everything.
        let held = run(&[3, 4, 5, 0, 5, 5]);
        assert_eq!(held[5], SAMPLE_EVERY);
    }

    #[test]
    fn real_listeners_report_their_queues() {
        use std::os::fd::OwnedFd;
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = Arc::new(OwnedFd::from(tcp));
        let unix = Arc::new(OwnedFd::from(unix));
        assert_eq!(sys::accept_queue(tcp.as_fd()).unwrap(), Some(0));
        assert_eq!(sys::accept_queue(unix.as_fd()).unwrap(), Some(0));
        assert_eq!(sys::accept_queue(udp.as_fd()).unwrap(), None);
        let _c: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let _u = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert_eq!(sys::accept_queue(tcp.as_fd()).unwrap(), Some(3));
        assert_eq!(sys::accept_queue(unix.as_fd()).unwrap(), Some(1));
        let mut watch = QueueWatch::new(
            vec![("http".into(), tcp.clone()), ("sock".into(), unix.clone())],
            Duration::from_millis(100),
        );
        let t0 = Instant::now();
        assert_eq!(watch.sample(t0), None);
        let stalled = watch.sample(t0 + Duration::from_millis(150)).unwrap();
        assert_eq!(stalled.name, "http");
        assert_eq!(stalled.queued, 3);
        // Accepting one is progress.
        let l = std::net::TcpListener::from(tcp.as_fd().try_clone_to_owned().unwrap());
        let _accepted = l.accept().unwrap();
        let next = watch.sample(t0 + Duration::from_millis(200));
        assert_eq!(next.map(|s| s.name), Some("sock".to_string()));
    }
}

//! Tracking in-flight connections so that the old process can wait for them before it exits.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Counter {
    open: Mutex<usize>,
    changed: Condvar,
}

/// Counts live [`ConnectionGuard`]s.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tracker {
    inner: Arc<Counter>,
}

/// Held by the code serving one connection; dropping it tells the drain that the connection is done.
///
/// Get one from [`Upgrader::track`](crate::Upgrader::track) when a connection is accepted and keep it for as
/// long as the connection is served.
#[derive(Debug)]
#[must_use = "the connection counts as in flight only while the guard lives"]
pub struct ConnectionGuard {
    inner: Arc<Counter>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut open = self
            .inner
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *open -= 1;
        if *open == 0 {
            self.inner.changed.notify_all();
        }
    }
}

/// What a drain achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Connections in flight when the drain began.
    pub at_start: usize,
    /// How many fewer connections were open at the end than at the start (`at_start - left`).
    pub drained: usize,
    /// Connections still open at the deadline; they end with the process.
    pub left: usize,
    /// How long the drain took.
    pub took: Duration,
}

impl Tracker {
    pub(crate) fn guard(&self) -> ConnectionGuard {
        *self
            .inner
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += 1;
        ConnectionGuard {
            inner: self.inner.clone(),
        }
    }

    pub(crate) fn open(&self) -> usize {
        *self
            .inner
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until no guard is left or `timeout` passes.
    pub(crate) fn drain(&self, timeout: Duration) -> DrainReport {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut open = self
            .inner
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let at_start = *open;
        while *open > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            open = self
                .inner
                .changed
                .wait_timeout(open, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let left = *open;
        DrainReport {
            at_start,
            drained: at_start.saturating_sub(left),
            left,
            took: start.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_when_guards_drop_and_reports_leftovers() {
        let t = Tracker::default();
        let a = t.guard();
        let b = t.guard();
        let _c = t.guard();
        assert_eq!(t.open(), 3);
        let h = std::thread::spawn(move || {
            drop(a);
            drop(b);
        });
        let r = t.drain(Duration::from_millis(300));
        h.join().unwrap();
        // The thread may drop its two guards before or during the drain: the counts hold either way.
        assert_eq!(r.left, 1, "{r:?}");
        assert_eq!(r.at_start - r.drained, r.left, "{r:?}");
        assert!((1..=3).contains(&r.at_start), "{r:?}");
        assert!(
            r.took >= Duration::from_millis(300),
            "the guard still open must hold the drain to its deadline"
        );
    }

    #[test]
    fn an_idle_tracker_drains_at_once() {
        let t = Tracker::default();
        let r = t.drain(Duration::from_secs(10));
        assert_eq!((r.at_start, r.drained, r.left), (0, 0, 0));
        assert!(r.took < Duration::from_secs(1));
    }
}

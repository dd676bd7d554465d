//! Whether the new process takes connections: decided, after the commit, by a thread that waits a moment for
//! its `Takes` and then, if it came, becomes the sender of [`Departures`].
//!
//! The new process says it takes connections when the application asks for them (`Upgrader::arrivals`), which
//! the HTTP layer does as it starts serving, right after `ready()`: so a moment after the commit, not before
//! it. Whoever needs the answer (a response deciding on `Connection: close`, a connection about to move) waits
//! for it; nobody else does, so a service that moves no connections never waits at all.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::departures::{self, Departures};

/// How long after the commit the new process has to say it takes connections.
pub(crate) const TAKES_WAIT: Duration = Duration::from_secs(2);

/// The new process of the last commit, as far as connections go. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Successor {
    decision: Arc<Decision>,
}

#[derive(Debug, Default)]
struct Decision {
    /// `None` until decided; then where connections go, if anywhere. Only read, cloned and written under it.
    outcome: Mutex<Option<Option<Departures>>>,
    decided: Condvar,
    #[cfg(feature = "tokio")]
    decided_async: ::tokio::sync::Notify,
}

impl Successor {
    /// Starts the thread that decides, on this process's end of the connection channel.
    pub(crate) fn watch(channel: OwnedFd) -> Successor {
        let decision = Arc::new(Decision::default());
        let deadline = Instant::now() + TAKES_WAIT;
        let d = decision.clone();
        let spawned = std::thread::Builder::new()
            .name("exuvia-departures".into())
            .spawn(move || {
                let Some(max_batch) = departures::read_takes(channel.as_fd(), deadline) else {
                    d.set(None);
                    return;
                };
                let (departures, mut sender, queue) = departures::departures(channel, max_batch);
                tracing::info!(
                    max_batch,
                    "the new process takes connections: they move instead of draining"
                );
                d.set(Some(departures));
                // Only the handles keep the sender going: once they are all dropped (the upgrader's with this
                // decision), it ends and closes the channel.
                drop(d);
                sender.run(queue);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the thread that moves connections; they drain here");
            decision.set(None);
        }
        Successor { decision }
    }

    /// Where connections go: waits until decided (at most [`TAKES_WAIT`] after the commit).
    pub(crate) fn wait(&self) -> Option<Departures> {
        let d = &self.decision;
        let outcome = d.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        let outcome = d
            .decided
            .wait_while(outcome, |o| o.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        outcome.clone().flatten()
    }

    /// [`wait`](Self::wait) for async code.
    #[cfg(feature = "tokio")]
    pub(crate) async fn wait_async(&self) -> Option<Departures> {
        let d = &self.decision;
        loop {
            // Registered before the check: a decision in between is not missed.
            let decided = d.decided_async.notified();
            let mut decided = std::pin::pin!(decided);
            decided.as_mut().enable();
            if let Some(outcome) = d.get() {
                return outcome;
            }
            decided.await;
        }
    }
}

impl Decision {
    #[cfg(feature = "tokio")]
    fn get(&self) -> Option<Option<Departures>> {
        self.outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, outcome: Option<Departures>) {
        *self.outcome.lock().unwrap_or_else(PoisonError::into_inner) = Some(outcome);
        self.decided.notify_all();
        #[cfg(feature = "tokio")]
        self.decided_async.notify_waiters();
    }
}

//! Moving established connections to the new process (see [`crate::moving`]): the new process's
//! [`Upgrader::arrivals`], the old process's [`Upgrader::departures`].

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;

use super::{lock, Upgrader};
use crate::error::{Error, ErrorKind, Result};
use crate::moving::{self, Arrivals, Departures};

impl Upgrader {
    /// The connections the old process moves to this one at the upgrade that started it; taking them tells
    /// the old process that this one takes connections. Call it once, **before** [`ready`](Self::ready), and
    /// serve what it yields from a thread of its own until it ends (when the old process has exited). In a
    /// process no upgrade started (or started by a build that does not move connections), it ends at once.
    /// See [`crate::moving`] for the contract.
    ///
    /// # Errors
    /// [`ErrorKind::AlreadyTaken`] the second time; [`ErrorKind::NotReady`] after `ready()` (the old process
    /// has decided by then which connections to move: none).
    pub fn arrivals(&self) -> Result<Arrivals> {
        Ok(Arrivals::new(self.take_moves()?))
    }

    /// The new process's end of the connection channel, once, before ready.
    pub(crate) fn take_moves(&self) -> Result<Option<OwnedFd>> {
        if self.inner.arrivals_taken.swap(true, Ordering::AcqRel) {
            return Err(Error::new(
                ErrorKind::AlreadyTaken,
                "the arriving connections were already taken (Upgrader::arrivals is called once)",
            ));
        }
        if self.inner.lifecycle.record(|_, a| a.ready_called) {
            return Err(Error::new(
                ErrorKind::NotReady,
                "Upgrader::arrivals must be called before ready(): the old process decides at the handover \
                 whether this process takes connections",
            ));
        }
        // Taken out of the link first: the guard must not live through anything else.
        let moves = lock(&self.inner.parent)
            .as_mut()
            .and_then(|l| l.moves.take());
        Ok(moves)
    }

    /// Where this process's connections go, once it has handed over to a new process that takes them
    /// (after its probation window, if there is one). `None` before that, after a stop, and when the new
    /// process takes no connections: then drain them as before.
    pub fn departures(&self) -> Option<Departures> {
        self.inner.departures.get().cloned()
    }

    /// At the handover: starts moving connections if the new process said it takes them.
    pub(super) fn start_departures(&self, channel: Option<OwnedFd>) {
        let Some(channel) = channel else { return };
        let Some(max_batch) = moving::read_takes(channel.as_fd()) else {
            return;
        };
        match Departures::start(channel, max_batch) {
            Ok(d) => {
                tracing::info!(
                    max_batch,
                    "the new process takes connections: moving them instead of draining"
                );
                let _ = self.inner.departures.set(d);
            }
            Err(e) => tracing::warn!(
                error = %e,
                "cannot start the thread that moves connections; draining them instead"
            ),
        }
    }
}

//! Moving established connections to the new process (see [`crate::moving`]): the new process's
//! [`Upgrader::arrivals`], the old process's [`Upgrader::departures`].

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use super::{lock, Upgrader};
use crate::error::{Error, ErrorKind, Result};
use crate::lifecycle::Finish;
use crate::moving::{Arrivals, Departures, Successor};

impl Upgrader {
    /// The connections the old process moves to this one at the upgrade that started it; taking them tells
    /// the old process that this one takes connections. Call it once, before [`ready`](Self::ready) or right
    /// after (the old process waits 2 s after the handover for it, then drains its connections instead), and
    /// serve what it yields from a thread of its own until it ends (when the old process has exited). In a
    /// process no upgrade started (or started by a build that does not move connections), it ends at once.
    /// See [`crate::moving`] for the contract.
    ///
    /// # Errors
    /// [`ErrorKind::AlreadyTaken`] the second time.
    pub fn arrivals(&self) -> Result<Arrivals> {
        Ok(Arrivals::new(self.take_moves()?))
    }

    /// The new process's end of the connection channel, once (`None` when turned off or not offered).
    pub(crate) fn take_moves(&self) -> Result<Option<OwnedFd>> {
        if self.inner.arrivals_taken.swap(true, Ordering::AcqRel) {
            return Err(Error::new(
                ErrorKind::AlreadyTaken,
                "the arriving connections were already taken (Upgrader::arrivals is called once)",
            ));
        }
        let moves = lock(&self.inner.moves).take();
        // Turned off: the channel closes here, which the old process reads as "takes none" at once.
        Ok(moves.filter(|_| self.inner.move_connections))
    }

    /// Where this process's connections go, once it has handed over (after its successor's probation window,
    /// if there is one) to a new process that takes them. `None` before that, after a stop, and when the new
    /// process takes no connections: then drain them as before. May wait a moment: the new process says
    /// whether it takes connections within 2 s of the handover (usually within a millisecond).
    pub fn departures(&self) -> Option<Departures> {
        if !matches!(self.finishing(), Some(Finish::Upgraded { .. })) {
            return None;
        }
        self.successor()?.wait()
    }

    /// Whether this process's connections will move to the new process rather than drain: it has handed over
    /// (or is handing over: also during the new process's probation window) to a process that takes them.
    /// Ask it when [`closing`](Self::closing) is true, to decide whether a response keeps its connection
    /// open for the client (it moves after it) or closes it. May wait a moment, as
    /// [`departures`](Self::departures) does; `false` when no upgrade is committed.
    pub fn moves_connections(&self) -> bool {
        self.successor().is_some_and(|s| s.wait().is_some())
    }

    /// The new process of the last commit, as far as connections go: also during its probation window, not
    /// once this process is stopping (nothing moves then: the connections close).
    pub(crate) fn successor(&self) -> Option<Successor> {
        if !self.inner.move_connections || matches!(self.finishing(), Some(Finish::Stopped { .. }))
        {
            return None;
        }
        lock(&self.inner.successor).clone()
    }

    /// Where the HTTP layer puts the WebSocket connections that moved here.
    #[cfg(feature = "hyper")]
    pub(crate) fn websocket_queue(&self) -> &crate::hyper::WebSocketQueue {
        &self.inner.websockets
    }

    /// At the commit: watches whether the new process takes connections (a rollback forgets it).
    pub(super) fn watch_successor(&self, channel: Option<OwnedFd>) {
        let successor = channel.map(Successor::watch);
        // The one it replaces is dropped after the lock.
        let replaced = std::mem::replace(&mut *lock(&self.inner.successor), successor);
        drop(replaced);
    }
}

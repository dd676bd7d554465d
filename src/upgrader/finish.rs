//! Finishing: stopping, publishing the finish, waiting for it (blocking, or as an event) and the drain.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use super::{Event, Upgrader};
use crate::drain::{ConnectionGuard, DrainReport};
use crate::lifecycle::{Core, Finish, Phase, Step, StopCause};

impl Upgrader {
    /// Marks this process as stopping ([`Finish::Stopped`]): accept loops end; then [`drain`](Self::drain)
    /// and exit. Does nothing if it is already finishing.
    pub fn shutdown(&self) {
        self.shutdown_by(StopCause::Api)
    }

    pub(crate) fn shutdown_by(&self, by: StopCause) {
        match self.inner.lifecycle.step(Step::Stop(by)) {
            Ok((_, Phase::Deciding { .. })) => self.stopping(),
            // Committing: the stop waits for the commit's outcome (it applies if the commit fails).
            Ok(_) => tracing::info!(
                "stop requested during the handover; it applies if the handover fails"
            ),
            // Finishing already, or a stop is already pending.
            Err(_) => {}
        }
    }

    /// The bookkeeping of a decided stop, then its publication.
    pub(super) fn stopping(&self) {
        tracing::info!("stop requested; no longer accepting");
        self.tell_predecessor_stopping();
        self.inner
            .manager
            .stopping("stopping: no longer accepting, draining");
        self.publish();
    }

    /// Makes the decided finish visible: accept loops end, waiters wake. The deciding thread calls it last.
    pub(super) fn publish(&self) {
        if let Err(r) = self.inner.lifecycle.step(Step::Publish) {
            tracing::debug!(refused = %r, "publish: nothing decided");
        }
    }

    /// ```no_run
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// loop {
    ///     match upgrader.wait_event() {
    ///         exuvia::Event::UpgradeFailed(why) => eprintln!("alert: upgrade failed: {why}"),
    ///         exuvia::Event::Finishing(f) => break eprintln!("finishing: {f:?}"),
    ///         _ => {}
    ///     }
    /// }
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    /// Blocks until the next event: an upgrade that fails after this call (this process serves on), or this
    /// process finishing. Lets a service log or alert on failed upgrades, and learn why it is finishing, in one
    /// loop.
    pub fn wait_event(&self) -> Event {
        self.wait_event_after(self.failures_so_far())
    }

    /// How many upgrades have failed so far (the starting point of [`wait_event_after`](Self::wait_event_after)).
    pub(crate) fn failures_so_far(&self) -> u64 {
        self.inner.lifecycle.read(|c| c.attempts.failures)
    }

    /// [`wait_event`](Self::wait_event) counting failed upgrades from `seen` on (the async layer's `next_event`
    /// takes `seen` when it is called and waits on the lifecycle's notification instead).
    pub(crate) fn wait_event_after(&self, seen: u64) -> Event {
        self.inner
            .lifecycle
            .wait(None, |c| event_after(c, seen))
            .expect("an unbounded wait returns only with a value")
    }

    /// The event [`wait_event_after`](Self::wait_event_after) would return now, if any.
    #[cfg(feature = "tokio")]
    pub(crate) fn current_event_after(&self, seen: u64) -> Option<Event> {
        self.inner.lifecycle.read(|c| event_after(c, seen))
    }

    /// Whether this process should let its connections go now: true while a new process serves on probation
    /// (see [`Builder::probation`](crate::Builder::probation)) and once this process is finishing; a rollback
    /// makes it false again. Never blocks, takes no lock: ask it on every response to decide on
    /// `Connection: close` (the HTTP layer does).
    pub fn closing(&self) -> bool {
        self.inner.lifecycle.closing()
    }

    /// Whether this process is finishing, and why. Never blocks, takes no lock (it is meant for every
    /// request). On probation this is still `None`: the finish is decided when the window ends.
    pub fn finishing(&self) -> Option<Finish> {
        self.inner.lifecycle.finishing()
    }

    /// ```no_run
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// match upgrader.wait() {
    ///     exuvia::Finish::Upgraded { child_pid } => eprintln!("handed over to {child_pid}"),
    ///     other => eprintln!("{other:?}"),
    /// }
    /// let report = upgrader.drain();
    /// eprintln!("drained {}, left {}", report.drained, report.left);
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    /// Blocks until this process is finishing, and says why.
    pub fn wait(&self) -> Finish {
        self.finishing_handle().wait()
    }

    /// ```no_run
    /// use std::os::fd::AsRawFd;
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// # let udp = upgrader.bind_udp("dns", "127.0.0.1:5353")?;
    /// let mut fds = [
    ///     libc::pollfd { fd: udp.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ///     libc::pollfd { fd: upgrader.finishing_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
    /// ];
    /// // poll(2) both; stop receiving once fds[1] is readable.
    /// # let _ = &mut fds;
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    /// A descriptor that turns readable (end of file) once this process is finishing, for custom loops that
    /// `poll` (a UDP receive loop, say) and should end like [`Incoming`](crate::Incoming) does.
    pub fn finishing_fd(&self) -> BorrowedFd<'_> {
        self.inner.lifecycle.finishing_fd()
    }

    /// Counts a connection as in flight until the guard drops. [`drain`](Self::drain) waits for all guards.
    pub fn track(&self) -> ConnectionGuard {
        self.inner.tracker.guard()
    }

    /// Connections currently tracked.
    pub fn in_flight(&self) -> usize {
        self.inner.tracker.open()
    }

    /// Waits up to the drain timeout for tracked connections to finish, logs and returns the outcome.
    /// Call it once this process is finishing, then exit.
    pub fn drain(&self) -> DrainReport {
        // Stopped while an upgrade was in flight: its thread is killing the new process (and everything that
        // started); let it finish, so that no process outlives this one.
        self.wait_for_upgrade_to_end(Duration::from_secs(10));
        let open = self.inner.tracker.open();
        tracing::info!(connections = open, timeout = ?self.inner.drain_timeout, "draining");
        // Once handed over, this process is no longer the main one and its status would be dropped (or, with
        // NotifyAccess=all, overwrite the new process's): report only when stopping.
        if matches!(self.finishing(), Some(Finish::Stopped { .. })) {
            self.inner
                .manager
                .status(&format!("stopping: draining {open} connections"));
        }
        let report = self.inner.tracker.drain(self.inner.drain_timeout);
        if report.left > 0 {
            tracing::warn!(
                drained = report.drained,
                left = report.left,
                took_ms = report.took.as_millis() as u64,
                "drain finished at its deadline with connections still open; they end with this process \
                 (raise the drain timeout if they were busy)"
            );
        } else {
            tracing::info!(
                drained = report.drained,
                left = report.left,
                took_ms = report.took.as_millis() as u64,
                "drain finished; exiting"
            );
        }
        report
    }

    /// Waits (at most `timeout`) until no upgrade is in flight.
    fn wait_for_upgrade_to_end(&self, timeout: Duration) {
        let ended = self.inner.lifecycle.wait(Some(timeout), |c| {
            (!c.phase.upgrade_running()).then_some(())
        });
        if ended.is_none() {
            tracing::warn!("an upgrade is still in flight after {timeout:?}; draining anyway");
        }
    }
}

/// The event a waiter that has seen `seen` failures gets now, if any: the finish first.
fn event_after(c: &Core, seen: u64) -> Option<Event> {
    if let Some(f) = c.phase.published() {
        return Some(Event::Finishing(f));
    }
    (c.attempts.failures > seen).then(|| {
        let why = match &c.attempts.last {
            Some((_, Err(e))) => e.clone(),
            _ => "upgrade failed".to_string(),
        };
        if c.attempts.last_rolled_back {
            Event::RolledBack(why)
        } else {
            Event::UpgradeFailed(why)
        }
    })
}

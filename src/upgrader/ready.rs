//! Reporting ready: to the old process (which then commits the handover) or to systemd, and what starts with
//! it (the watchdog, the control socket, a SIGHUP deferred until now). Reporting a failed start.

use std::os::fd::AsFd;
use std::time::Duration;

use super::{lock, Upgrader};
use crate::error::Result;
use crate::handover::channel::{Also, Channel, Event};
use crate::handover::protocol::Message;
use crate::lifecycle::{Finish, Step};
use crate::sys;

/// How long a new process waits for the old one to confirm the handover after reporting ready.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

impl Upgrader {
    /// Reports that this process has initialised and can serve. In a process started by an upgrade this tells
    /// the old process, then waits until it confirms (it hands over and starts draining). Elsewhere it does
    /// nothing but record the fact. Calling it again does nothing.
    ///
    /// Start accepting *after* this returns. Until then the old process accepts, and connections that arrive
    /// meanwhile wait in the shared kernel queue, so none is refused; a process that accepted before its
    /// handover was confirmed would take those connections down with it if it then failed.
    ///
    /// # Errors
    /// [`ErrorKind::Channel`](crate::ErrorKind::Channel) when the old process cannot be reached or does not
    /// confirm in time: it has given up on this upgrade (and will kill this process); exit.
    pub fn ready(&self) -> Result<()> {
        // Whether ready() was called is part of the lifecycle's record (the phase says whether it completed).
        if self
            .inner
            .lifecycle
            .record(|_, a| std::mem::replace(&mut a.ready_called, true))
        {
            return Ok(());
        }
        let link = lock(&self.inner.parent).take();
        if let Some(link) = link {
            tracing::info!(
                parent_pid = link.parent_pid,
                "reporting ready to the old process"
            );
            // After an upgrade the old process tells systemd (MAINPID, READY) before it confirms: nothing to
            // send here. A taker is its own unit's main process: it says READY=1 itself once committed (after
            // its probation window, with one: a failed takeover must fail the start of its unit).
            let parent_pid = link.parent_pid;
            let took_over = link.came == crate::handover::Came::TookOver;
            // On failure the old process has given up on this one, which should exit: ready() is not retried.
            let kept = link.ready(COMMIT_TIMEOUT, self.inner.own_probation.is_some())?;
            if let Some(window) = self.inner.own_probation {
                let _ = self
                    .inner
                    .own_probation_ends
                    .set(std::time::Instant::now() + window);
            }
            tracing::info!(
                generation = self.inner.generation,
                "handover confirmed; this process is now the main one"
            );
            match kept {
                Some(channel) => self.watch_predecessor(channel, parent_pid, took_over),
                None if took_over => self.ready_after_takeover(parent_pid),
                None => {}
            }
            if !took_over {
                self.status_once_gone(parent_pid);
            }
        } else {
            self.inner.manager.ready(&format!(
                "serving (pid {}, generation {})",
                std::process::id(),
                self.inner.generation
            ));
        }
        // A stopped process stays finishing (the step leaves it as it is); a SIGHUP deferred until now runs.
        let _ = self.inner.lifecycle.step(Step::Ready);
        self.start_watchdog();
        // Taken out first: the guard must not live through the spawn of the control thread.
        let control = lock(&self.inner.control).take();
        if let Some(l) = control {
            self.serve_control(l);
        }
        self.run_deferred_sighup();
        Ok(())
    }

    /// On probation: keeps a sender for the stop's bookkeeping ([`tell_predecessor_stopping`]) and listens on
    /// a thread for the end of the window (`Passed`, or the old process gone). Until then this process
    /// refuses upgrades of its own.
    ///
    /// [`tell_predecessor_stopping`]: Self::tell_predecessor_stopping
    /// A taker's `READY=1` to its own service manager: the takeover is done.
    fn ready_after_takeover(&self, parent_pid: u32) {
        self.inner.manager.ready(&format!(
            "serving (pid {}, generation {}); took over from pid {parent_pid}",
            std::process::id(),
            self.inner.generation
        ));
    }

    fn watch_predecessor(&self, mut channel: Channel, parent_pid: u32, took_over: bool) {
        let sender = match channel.duplicate() {
            Ok(c) => c,
            Err(e) => {
                // Without it a stop of this process would read as a crash to the old one: say so loudly.
                tracing::error!(error = %e, "cannot keep the channel to the old process; a stop during the probation window will be taken for a crash");
                return;
            }
        };
        *lock(&self.inner.predecessor) = Some(sender);
        self.inner
            .lifecycle
            .record(|_, a| a.on_probation_under = Some(parent_pid));
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("exuvia-probation".into())
            .spawn(move || {
                let why = loop {
                    match channel.recv(None, Also::NOTHING) {
                        Ok(Event::Message(Message::Passed)) => break "its probation window passed",
                        Ok(Event::Closed) => break "the old process is gone",
                        // The old process took the service back (this process stopped accepting) and could
                        // not kill it (another PID namespace): it goes.
                        Ok(Event::Message(Message::Failed(why))) if took_over => {
                            crate::handover::child::end_this_process(
                                crate::handover::Came::TookOver,
                                parent_pid,
                                "during this process's probation window",
                                Some(&why),
                            )
                        }
                        Ok(Event::Message(m)) => {
                            tracing::debug!(
                                message = m.name(),
                                "unexpected message from the old process; ignored"
                            )
                        }
                        Ok(Event::Timeout | Event::Ended | Event::Stop) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "the channel to the old process failed");
                            break "the channel to the old process failed";
                        }
                    }
                };
                // Wakes whoever waits for the window's end (a reload helper's verdict).
                me.inner
                    .lifecycle
                    .record(|_, a| a.on_probation_under = None);
                let sender = lock(&me.inner.predecessor).take();
                drop(sender); // closed outside the lock
                if took_over && me.finishing().is_none() {
                    me.ready_after_takeover(parent_pid);
                }
                tracing::info!(
                    parent_pid,
                    "{why}: this process is on its own, and may upgrade"
                );
            });
        if let Err(e) = spawned {
            // Nobody would ever clear the flag: rather allow upgrades than refuse them for good.
            tracing::warn!(error = %e, "cannot start the thread that listens to the old process");
            self.inner
                .lifecycle
                .record(|_, a| a.on_probation_under = None);
        }
    }

    /// The old process, while it watches this one through its probation window.
    pub(super) fn predecessor_pid(&self) -> Option<u32> {
        self.inner.lifecycle.read(|c| c.attempts.on_probation_under)
    }

    /// The stop's bookkeeping, on probation: tells the old process that this process is stopping, before the
    /// finish is published and so before this process can exit (its exit is then not taken for a crash).
    pub(super) fn tell_predecessor_stopping(&self) {
        // The sender is there exactly while the old process watches (the listening thread drops it when the
        // window passes or the old process is gone).
        let sender = lock(&self.inner.predecessor).take();
        let Some(mut sender) = sender else { return };
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        match sender.send(&Message::Stopping, deadline) {
            Ok(()) => tracing::info!(
                "told the old process, which watches this one on probation, that this is a stop"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell the old process that this is a stop; it may take this exit for a crash")
            }
        }
    }

    /// The old process said "pid P draining" in `STATUS=` at the handover: say what is true once it has exited.
    fn status_once_gone(&self, old_pid: u32) {
        if !self.inner.manager.enabled() {
            return;
        }
        let Ok(pidfd) = sys::pidfd_open(old_pid) else {
            return; // gone already, or not ours to watch: the status names only this process then
        };
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("exuvia-old-watch".into())
            .spawn(move || {
                let mut set = sys::PollSet::new();
                set.readable(pidfd.as_fd());
                if set.wait(None).unwrap_or(false) && me.finishing().is_none() {
                    me.inner.manager.status(&format!(
                        "serving (pid {}, generation {})",
                        std::process::id(),
                        me.inner.generation
                    ));
                }
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "cannot watch the old process for the status line");
        }
    }

    /// Feeds the systemd watchdog every half interval while this process is the main one.
    fn start_watchdog(&self) {
        let Some(interval) = self.inner.manager.watchdog() else {
            return;
        };
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("exuvia-watchdog".into())
            .spawn(move || {
                me.inner.manager.ping();
                // After a handover the new process feeds it; a stopping process feeds it until it exits.
                while me
                    .inner
                    .lifecycle
                    .wait(Some(interval / 2), |c| {
                        matches!(c.phase.decided(), Some(Finish::Upgraded { .. })).then_some(())
                    })
                    .is_none()
                {
                    me.inner.manager.ping();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the watchdog thread; systemd may kill this service");
        }
    }

    /// ```no_run
    /// # fn load_config() -> Result<(), String> { Ok(()) }
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// if let Err(reason) = load_config() {
    ///     upgrader.fail(&format!("bad configuration: {reason}"))?;
    ///     std::process::exit(1);
    /// }
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    /// Reports that initialisation failed, with a reason the old process logs and returns from its
    /// [`upgrade`](Self::upgrade). The old process keeps serving; this one should exit.
    pub fn fail(&self, reason: &str) -> Result<()> {
        // Taken out first: the guard must not live through the send (up to 5 s).
        let link = lock(&self.inner.parent).take();
        if let Some(link) = link {
            link.fail(reason)?;
        }
        Ok(())
    }
}

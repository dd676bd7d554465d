//! Signals: SIGHUP upgrades (on a thread of its own, one at a time), SIGTERM and SIGINT stop. Each SIGHUP is
//! recorded with its own verdict for the reload helper; one that arrives before this process is ready is
//! deferred until it is.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use super::Upgrader;
use crate::control::Reply;
use crate::error::{Error, ErrorKind, Result};
use crate::lifecycle::StopCause;
use crate::sys;

impl Upgrader {
    /// ```no_run
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// upgrader.handle_signals()?; // before ready(): a SIGHUP must never find the process without it
    /// upgrader.ready()?;
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    /// Handles the conventional signals on a thread of its own: SIGHUP upgrades (a SIGHUP during an upgrade is
    /// refused and logged, never queued), SIGTERM and SIGINT [`shutdown`](Self::shutdown). Works whenever it is
    /// called, whatever threads exist.
    ///
    /// # Errors
    /// [`ErrorKind::AlreadyInstalled`] if signal handling was already installed in this process;
    /// [`ErrorKind::Io`] if the handler cannot be installed or its thread cannot start.
    pub fn handle_signals(&self) -> Result<JoinHandle<()>> {
        if self.inner.signals.swap(true, Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::AlreadyInstalled,
                "signal handling is already installed for this upgrader (call handle_signals once)",
            ));
        }
        let pipe = sys::signal_pipe(&[libc::SIGHUP, libc::SIGTERM, libc::SIGINT]).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::AlreadyExists {
                ErrorKind::AlreadyInstalled
            } else {
                ErrorKind::Io
            };
            Error::with_io(kind, "cannot install signal handlers", e)
        })?;
        self.watch_sighup();
        let me = self.clone();
        std::thread::Builder::new()
            .name("exuvia-signals".into())
            .spawn(move || me.signal_loop(pipe))
            .map_err(|e| Error::io("cannot start the signal thread", e))
    }

    /// Notes when each SIGHUP is caught, for the reload helper's verdict (see `control::verdict`).
    pub(crate) fn watch_sighup(&self) {
        if let Err(e) = sys::watch_sighup() {
            tracing::warn!(error = %e, "cannot note when SIGHUPs arrive; a reload right after another may be answered by the upgrade before it");
        }
    }

    fn signal_loop(self, pipe: OwnedFd) {
        let mut buf = [0u8; 64];
        loop {
            let n = match sys::read(pipe.as_fd(), &mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "signal pipe failed; signals are no longer handled");
                    return;
                }
            };
            for &sig in &buf[..n] {
                match sig as libc::c_int {
                    libc::SIGHUP => self.upgrade_on_a_thread(),
                    libc::SIGTERM | libc::SIGINT => self.stop_signal_received(sig as i32),
                    _ => {}
                }
            }
        }
    }

    /// Handles a SIGHUP: the upgrade runs on a thread of its own, so that signals arriving meanwhile are seen
    /// (and refused) at once rather than queued behind it. If the OS refuses the thread (a process or thread
    /// limit, `TasksMax=`), that is a failed upgrade like any other: logged, reported to systemd and to the
    /// reload helper, and this process keeps serving and handling signals.
    pub(crate) fn upgrade_on_a_thread(&self) {
        let id = self.sighup_received();
        let me = self.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("exuvia-upgrade".into())
            .spawn(move || me.upgrade_for_sighup(id))
        {
            let why = self.upgrade_could_not_start(&e);
            self.settle_sighup(id, Reply::Failed(why));
        }
    }

    /// Records an upgrade that could not even start a thread; returns why.
    fn upgrade_could_not_start(&self, e: &std::io::Error) -> String {
        let why = format!(
            "cannot start a thread for the upgrade (process or thread limit reached, e.g. TasksMax=): {e}"
        );
        tracing::error!("{why}; this process keeps serving");
        self.inner.manager.failed(&format!(
            "upgrade failed: {why}; still serving (pid {}, generation {})",
            std::process::id(),
            self.inner.generation
        ));
        let now = sys::monotonic_usec();
        self.inner.lifecycle.record(|_, a| {
            a.ended(now, Err(why.clone()));
            a.sighup_handled += 1;
        });
        why
    }

    /// Records a SIGHUP; returns its id for [`upgrade_for_sighup`](Self::upgrade_for_sighup), whose upgrade
    /// counts it as handled once it has started or been refused (the reload helper waits for that).
    fn sighup_received(&self) -> u64 {
        tracing::info!("SIGHUP received");
        let now = sys::monotonic_usec();
        // Read before the record is made: every SIGHUP caught so far is this one or an earlier one.
        let caught = sys::sighups_caught();
        self.inner.lifecycle.record(|_, a| a.sighup(now, caught))
    }

    /// Runs the upgrade SIGHUP `id` asked for and records its verdict. A SIGHUP that arrives before this
    /// process is ready (a new process not yet committed, say: with `systemctl reload` the signal goes to
    /// whatever systemd has as the main process) is not refused but deferred: `ready()` runs it. The check
    /// and the deferral happen under the lifecycle's lock, as does `ready()`'s step, so none is lost.
    fn upgrade_for_sighup(&self, id: u64) {
        let deferred = self.inner.lifecycle.record(|state, a| {
            if state.is_starting() && a.deferred.is_none() {
                a.deferred = Some(id);
                a.sighup_handled += 1;
                true
            } else {
                false
            }
        });
        if deferred {
            tracing::info!("SIGHUP before this process is ready: the upgrade runs once it is");
            return;
        }
        let me = self.clone();
        let result = self.upgrade_then(move || me.sighup_handled());
        let verdict = match &result {
            Ok(r) => Reply::Ok(format!("upgraded to pid {}", r.child_pid)),
            Err(e) => self.verdict_reply(e),
        };
        self.settle_sighup(id, verdict);
        if let Err(e) = result {
            tracing::warn!(error = %e, "upgrade on SIGHUP did not happen");
        }
    }

    /// What a failed upgrade's verdict says to the reload helper: [`Reply::Stopping`] when a stop of this
    /// process is what ended it.
    pub(super) fn verdict_reply(&self, e: &Error) -> Reply {
        let stopping = e.kind() == ErrorKind::Finishing
            && matches!(
                self.inner.lifecycle.phase().decided(),
                Some(crate::Finish::Stopped { .. })
            );
        if stopping {
            Reply::Stopping(e.to_string())
        } else {
            Reply::Failed(e.to_string())
        }
    }

    /// Records the verdict of SIGHUP `id`.
    fn settle_sighup(&self, id: u64, verdict: Reply) {
        self.inner.lifecycle.record(|_, a| a.settle(id, verdict));
    }

    /// After `ready`: runs the upgrade a SIGHUP asked for while this process was not ready yet.
    pub(super) fn run_deferred_sighup(&self) {
        let Some(id) = self.inner.lifecycle.record(|_, a| a.deferred.take()) else {
            return;
        };
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("exuvia-upgrade".into())
            .spawn(move || me.upgrade_for_sighup(id));
        if let Err(e) = spawned {
            self.settle_sighup(
                id,
                Reply::Failed(format!("cannot start a thread for the upgrade: {e}")),
            );
        }
    }

    pub(crate) fn stop_signal_received(&self, sig: i32) {
        tracing::info!(signal = %crate::error::signal_name(sig), "stop signal received");
        self.shutdown_by(StopCause::Signal(sig));
    }

    /// Counts a SIGHUP as acted upon (its upgrade started, was refused or deferred).
    fn sighup_handled(&self) {
        self.inner.lifecycle.record(|_, a| a.sighup_handled += 1);
    }
}

//! One upgrade, as named steps: [`begin`](Upgrader::begin) (one at a time, only while serving),
//! [`start_child`](Upgrader::start_child) (fork/exec with every socket), [`await_ready`](Upgrader::await_ready),
//! [`commit`](Upgrader::commit) (systemd first, then the new process; no lock held) and
//! [`conclude`](Upgrader::conclude) (publish the handover, or report the failure and serve on).

use std::time::{Duration, Instant};

use std::os::unix::net::UnixStream;

use super::{micros, Upgrader};
use crate::error::{Error, ErrorKind, Result};
use crate::handover::parent::{self, Came, CommittedChild, PendingChild, Watched};
use crate::handover::probation::QueueWatch;
use crate::handover::protocol::Message;
use crate::handover::takeover;
use crate::lifecycle::{Phase, Refused, Step, StopCause};
use crate::sys;

/// What a successful upgrade did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpgradeReport {
    /// The new main process.
    pub child_pid: u32,
    /// From the upgrade request to the commit.
    pub took: Duration,
    /// From the upgrade request to the new process's ready report.
    pub ready_after: Duration,
    /// The new process's own initialisation, as it reported it: from reading the old process's greeting
    /// (inside its [`Builder::build`](crate::Builder::build)) to its [`Upgrader::ready`] call.
    pub child_init: Duration,
    /// Sockets passed on.
    pub sockets: usize,
    /// The probation window the new process served through before this process finished (zero: none).
    pub probation: Duration,
}

impl UpgradeReport {
    /// What the handover itself cost: [`ready_after`](Self::ready_after) minus the new process's own
    /// [`child_init`](Self::child_init). It covers fork and exec, the new program's start-up until its
    /// `build()`, and the messages both ways; the benchmark reports it per upgrade.
    pub fn overhead(&self) -> Duration {
        self.ready_after.saturating_sub(self.child_init)
    }
}

/// The upgrade in flight.
struct Attempt {
    started: Instant,
    started_usec: u64,
    /// How far systemd's reload timeout is extended: room for the new process's initialisation, the
    /// handover and the barrier.
    extend: Duration,
}

/// Where the new process comes from.
#[derive(Debug, Clone, Copy)]
enum Start<'a> {
    /// This process starts the program on disk (an upgrade).
    Spawn,
    /// The process at the other end of `conn` asked for the service (a takeover).
    Taker {
        conn: &'a UnixStream,
        taker: takeover::Taker,
    },
}

/// What the steps up to the commit produced.
struct Committed {
    child_pid: u32,
    came: Came,
    sockets: usize,
    ready_after: Duration,
    child_init: Duration,
}

/// The generation after `g`. It comes from the old process's greeting (or a forged environment): `u32::MAX`
/// must not wrap to 0, which reads as "fresh start" everywhere.
fn next_generation(g: u32) -> Result<u32> {
    g.checked_add(1).ok_or_else(|| {
        Error::new(
            ErrorKind::Protocol,
            format!(
                "this process is generation {g}, the last one there can be; restart the service to count from 0 \
                 again"
            ),
        )
    })
}

fn start_came(start: Start<'_>) -> Came {
    match start {
        Start::Spawn => Came::Spawned,
        Start::Taker { .. } => Came::TookOver,
    }
}

/// Error for a step the lifecycle refused.
pub(super) fn refused(r: Refused) -> Error {
    let kind = match r {
        Refused::UpgradeInProgress | Refused::OnProbation { .. } => ErrorKind::UpgradeInProgress,
        Refused::NotReady => ErrorKind::NotReady,
        _ => ErrorKind::Finishing,
    };
    Error::new(kind, r.to_string())
}

impl Upgrader {
    /// Replaces this process: starts the program on disk with every socket, waits for it to report ready, then
    /// marks this process as finishing ([`Finish::Upgraded`](crate::Finish::Upgraded)): accept loops end, and the application should
    /// [`drain`](Self::drain) and exit.
    ///
    /// ```no_run
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// match upgrader.upgrade() {
    ///     Ok(report) => eprintln!("pid {} serves now ({:?})", report.child_pid, report.took),
    ///     Err(e) if e.kind() == exuvia::ErrorKind::UpgradeInProgress => eprintln!("one at a time"),
    ///     Err(e) => eprintln!("upgrade failed, still serving: {e}"),
    /// }
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    ///
    /// Blocks until the new process is ready or has failed. On failure the new process is killed and reaped,
    /// and this process keeps serving as if nothing happened.
    ///
    /// # Errors
    /// [`ErrorKind::UpgradeInProgress`] if another upgrade is running; [`ErrorKind::Finishing`] if this process
    /// already handed over or is stopping; [`ErrorKind::NotReady`] if it has not reported ready itself; [`ErrorKind::Spawn`],
    /// [`ErrorKind::ChildExited`], [`ErrorKind::ChildFailed`], [`ErrorKind::ReadyTimeout`],
    /// [`ErrorKind::Protocol`], [`ErrorKind::Channel`] when the new process does not come up.
    pub fn upgrade(&self) -> Result<UpgradeReport> {
        self.upgrade_then(|| {})
    }

    /// [`upgrade`](Self::upgrade), calling `started` once the attempt has begun or been refused.
    pub(super) fn upgrade_then(&self, started: impl FnOnce()) -> Result<UpgradeReport> {
        let begun = self.begin();
        started();
        let attempt = begun?;
        let result = self.run(&attempt, Start::Spawn);
        self.conclude(&attempt, result)
    }

    /// Hands the service to `taker` at the other end of `conn` (its user already checked): the takeover's
    /// sockets and channels go on `conn`, then it is an upgrade like any other, one at a time with them.
    pub(super) fn take_over_by(
        &self,
        conn: &UnixStream,
        taker: takeover::Taker,
    ) -> Result<UpgradeReport> {
        let attempt = self.begin()?;
        let result = self.run(&attempt, Start::Taker { conn, taker });
        self.conclude(&attempt, result)
    }

    /// Why an upgrade is refused on probation, with about how long the window still runs.
    fn refused_on_probation(&self) -> Error {
        let left = self
            .inner
            .own_probation_ends
            .get()
            .map(|end| end.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        Error::new(
            ErrorKind::UpgradeInProgress,
            format!(
                "this process is on probation: the old process can still roll back to itself for about {} ms; \
                 one upgrade at a time, so upgrade again after the window",
                left.as_millis()
            ),
        )
    }

    /// Step 1: claims the one upgrade slot (refused unless serving, or on probation) and records the attempt.
    fn begin(&self) -> Result<Attempt> {
        if let Err(r) = self.inner.lifecycle.step(Step::BeginUpgrade) {
            return Err(match r {
                Refused::UpgradeInProgress => {
                    tracing::info!("upgrade requested while one is in flight; refused");
                    refused(r)
                }
                Refused::OnProbation { .. } => {
                    tracing::info!(
                        "upgrade requested during this process's probation window; refused"
                    );
                    self.refused_on_probation()
                }
                r => refused(r),
            });
        }
        let started_usec = sys::monotonic_usec();
        self.inner
            .lifecycle
            .record(|_, a| a.current = Some(started_usec));
        Ok(Attempt {
            started: Instant::now(),
            started_usec,
            extend: self.inner.ready_timeout + Duration::from_secs(15),
        })
    }

    /// Steps 2 to 4.
    fn run(&self, attempt: &Attempt, start: Start<'_>) -> Result<Committed> {
        let inner = &self.inner;
        let next = next_generation(inner.generation)?;
        let (child, sockets, background) = match start {
            Start::Spawn => {
                tracing::info!(program = %inner.program.display(), generation = inner.generation, "upgrade requested");
                inner.manager.reloading(
                    &format!(
                        "upgrading: starting {} (generation {next})",
                        inner.program.display(),
                    ),
                    attempt.extend,
                );
                self.start_child(attempt, next)?
            }
            Start::Taker { conn, taker } => {
                let pid = taker.pid;
                tracing::info!(
                    taker_pid = pid,
                    same_pid_namespace = taker.visible,
                    generation = inner.generation,
                    "takeover requested"
                );
                // This unit is not reloading: another one is starting. Only the status line says so.
                inner.manager.status(&format!(
                    "pid {pid} is taking over (generation {next}); serving until it is ready"
                ));
                self.offer(attempt, next, conn, taker)?
            }
        };
        let (child, child_init) = self.await_ready(child, attempt, background)?;
        let ready_after = attempt.started.elapsed();
        tracing::info!(
            child_pid = child.pid(),
            ready_after_us = micros(ready_after),
            child_init_us = micros(child_init),
            overhead_us = micros(ready_after.saturating_sub(child_init)),
            "upgrade: child ready; handing over"
        );
        let mut child = self.commit(child)?;
        let child_pid = child.pid();
        if !inner.successor_probation.is_zero() {
            self.probation(&mut child)?;
        }
        Ok(Committed {
            child_pid,
            came: start_came(start),
            sockets,
            ready_after,
            child_init,
        })
    }

    /// Step 2 of a takeover: the sockets and both channels' far ends go to the taker on `conn`, then the
    /// greeting on the channel.
    fn offer(
        &self,
        attempt: &Attempt,
        generation: u32,
        conn: &UnixStream,
        taker: takeover::Taker,
    ) -> Result<(PendingChild, usize, bool)> {
        let inner = &self.inner;
        let state = inner.app_state.as_ref().map(|f| f()).unwrap_or_default();
        let shared = inner.registry.handover_shared();
        let set: Vec<_> = shared
            .iter()
            .map(|(name, fd)| (name.as_str(), std::os::fd::AsFd::as_fd(&**fd)))
            .collect();
        let hello = Message::Hello {
            parent_pid: std::process::id(),
            generation,
            started_usec: attempt.started_usec,
            state,
        };
        let child = takeover::offer(
            conn,
            taker,
            &set,
            inner.successor_probation,
            &hello,
            attempt.started + inner.ready_timeout,
        )?;
        Ok((child, set.len(), false))
    }

    /// Step 2: starts the program on disk with every socket (listed under the registry's lock, the spawn
    /// itself without it) and greets it with the application state.
    fn start_child(
        &self,
        attempt: &Attempt,
        generation: u32,
    ) -> Result<(PendingChild, usize, bool)> {
        let inner = &self.inner;
        let state = inner.app_state.as_ref().map(|f| f()).unwrap_or_default();
        let unclaimed = inner.registry.unclaimed();
        if !unclaimed.is_empty() {
            tracing::debug!(
                ?unclaimed,
                "passing on inherited sockets this version did not take"
            );
        }
        let shared = inner.registry.handover_shared();
        let set: Vec<_> = shared
            .iter()
            .map(|(name, fd)| (name.as_str(), std::os::fd::AsFd::as_fd(&**fd)))
            .collect();
        let launch = parent::Launch {
            program: &inner.program,
            argv: &inner.argv,
            extra_env: &inner.envs,
            generation,
            watchdog: inner.manager.watchdog().is_some(),
            started_usec: attempt.started_usec,
            background: self.background_nice(),
            probation: inner.successor_probation,
        };
        let child = parent::start(&launch, &set, state, attempt.started + inner.ready_timeout)?;
        Ok((child, set.len(), launch.background.is_some()))
    }

    /// Step 3: waits for the new process's ready report (a stop meanwhile abandons the upgrade at once).
    fn await_ready(
        &self,
        mut child: PendingChild,
        attempt: &Attempt,
        background: bool,
    ) -> Result<(PendingChild, Duration)> {
        let inner = &self.inner;
        let child_init = child.await_ready(
            inner.ready_timeout,
            Duration::from_secs(1),
            Some(inner.lifecycle.finishing_fd()),
            &mut || inner.manager.extend(attempt.extend),
        )?;
        if background {
            child.check_normal_priority()?;
        }
        Ok((child, child_init))
    }

    /// Step 4: nobody may finish this process between the new one's ready and the commit, so the lifecycle
    /// enters `Committing`; then, with no lock held, systemd is told (`MAINPID=` + `READY=1`, while this process
    /// still accepts), the new process confirmed (it serves from then on), and the sd_notify barrier awaited
    /// before this process stops accepting: systemd must know the new main process before this one may exit.
    /// The barrier can take seconds and nobody reading the lifecycle waits for it.
    fn commit(&self, child: PendingChild) -> Result<CommittedChild> {
        let inner = &self.inner;
        if let Err(r) = inner.lifecycle.step(Step::Commit) {
            child.abort("the old process is stopping: the service stops, nothing to take over");
            return Err(refused(r));
        }
        if child.has_exited() {
            drop(child);
            return Err(Error::new(
                ErrorKind::ChildExited,
                "child exited right after reporting ready",
            ));
        }
        let pid = child.pid();
        let came = child.came();
        let now = sys::monotonic_usec();
        inner
            .lifecycle
            .record(|_, a| a.handed_over_usec = Some(now));
        match came {
            Came::Spawned => inner.manager.announce_main(
                pid,
                &format!(
                    "serving (pid {pid}, generation {}); pid {} draining",
                    inner.generation.saturating_add(1),
                    std::process::id()
                ),
            ),
            // The taker is another unit's main process (or nobody's): it tells its own manager itself.
            Came::TookOver => inner.manager.status(&format!(
                "pid {pid} took over (generation {}); this process lets go",
                inner.generation.saturating_add(1)
            )),
        }
        // The new process serves from its Commit on, without waiting for systemd: its own notifications
        // queue behind MAINPID on the notification socket. This process waits for systemd (the barrier)
        // after the Commit and before it stops accepting: both serve meanwhile, from the same sockets.
        let mut child = child.commit()?;
        let child_pid = child.pid();
        // Before this process lets its connections go: whether they move or drain is decided from here on.
        self.watch_successor(child.take_moves());
        let step = if inner.successor_probation.is_zero() {
            Step::Committed { child_pid }
        } else {
            Step::CommittedOnProbation { child_pid }
        };
        let (before, _) = inner.lifecycle.step(step).map_err(refused)?;
        if matches!(before, Phase::Committing { stop: Some(_) }) {
            tracing::info!(
                "stop requested during the handover; this process hands over and drains"
            );
        }
        if came == Came::Spawned {
            inner.manager.confirm_main();
        }
        Ok(child)
    }

    /// Step 4b, with a probation window: this process has stopped accepting (the gate is shut) and lets its
    /// connections go, but keeps the sockets and watches the new process until the window ends. If the new
    /// process dies first, for whatever reason it did not announce as a stop, or stops accepting, this process
    /// takes the service back; a stop meanwhile, reaching either process, stops both.
    fn probation(&self, child: &mut CommittedChild) -> Result<()> {
        let inner = &self.inner;
        let window = inner.successor_probation;
        let started = Instant::now();
        let child_pid = child.pid();
        tracing::info!(
            child_pid,
            window_ms = window.as_millis() as u64,
            "upgrade: the new process serves on probation; this process stands by with the sockets"
        );
        let sockets: Vec<_> = inner
            .registry
            .handover_shared()
            .into_iter()
            .filter(|(name, _)| name != crate::control::REGISTRY_NAME)
            .collect();
        let mut queues = QueueWatch::new(sockets, inner.probation_stall);
        let why = match child.watch(started + window, inner.lifecycle.finishing_fd(), &mut queues) {
            Watched::Passed => {
                return match inner.lifecycle.step(Step::ProbationPassed) {
                    Ok(_) => {
                        tracing::info!(child_pid, "upgrade: probation passed");
                        Ok(())
                    }
                    Err(r) => {
                        // A stop came as the window ended: it stops both.
                        child.terminate();
                        Err(refused(r))
                    }
                }
            }
            Watched::Stopped if child.came() == Came::TookOver => {
                // The taker is a service of its own: this one's stop leaves it serving, as if the window had
                // passed.
                child.pass();
                tracing::info!(
                    child_pid,
                    "stop during the probation of the process that took over: it serves on"
                );
                return Err(Error::new(
                    ErrorKind::Finishing,
                    format!("stopped during the probation of pid {child_pid}, which took over and serves on"),
                ));
            }
            Watched::Stopped => {
                tracing::info!(
                    child_pid,
                    "stop during the probation: asking the new process to stop too"
                );
                child.terminate();
                return Err(Error::new(
                    ErrorKind::Finishing,
                    format!("stopped during the probation of pid {child_pid}, which was asked to stop too"),
                ));
            }
            Watched::SuccessorStopping if child.came() == Came::TookOver => format!(
                "rolled back: the process that took over (pid {child_pid}) was stopped {} ms into its {} ms \
                 probation",
                started.elapsed().as_millis(),
                window.as_millis()
            ),
            Watched::SuccessorStopping => {
                // The new process said, before it could exit, that a stop reached it (a stop request on the
                // shared control socket, or a SIGTERM): a stop of the service, not a crash to roll back.
                tracing::info!(
                    child_pid,
                    "the new process is stopping during its probation (a stop reached it): stopping this one too"
                );
                self.shutdown_by(StopCause::Successor);
                return Err(Error::new(
                    ErrorKind::Finishing,
                    format!("pid {child_pid} was stopped during its probation; this process stops too"),
                ));
            }
            Watched::Crashed { how } => format!(
                "rolled back: the new process (pid {child_pid}) {how} {} ms into its {} ms probation",
                started.elapsed().as_millis(),
                window.as_millis()
            ),
            Watched::Stalled(s) => format!(
                "rolled back: the new process (pid {child_pid}) stopped accepting: {} connection(s) waited on \
                 '{}' for {} ms with none accepted, {} ms into its {} ms probation; it was killed",
                s.queued,
                s.name,
                s.held.as_millis(),
                started.elapsed().as_millis(),
                window.as_millis()
            ),
        };
        self.roll_back(child_pid, why)
    }

    /// Takes the service back after the new process (`child_pid`) ended or stalled on probation, for `why`.
    fn roll_back(&self, child_pid: u32, why: String) -> Result<()> {
        let inner = &self.inner;
        match inner.lifecycle.step(Step::RolledBack) {
            Ok(_) => {
                // The handover is undone: signals for this service come here again, so a reload helper's
                // question about the SIGHUP that started this upgrade is answered here.
                inner.lifecycle.record(|_, a| a.handed_over_usec = None);
                // Nothing moves to a process that is gone.
                self.watch_successor(None);
                // The gate is open again: the accept loops take the queued connections now.
                tracing::error!(child_pid, "{why}; this process serves again");
                inner.manager.take_back(&format!(
                    "{why}; serving again (pid {}, generation {})",
                    std::process::id(),
                    inner.generation
                ));
                Err(Error::new(ErrorKind::RolledBack, why))
            }
            // A stop came first: nothing to take back.
            Err(r) => Err(refused(r)),
        }
    }

    /// Step 5: records the verdict; after a handover, closes this process's sockets and publishes the finish
    /// (last: once published, the application may exit at any moment); after a failure, ends the upgrade in
    /// the lifecycle (a stop that waited for the commit applies now) and serves on.
    fn conclude(&self, attempt: &Attempt, result: Result<Committed>) -> Result<UpgradeReport> {
        let inner = &self.inner;
        let verdict = result
            .as_ref()
            .map(|c| c.child_pid)
            .map_err(|e| e.to_string());
        let rolled_back = matches!(&result, Err(e) if e.kind() == ErrorKind::RolledBack);
        inner.lifecycle.record(|_, a| match verdict {
            Err(why) if rolled_back => a.rolled_back(attempt.started_usec, why),
            verdict => a.ended(attempt.started_usec, verdict),
        });
        match result {
            Ok(c) => {
                let closed = inner.registry.close_all();
                tracing::info!(
                    child_pid = c.child_pid,
                    closed,
                    took_us = micros(attempt.started.elapsed()),
                    "upgrade: handed over; stopped accepting, draining"
                );
                if c.came == Came::TookOver {
                    // This unit ends: its process exits on its own once drained (STOPPING=1 first, so that
                    // systemd does not take the exit for a crash, nor run ExecStop= against the control
                    // socket, which the new process serves now).
                    inner
                        .manager
                        .stopping(&format!("pid {} took over; draining", c.child_pid));
                }
                self.publish();
                Ok(UpgradeReport {
                    child_pid: c.child_pid,
                    took: attempt.started.elapsed(),
                    ready_after: c.ready_after,
                    child_init: c.child_init,
                    sockets: c.sockets,
                    probation: inner.successor_probation,
                })
            }
            Err(e) => {
                // Before the upgrade ends in the lifecycle: a stop's drain waits for that, then may exit.
                tracing::info!(error = %e, "upgrade failed; this process keeps serving");
                let ended = inner.lifecycle.step(Step::UpgradeEnded);
                if let Ok((Phase::Committing { .. }, Phase::Deciding { .. })) = ended {
                    // The stop that arrived during the commit applies now that there is no handover.
                    self.stopping();
                }
                if !rolled_back {
                    // (A rollback told systemd itself, with MAINPID= back to this process.)
                    inner.manager.failed(&format!(
                        "upgrade failed: {e}; still serving (pid {}, generation {})",
                        std::process::id(),
                        inner.generation
                    ));
                }
                Err(e)
            }
        }
    }

    /// The nice value a background-initialised child returns to, or `None` (with a warning) when this process
    /// cannot offer it one.
    fn background_nice(&self) -> Option<i32> {
        if !self.inner.background_init {
            return None;
        }
        let why = match sys::scheduling() {
            Ok(sys::Scheduling {
                policy: sys::Policy::Other,
                nice,
            }) if sys::may_return_to(nice) => return Some(nice),
            Ok(sys::Scheduling {
                policy: sys::Policy::Other,
                nice,
            }) => format!(
                "the new process could not return from idle priority to nice {nice} (needs CAP_SYS_NICE, or \
                 RLIMIT_NICE of at least {}: systemd's LimitNICE={nice})",
                20 - nice
            ),
            Ok(sys::Scheduling { policy, .. }) => {
                format!("this process runs at scheduling policy {policy}, not SCHED_OTHER")
            }
            Err(e) => format!("cannot read this process's scheduling: {e}"),
        };
        tracing::warn!(
            "background initialisation skipped: {why}; the new process starts at normal priority"
        );
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Finish;

    #[test]
    fn the_last_generation_has_no_successor() {
        assert_eq!(next_generation(0).unwrap(), 1);
        assert_eq!(next_generation(u32::MAX - 1).unwrap(), u32::MAX);
        let e = next_generation(u32::MAX).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().contains("restart the service"), "{e}");
    }

    #[test]
    fn refusals_map_to_error_kinds() {
        assert_eq!(
            refused(Refused::UpgradeInProgress).kind(),
            ErrorKind::UpgradeInProgress
        );
        let e = refused(Refused::Finishing(Finish::Upgraded { child_pid: 9 }));
        assert_eq!(e.kind(), ErrorKind::Finishing);
        assert!(e.to_string().contains("pid 9"), "{e}");
        assert_eq!(refused(Refused::NotReady).kind(), ErrorKind::NotReady);
    }
}

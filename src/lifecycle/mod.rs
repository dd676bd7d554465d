//! One process's lifecycle, shared by its threads: the [`Phase`] machine and the [`Attempts`] record under one
//! lock that is never held across I/O, waiters woken from one place ([`Lifecycle::changed`]), and the
//! published finish readable without any lock.
//!
//! Readers that only need to know whether (and why) the process is finishing (accept loops, the Tokio layer,
//! the HTTP layer, the control server) hold a [`Finishing`] handle, not the whole upgrader.

mod attempts;
mod phase;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

pub(crate) use attempts::Attempts;
#[cfg(test)]
pub(crate) use attempts::Sighup;
pub use phase::{Finish, StopCause};
pub(crate) use phase::{Phase, Refused, Step};

use crate::sys;

/// What the lock guards.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) phase: Phase,
    pub(crate) attempts: Attempts,
    /// Whether accept loops take connections now, and the signal that this changed (see [`Gate`]).
    gate: Arc<Gate>,
    /// The write end of the finishing pipe, until the finish is published (then closed, outside the lock).
    stop_write: Option<OwnedFd>,
}

#[derive(Debug)]
struct Shared {
    core: Mutex<Core>,
    changed: Condvar,
    /// The same wake-ups as `changed`, for async waiters, so that none of them needs a thread of its own.
    #[cfg(feature = "tokio")]
    events: ::tokio::sync::Notify,
    /// The published finish and when it was published, read without a lock.
    published: OnceLock<(Finish, Instant)>,
    /// True while connections should be let go (on probation, once finishing): for code that checks on every
    /// request (the HTTP layer, `Upgrader::closing`). Revocable: a rollback clears it.
    flag: Arc<AtomicBool>,
    /// Readable (end of file) once the finish is published: every accept loop polls it.
    stop_read: OwnedFd,
}

/// Whether accept loops take connections (they pause on probation and resume after a rollback), with a
/// descriptor that turns readable, for good, once that changes: then the loop asks for the current gate.
#[derive(Debug)]
pub(crate) struct Gate {
    pub(crate) open: bool,
    changed_read: OwnedFd,
    /// Taken (under this small lock, which guards nothing else) and closed outside it when the gate is
    /// replaced: loops still hold the old gate, so its end cannot wait for the last `Arc` to go.
    changed_write: Mutex<Option<OwnedFd>>,
}

impl Gate {
    fn new(open: bool) -> std::io::Result<Gate> {
        let (changed_read, changed_write) = sys::pipe()?;
        Ok(Gate {
            open,
            changed_read,
            changed_write: Mutex::new(Some(changed_write)),
        })
    }

    /// Readable once this gate is replaced.
    pub(crate) fn changed_fd(&self) -> BorrowedFd<'_> {
        self.changed_read.as_fd()
    }
}

/// The shared lifecycle: cheap to clone, every clone the same.
#[derive(Debug, Clone)]
pub(crate) struct Lifecycle {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Lifecycle {
    /// A process in [`Phase::Starting`] with the given record.
    pub(crate) fn new(attempts: Attempts) -> std::io::Result<Lifecycle> {
        let (stop_read, stop_write) = sys::pipe()?;
        Ok(Lifecycle {
            shared: Arc::new(Shared {
                core: Mutex::new(Core {
                    phase: Phase::Starting,
                    attempts,
                    gate: Arc::new(Gate::new(true)?),
                    stop_write: Some(stop_write),
                }),
                changed: Condvar::new(),
                #[cfg(feature = "tokio")]
                events: ::tokio::sync::Notify::new(),
                published: OnceLock::new(),
                flag: Arc::new(AtomicBool::new(false)),
                stop_read,
            }),
        })
    }

    /// Takes `step`; returns the states before and after it, or why the current state refuses it. Publishing
    /// makes the finish visible to [`finishing`](Self::finishing) and ends every accept loop.
    pub(crate) fn step(&self, step: Step) -> Result<(Phase, Phase), Refused> {
        let mut core = lock(&self.shared.core);
        let before = core.phase;
        if let (Step::BeginUpgrade, Some(old_pid)) = (step, core.attempts.on_probation_under) {
            return Err(Refused::OnProbation { old_pid });
        }
        let after = before.next(step)?;
        core.phase = after;
        let mut closing = None;
        if let (None, Some(f)) = (before.published(), after.published()) {
            let _ = self.shared.published.set((f, Instant::now()));
            closing = core.stop_write.take();
        }
        // Revocable (a rollback clears it): let connections go on probation and once finishing.
        self.shared.flag.store(after.closing(), Ordering::Release);
        drop(core);
        // Closing the write end (outside the lock) makes the read end readable for good.
        drop(closing);
        if before.accepting() != after.accepting() {
            self.sync_gate();
        }
        self.changed();
        Ok((before, after))
    }

    /// The current phase.
    pub(crate) fn phase(&self) -> Phase {
        lock(&self.shared.core).phase
    }

    /// The current gate of the accept loops.
    pub(crate) fn gate(&self) -> Arc<Gate> {
        lock(&self.shared.core).gate.clone()
    }

    /// Makes the gate follow the state: the new gate's pipe is made with no lock held, installed under the
    /// lock only if the state still wants it (concurrent steps converge on the latest state, whatever their
    /// order), and the old gate's signal closed after the lock is released.
    fn sync_gate(&self) {
        loop {
            let want = {
                let core = lock(&self.shared.core);
                let open = core.phase.accepting();
                if core.gate.open == open {
                    return;
                }
                open
            };
            let new = match Gate::new(want) {
                Ok(g) => Arc::new(g),
                Err(e) => {
                    tracing::error!(
                        error = %e,
                        open = want,
                        "cannot signal the accept loops (no descriptor for a pipe); they keep their current mode"
                    );
                    return;
                }
            };
            let old = {
                let mut core = lock(&self.shared.core);
                if core.phase.accepting() != want || core.gate.open == want {
                    // The state moved on meanwhile, or another step installed this gate: look again (the
                    // unused gate is closed after the lock is released).
                    drop(core);
                    drop(new);
                    continue;
                }
                std::mem::replace(&mut core.gate, new)
            };
            // Wakes every loop waiting on the old gate.
            let signal = lock(&old.changed_write).take();
            drop(signal);
            return;
        }
    }

    /// Reads the state and record together.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Core) -> T) -> T {
        f(&lock(&self.shared.core))
    }

    /// Changes the record (seeing the state it is changed in), then wakes every waiter.
    pub(crate) fn record<T>(&self, f: impl FnOnce(Phase, &mut Attempts) -> T) -> T {
        let t = {
            let mut core = lock(&self.shared.core);
            let state = core.phase;
            f(state, &mut core.attempts)
        };
        self.changed();
        t
    }

    /// Waits until `f` returns something, up to `timeout` (`None`: for ever); the result of the last call.
    pub(crate) fn wait<T>(
        &self,
        timeout: Option<Duration>,
        mut f: impl FnMut(&Core) -> Option<T>,
    ) -> Option<T> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut core = lock(&self.shared.core);
        loop {
            if let Some(t) = f(&core) {
                return Some(t);
            }
            core = match deadline {
                None => self
                    .shared
                    .changed
                    .wait(core)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.shared
                        .changed
                        .wait_timeout(core, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// Wakes everyone waiting, blocking and async. Every change goes through here, after its lock is
    /// released; a waiter checks under that lock before it sleeps, so no wake-up is lost.
    fn changed(&self) {
        self.shared.changed.notify_all();
        #[cfg(feature = "tokio")]
        self.shared.events.notify_waiters();
    }

    /// The published finish, without a lock.
    pub(crate) fn finishing(&self) -> Option<Finish> {
        self.shared.published.get().map(|(f, _)| *f)
    }

    /// Readable (end of file) once the finish is published.
    pub(crate) fn finishing_fd(&self) -> BorrowedFd<'_> {
        self.shared.stop_read.as_fd()
    }

    /// When the finish was published, once it is.
    #[cfg(feature = "tokio")]
    pub(crate) fn finished_at(&self) -> Option<Instant> {
        self.shared.published.get().map(|(_, at)| *at)
    }

    /// Whether connections should be let go now (on probation, once finishing). Lock-free.
    pub(crate) fn closing(&self) -> bool {
        self.shared.flag.load(Ordering::Acquire)
    }

    /// The read-only handle for code that only waits for the finish.
    pub(crate) fn handle(&self) -> Finishing {
        Finishing {
            lifecycle: self.clone(),
        }
    }
}

/// Whether, and why, a process is finishing: the small, cloneable, read-only view of the lifecycle that accept
/// loops, the Tokio and HTTP layers and the control server hold.
#[derive(Debug, Clone)]
pub(crate) struct Finishing {
    lifecycle: Lifecycle,
}

impl Finishing {
    /// Why this process is finishing, once published. Never blocks.
    pub(crate) fn get(&self) -> Option<Finish> {
        self.lifecycle.finishing()
    }

    /// Readable (end of file) once the finish is published.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.lifecycle.finishing_fd()
    }

    /// True while this process lets its connections go (on probation, and once finishing), for checks on
    /// every request. Revocable: a rollback clears it.
    #[cfg(feature = "hyper")]
    pub(crate) fn flag(&self) -> Arc<AtomicBool> {
        self.lifecycle.shared.flag.clone()
    }

    /// The accept loops' current gate.
    pub(crate) fn gate(&self) -> Arc<Gate> {
        self.lifecycle.gate()
    }

    /// Blocks until the finish is published.
    pub(crate) fn wait(&self) -> Finish {
        self.lifecycle
            .wait(None, |c| c.phase.published())
            .expect("an unbounded wait returns only with a value")
    }

    /// Notified on every change of the lifecycle, for async waiters.
    #[cfg(feature = "tokio")]
    pub(crate) fn events(&self) -> &::tokio::sync::Notify {
        &self.lifecycle.shared.events
    }

    /// The whole lifecycle (for the control server's questions about attempts).
    pub(crate) fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishing_sets_the_flag_closes_the_pipe_and_wakes_waiters() {
        let l = Lifecycle::new(Attempts::default()).unwrap();
        let h = l.handle();
        let waiter = {
            let h = h.clone();
            std::thread::spawn(move || h.wait())
        };
        l.step(Step::Ready).unwrap();
        l.step(Step::Stop(StopCause::Api)).unwrap();
        assert_eq!(h.get(), None, "decided is not yet published");
        let mut set = sys::PollSet::new();
        let i = set.readable(h.fd());
        assert!(!set.wait(Some(Instant::now())).unwrap() || !set.fired(i));
        l.step(Step::Publish).unwrap();
        let stop = Finish::Stopped { by: StopCause::Api };
        assert_eq!(h.get(), Some(stop));
        assert_eq!(waiter.join().unwrap(), stop);
        let mut set = sys::PollSet::new();
        let i = set.readable(h.fd());
        assert!(set.wait(Some(Instant::now())).unwrap());
        assert!(set.fired(i));
        assert_eq!(
            l.step(Step::BeginUpgrade),
            Err(Refused::Finishing(stop)),
            "a refused step changes nothing"
        );
    }

    #[test]
    fn no_upgrade_begins_while_the_old_process_watches_this_one() {
        let l = Lifecycle::new(Attempts::default()).unwrap();
        l.step(Step::Ready).unwrap();
        l.record(|_, a| a.on_probation_under = Some(41));
        assert_eq!(
            l.step(Step::BeginUpgrade),
            Err(Refused::OnProbation { old_pid: 41 })
        );
        assert_eq!(l.phase(), Phase::Serving, "a refusal changes nothing");
        // The window passed (or the old process is gone): upgrades begin again.
        l.record(|_, a| a.on_probation_under = None);
        assert_eq!(
            l.step(Step::BeginUpgrade),
            Ok((Phase::Serving, Phase::Upgrading))
        );
    }

    #[test]
    fn a_bounded_wait_times_out_and_a_record_change_wakes_it() {
        let l = Lifecycle::new(Attempts::default()).unwrap();
        assert_eq!(
            l.wait(Some(Duration::from_millis(1)), |c| (c.attempts.failures
                > 0)
            .then_some(())),
            None
        );
        let l2 = l.clone();
        let t = std::thread::spawn(move || {
            l2.wait(Some(Duration::from_secs(10)), |c| {
                (c.attempts.failures > 0).then_some(c.attempts.failures)
            })
        });
        l.record(|_, a| a.ended(1, Err("x".into())));
        assert_eq!(t.join().unwrap(), Some(1));
    }
}

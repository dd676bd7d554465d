//! The lifecycle of one process as a pure state machine: its phases (the states), the steps between them, and which steps
//! each state refuses. No locks, no I/O, no clock: [`Phase::next`] is a function, tested below against the whole
//! table. The shared, locked copy lives in [`Lifecycle`](super::Lifecycle).
//!
//! ```text
//!   Starting ──Ready──▶ Serving ──BeginUpgrade──▶ Upgrading ──Commit──▶ Committing ──Committed──▶ Deciding(Upgraded)
//!      │                  ▲  │                     │    │                  │  │                         │
//!      │                  │  └──────Stop──┐        │    └──UpgradeEnded────┘  └─Stop: kept, applied      │Publish
//!      │                  └──UpgradeEnded─┼────────┘       (back to Serving,     if the commit fails      ▼
//!      └──────Stop────────────────────────▼                 or Stop(kept))                        Finished(Upgraded)
//!                                 Deciding(Stopped, upgrade?) ──Publish──▶ Finished(Stopped, upgrade?)
//! ```
//!
//! `Deciding` is a finish that is decided (nobody can upgrade or stop this process any more) but not yet
//! visible: the deciding thread does its bookkeeping (closing the listeners, telling systemd) before it
//! publishes, because the application may exit as soon as it sees the finish. A stop during an upgrade
//! finishes at once and the upgrade, still running, abandons its new process; `upgrade` says so until the
//! upgrade's thread reports `UpgradeEnded`, and a drain waits for that so no process outlives this one.
//!
//! With a probation window the commit goes to `Probation` instead (`CommittedOnProbation`): the new process
//! serves while this one stands by with the sockets; `ProbationPassed` leads to `Deciding(Upgraded)`,
//! `RolledBack` back to `Serving`, and a stop to `Deciding(Stopped)` with the probation's thread still to
//! stop the new process.

use std::fmt;

/// Why a process is finishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finish {
    /// A new process took over the sockets; this one should drain and exit.
    Upgraded {
        /// The new process.
        child_pid: u32,
    },
    /// A stop was requested.
    Stopped {
        /// Who asked.
        by: StopCause,
    },
}

/// Who asked a process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopCause {
    /// A signal (SIGTERM or SIGINT) through [`Upgrader::handle_signals`](crate::Upgrader::handle_signals) or
    /// `handle_signals_tokio`.
    Signal(i32),
    /// `stop` on the control socket (`exuvia-ctl stop`, systemd's `ExecStop=`).
    ControlSocket,
    /// The application called [`Upgrader::shutdown`](crate::Upgrader::shutdown).
    Api,
    /// The new process said, during its probation window, that a stop reached it (`exuvia-ctl stop`, a
    /// SIGTERM): this process stops too instead of taking the service back. (It says so on the handover
    /// channel before it can exit; an exit it did not announce, status 0 included, is a crash.)
    Successor,
}

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Built, not yet ready: a new process waiting for its handover to be confirmed, or a fresh one
    /// initialising. It cannot upgrade; a SIGHUP now is deferred until it is ready.
    Starting,
    /// Ready and the main process; no upgrade running.
    Serving,
    /// An upgrade has started a new process and waits for it to report ready.
    Upgrading,
    /// The new process is ready: this one tells systemd and confirms to the new process, with no lock held.
    /// A stop now is kept and applies only if the commit fails.
    Committing {
        /// The first stop that arrived meanwhile.
        stop: Option<StopCause>,
    },
    /// Committed with a probation window: the new process serves, this one has stopped accepting and lets its
    /// connections go, but keeps the sockets and watches the new process. If it dies within the window this
    /// process takes the service back (`RolledBack`); otherwise it finishes as upgraded (`ProbationPassed`).
    /// A stop now stops both.
    Probation {
        /// The new process.
        child_pid: u32,
    },
    /// Finishing, decided but not yet published.
    Deciding {
        /// Why.
        finish: Finish,
        /// An upgrade is still running (a stop arrived while it was initialising its new process).
        upgrade: bool,
    },
    /// Finishing, published: [`finishing`](super::Lifecycle::finishing) returns it.
    Finished {
        /// Why.
        finish: Finish,
        /// As in `Deciding`.
        upgrade: bool,
    },
}

/// What moves a process from one state to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// The process reported ready.
    Ready,
    /// An upgrade begins.
    BeginUpgrade,
    /// The new process reported ready: commit to it.
    Commit,
    /// systemd and the new process have been told.
    Committed {
        /// The new process.
        child_pid: u32,
    },
    /// systemd and the new process have been told, and a probation window starts.
    CommittedOnProbation {
        /// The new process.
        child_pid: u32,
    },
    /// The probation window ended with the new process alive.
    ProbationPassed,
    /// The new process died within the probation window: this process serves again.
    RolledBack,
    /// The upgrade is over without a handover (failed, or abandoned for a stop).
    UpgradeEnded,
    /// A stop was requested.
    Stop(StopCause),
    /// The deciding thread's bookkeeping is done: make the finish visible.
    Publish,
}

/// Why a step was refused in a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The process is finishing (decided or published) for this reason.
    Finishing(Finish),
    /// An upgrade is already running (or committing).
    UpgradeInProgress,
    /// This process is on probation: the old process (`old_pid`) may still roll back to itself, and one upgrade
    /// runs at a time across the generations. Not a phase of this process but a record of its start
    /// ([`Attempts::on_probation_under`](super::Attempts)): [`Lifecycle::step`](super::Lifecycle::step) checks it
    /// under the same lock as the phase.
    OnProbation {
        /// The old process that watches this one.
        old_pid: u32,
    },
    /// The process has not reported ready.
    NotReady,
    /// The process already reported ready.
    AlreadyReady,
    /// A stop was already requested while committing; the first one stands.
    StopPending,
    /// The step does not belong to this state at all (a bug in the caller's sequence).
    OutOfSequence,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Finishing(Finish::Upgraded { child_pid }) => write!(
                f,
                "this process already handed over to pid {child_pid}; signal that process instead"
            ),
            Refused::Finishing(Finish::Stopped { .. }) => {
                f.write_str("this process is stopping; it will not upgrade")
            }
            Refused::UpgradeInProgress => {
                f.write_str("an upgrade is already in progress; wait for its verdict")
            }
            Refused::OnProbation { old_pid } => write!(
                f,
                "this process is on probation: the old process (pid {old_pid}) can still roll back to itself; \
                 one upgrade at a time, so upgrade again after the window"
            ),
            Refused::NotReady => f.write_str(
                "this process has not reported ready yet; it cannot upgrade before it serves",
            ),
            Refused::AlreadyReady => f.write_str("this process already reported ready"),
            Refused::StopPending => f.write_str("a stop is already pending"),
            Refused::OutOfSequence => f.write_str("lifecycle step out of sequence"),
        }
    }
}

impl Phase {
    /// The state after `step`, or why this state refuses it.
    pub(crate) fn next(self, step: Step) -> Result<Phase, Refused> {
        use Phase::*;
        use Step::*;
        match (self, step) {
            (Starting, Ready) => Ok(Serving),
            (Serving | Upgrading | Committing { .. }, Ready) => Err(Refused::AlreadyReady),
            // A process stopped before it was ready may still complete its ready() (a new process whose
            // handover is confirmed becomes the main one, then drains): the finish stands.
            (Deciding { .. } | Finished { .. }, Ready) => Ok(self),

            (Serving, BeginUpgrade) => Ok(Upgrading),
            (Starting, BeginUpgrade) => Err(Refused::NotReady),
            (Upgrading | Committing { .. }, BeginUpgrade) => Err(Refused::UpgradeInProgress),

            (Upgrading, Commit) => Ok(Committing { stop: None }),
            (Committing { stop }, Committed { child_pid }) => {
                // A stop that arrived while committing is moot: this process finishes by the handover.
                let _ = stop;
                Ok(Deciding {
                    finish: Finish::Upgraded { child_pid },
                    upgrade: false,
                })
            }

            (Committing { .. }, CommittedOnProbation { child_pid }) => Ok(Probation { child_pid }),
            (Probation { child_pid }, ProbationPassed) => Ok(Deciding {
                finish: Finish::Upgraded { child_pid },
                upgrade: false,
            }),
            (Probation { .. }, RolledBack) => Ok(Serving),
            (Probation { .. }, Stop(by)) => Ok(Deciding {
                finish: Finish::Stopped { by },
                upgrade: true,
            }),
            (Probation { .. }, BeginUpgrade) => Err(Refused::UpgradeInProgress),
            (Probation { .. }, Ready) => Err(Refused::AlreadyReady),

            (Upgrading, UpgradeEnded) => Ok(Serving),
            (Committing { stop: None }, UpgradeEnded) => Ok(Serving),
            (Committing { stop: Some(by) }, UpgradeEnded) => Ok(Deciding {
                finish: Finish::Stopped { by },
                upgrade: false,
            }),
            (
                Deciding {
                    finish,
                    upgrade: true,
                },
                UpgradeEnded,
            ) => Ok(Deciding {
                finish,
                upgrade: false,
            }),
            (
                Finished {
                    finish,
                    upgrade: true,
                },
                UpgradeEnded,
            ) => Ok(Finished {
                finish,
                upgrade: false,
            }),

            (Starting | Serving, Stop(by)) => Ok(Deciding {
                finish: Finish::Stopped { by },
                upgrade: false,
            }),
            (Upgrading, Stop(by)) => Ok(Deciding {
                finish: Finish::Stopped { by },
                upgrade: true,
            }),
            (Committing { stop: None }, Stop(by)) => Ok(Committing { stop: Some(by) }),
            (Committing { stop: Some(_) }, Stop(_)) => Err(Refused::StopPending),

            (Deciding { finish, upgrade }, Publish) => Ok(Finished { finish, upgrade }),

            // Every step a finishing process cannot take says why it is finishing.
            (
                Deciding { finish, .. } | Finished { finish, .. },
                BeginUpgrade | Commit | Stop(_),
            ) => Err(Refused::Finishing(finish)),

            (
                _,
                Commit
                | Committed { .. }
                | CommittedOnProbation { .. }
                | ProbationPassed
                | RolledBack
                | UpgradeEnded
                | Publish,
            ) => Err(Refused::OutOfSequence),
        }
    }

    /// A word for operators (`exuvia-ctl status`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "serving",
            Phase::Upgrading | Phase::Committing { .. } => "upgrading",
            Phase::Probation { .. } => "probation",
            Phase::Deciding { .. } | Phase::Finished { .. } => "finishing",
        }
    }

    /// The finish, once decided (published or not).
    pub(crate) fn decided(self) -> Option<Finish> {
        match self {
            Phase::Deciding { finish, .. } | Phase::Finished { finish, .. } => Some(finish),
            _ => None,
        }
    }

    /// The finish, once published.
    pub(crate) fn published(self) -> Option<Finish> {
        match self {
            Phase::Finished { finish, .. } => Some(finish),
            _ => None,
        }
    }

    /// Whether an upgrade is running in this state (initialising its new process, or committing).
    pub(crate) fn upgrade_running(self) -> bool {
        match self {
            Phase::Upgrading | Phase::Committing { .. } | Phase::Probation { .. } => true,
            Phase::Deciding { upgrade, .. } | Phase::Finished { upgrade, .. } => upgrade,
            Phase::Starting | Phase::Serving => false,
        }
    }

    /// Whether this process takes new connections in this state: not before it has reported ready (its
    /// accept loops start after `ready()` anyway), not on probation, not once finishing.
    pub(crate) fn accepting(self) -> bool {
        !matches!(
            self,
            Phase::Probation { .. } | Phase::Deciding { .. } | Phase::Finished { .. }
        )
    }

    /// Whether this process's connections should be let go (HTTP `Connection: close`, HTTP/2 GOAWAY): on
    /// probation and once finishing. Revocable: a rollback makes it false again.
    pub(crate) fn closing(self) -> bool {
        matches!(
            self,
            Phase::Probation { .. } | Phase::Deciding { .. } | Phase::Finished { .. }
        )
    }

    /// Whether the process has reported ready (a finishing process counts as not ready if it never did;
    /// nothing asks then).
    pub(crate) fn is_starting(self) -> bool {
        self == Phase::Starting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BY: StopCause = StopCause::Api;
    const OTHER: StopCause = StopCause::Signal(15);
    const UP: Finish = Finish::Upgraded { child_pid: 7 };
    const STOP: Finish = Finish::Stopped { by: BY };

    /// One representative of every state (and of each variant's interesting fields).
    fn states() -> Vec<Phase> {
        use Phase::*;
        let mut v = vec![
            Starting,
            Serving,
            Upgrading,
            Committing { stop: None },
            Committing { stop: Some(BY) },
            Probation { child_pid: 7 },
        ];
        for finish in [UP, STOP] {
            for upgrade in [false, true] {
                v.push(Deciding { finish, upgrade });
                v.push(Finished { finish, upgrade });
            }
        }
        v
    }

    fn steps() -> Vec<Step> {
        use Step::*;
        vec![
            Ready,
            BeginUpgrade,
            Commit,
            Committed { child_pid: 7 },
            CommittedOnProbation { child_pid: 7 },
            ProbationPassed,
            RolledBack,
            UpgradeEnded,
            Stop(OTHER),
            Publish,
        ]
    }

    /// The whole table, written out: every allowed step with its result. Anything not listed must be refused.
    fn allowed(s: Phase, step: Step) -> Option<Phase> {
        use Phase::*;
        use Step::*;
        Some(match (s, step) {
            (Starting, Ready) => Serving,
            (Deciding { .. } | Finished { .. }, Ready) => s,
            (Serving, BeginUpgrade) => Upgrading,
            (Upgrading, Commit) => Committing { stop: None },
            (Committing { .. }, Committed { child_pid: 7 }) => Deciding {
                finish: UP,
                upgrade: false,
            },
            (Committing { .. }, CommittedOnProbation { child_pid: 7 }) => {
                Probation { child_pid: 7 }
            }
            (Probation { child_pid: 7 }, ProbationPassed) => Deciding {
                finish: UP,
                upgrade: false,
            },
            (Probation { .. }, RolledBack) => Serving,
            (Probation { .. }, Stop(OTHER)) => Deciding {
                finish: Finish::Stopped { by: OTHER },
                upgrade: true,
            },
            (Upgrading, UpgradeEnded) => Serving,
            (Committing { stop: None }, UpgradeEnded) => Serving,
            (Committing { stop: Some(BY) }, UpgradeEnded) => Deciding {
                finish: STOP,
                upgrade: false,
            },
            (
                Deciding {
                    finish,
                    upgrade: true,
                },
                UpgradeEnded,
            ) => Deciding {
                finish,
                upgrade: false,
            },
            (
                Finished {
                    finish,
                    upgrade: true,
                },
                UpgradeEnded,
            ) => Finished {
                finish,
                upgrade: false,
            },
            (Starting | Serving, Stop(OTHER)) => Deciding {
                finish: Finish::Stopped { by: OTHER },
                upgrade: false,
            },
            (Upgrading, Stop(OTHER)) => Deciding {
                finish: Finish::Stopped { by: OTHER },
                upgrade: true,
            },
            (Committing { stop: None }, Stop(OTHER)) => Committing { stop: Some(OTHER) },
            (Deciding { finish, upgrade }, Publish) => Finished { finish, upgrade },
            _ => return None,
        })
    }

    #[test]
    fn every_state_and_step_follows_the_table() {
        let mut checked = 0;
        for s in states() {
            for step in steps() {
                let got = s.next(step);
                match allowed(s, step) {
                    Some(want) => assert_eq!(got, Ok(want), "{s:?} --{step:?}-->"),
                    None => assert!(
                        got.is_err(),
                        "{s:?} --{step:?}--> should be refused, got {got:?}"
                    ),
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 14 * 10);
    }

    #[test]
    fn refusals_say_why() {
        use Phase::*;
        use Step::*;
        assert_eq!(Starting.next(BeginUpgrade), Err(Refused::NotReady));
        assert_eq!(
            Upgrading.next(BeginUpgrade),
            Err(Refused::UpgradeInProgress)
        );
        assert_eq!(
            Committing { stop: None }.next(BeginUpgrade),
            Err(Refused::UpgradeInProgress)
        );
        assert_eq!(Serving.next(Ready), Err(Refused::AlreadyReady));
        assert_eq!(
            Committing { stop: Some(BY) }.next(Stop(OTHER)),
            Err(Refused::StopPending)
        );
        for s in states() {
            if let Some(f) = s.decided() {
                for step in [BeginUpgrade, Commit, Stop(OTHER)] {
                    assert_eq!(s.next(step), Err(Refused::Finishing(f)), "{s:?} {step:?}");
                }
            }
        }
        assert_eq!(Serving.next(Publish), Err(Refused::OutOfSequence));
        assert_eq!(Serving.next(Commit), Err(Refused::OutOfSequence));
        assert!(Refused::Finishing(UP).to_string().contains("pid 7"));
    }

    #[test]
    fn probation_ends_by_passing_by_rolling_back_or_by_a_stop_of_both() {
        let committing = Phase::Upgrading.next(Step::Commit).unwrap();
        let p = committing
            .next(Step::CommittedOnProbation { child_pid: 7 })
            .unwrap();
        assert!(!p.accepting() && p.closing() && p.upgrade_running());
        assert_eq!(p.decided(), None, "nothing is final on probation");
        assert_eq!(p.next(Step::BeginUpgrade), Err(Refused::UpgradeInProgress));
        let back = p.next(Step::RolledBack).unwrap();
        assert_eq!(back, Phase::Serving);
        assert!(back.accepting() && !back.closing());
        let passed = p.next(Step::ProbationPassed).unwrap();
        assert_eq!(passed.decided(), Some(UP));
        let stopped = p.next(Step::Stop(BY)).unwrap();
        assert_eq!(stopped.decided(), Some(STOP));
        assert!(
            stopped.upgrade_running(),
            "the probation's thread still has to stop the new process"
        );
    }

    #[test]
    fn a_stop_during_an_upgrade_keeps_the_upgrade_visible_until_it_ends() {
        let s = Phase::Upgrading.next(Step::Stop(BY)).unwrap();
        assert!(s.upgrade_running());
        assert_eq!(s.decided(), Some(STOP));
        assert_eq!(s.published(), None);
        let s = s.next(Step::Publish).unwrap();
        assert_eq!(s.published(), Some(STOP));
        assert!(s.upgrade_running());
        let s = s.next(Step::UpgradeEnded).unwrap();
        assert!(!s.upgrade_running());
        assert_eq!(s.published(), Some(STOP));
    }

    #[test]
    fn a_whole_upgrade_and_a_failed_commit_with_a_stop() {
        let mut s = Phase::Starting;
        for step in [Step::Ready, Step::BeginUpgrade, Step::Commit] {
            s = s.next(step).unwrap();
        }
        assert!(s.upgrade_running());
        let done = s.next(Step::Committed { child_pid: 7 }).unwrap();
        assert_eq!(done.next(Step::Publish).unwrap().published(), Some(UP));
        // The same commit failing with a stop pending: the stop applies.
        let s = s.next(Step::Stop(BY)).unwrap();
        assert_eq!(
            s.decided(),
            None,
            "a stop while committing waits for the commit"
        );
        assert_eq!(s.next(Step::UpgradeEnded).unwrap().decided(), Some(STOP));
    }
}

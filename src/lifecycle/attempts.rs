//! The record of upgrade attempts and SIGHUPs: what the reload helper (`exuvia-ctl reload`) and
//! [`Upgrader::wait_event`](crate::Upgrader::wait_event) ask about. Kept under the lifecycle's lock, so that a
//! waiter sees a change of either at once and is woken from one place.

use std::collections::VecDeque;

use crate::control::Reply;

/// How many SIGHUP records are kept.
const SIGHUP_RECORDS: usize = 16;

/// The upgrade in flight, the last one and its verdict, the upgrade that created this process, and the last
/// SIGHUPs with their own verdicts.
#[derive(Debug, Default)]
pub(crate) struct Attempts {
    /// Start (`CLOCK_MONOTONIC` µs) of the upgrade in flight.
    pub(crate) current: Option<u64>,
    /// Start and verdict of the last finished upgrade: the new pid, or why it failed.
    pub(crate) last: Option<(u64, Result<u32, String>)>,
    /// `ready()` was called: its work (reporting to the old process or systemd) runs once. Whether it
    /// completed is the phase's to say (`Starting` → `Serving`).
    pub(crate) ready_called: bool,
    /// Start of the upgrade that created this process (from the old process's `Hello`).
    pub(crate) born_of: Option<u64>,
    /// The old process, while it watches this one through its probation window (from the commit until it
    /// says the window passed, or is gone): no upgrade of this process's own meanwhile.
    pub(crate) on_probation_under: Option<u32>,
    /// SIGHUPs received and SIGHUPs acted upon (an upgrade started or refused).
    pub(crate) sighup_received: u64,
    pub(crate) sighup_handled: u64,
    /// The last SIGHUPs, each with its own verdict: what a reload helper asks about.
    pub(crate) sighups: VecDeque<Sighup>,
    /// A SIGHUP that arrived before this process was ready, applied once it is (its index in `sighups` is
    /// found by `id`).
    pub(crate) deferred: Option<u64>,
    /// When this process last told systemd that the main process is now another one (`MAINPID=`): signals
    /// systemd sends after that go there, so no SIGHUP received here before it answers a later reload.
    pub(crate) handed_over_usec: Option<u64>,
    /// Failed upgrades so far, for [`Upgrader::wait_event`](crate::Upgrader::wait_event).
    pub(crate) failures: u64,
    /// Of those, rollbacks after a probation (the last failure's kind tells the event apart).
    pub(crate) rollbacks: u64,
    pub(crate) last_rolled_back: bool,
}

/// One SIGHUP and what came of it.
#[derive(Debug, Clone)]
pub(crate) struct Sighup {
    pub(crate) id: u64,
    /// When it was received (`CLOCK_MONOTONIC`, µs).
    pub(crate) at_usec: u64,
    /// How many SIGHUPs the process's handler had caught when this one was recorded: a count ahead of the
    /// last record's means a SIGHUP is on its way to being recorded.
    pub(crate) caught: u64,
    /// `None` while its upgrade runs (or waits for this process to be ready).
    pub(crate) verdict: Option<Reply>,
}

impl Attempts {
    /// Records a SIGHUP received at `at_usec`, when the handler had caught `caught`; returns its id.
    pub(crate) fn sighup(&mut self, at_usec: u64, caught: u64) -> u64 {
        self.sighup_received += 1;
        let id = self.sighup_received;
        self.sighups.push_back(Sighup {
            id,
            at_usec,
            caught,
            verdict: None,
        });
        while self.sighups.len() > SIGHUP_RECORDS {
            self.sighups.pop_front();
        }
        id
    }

    /// Records the verdict of SIGHUP `id` (nothing if its record has been dropped).
    pub(crate) fn settle(&mut self, id: u64, verdict: Reply) {
        if let Some(s) = self.sighups.iter_mut().find(|s| s.id == id) {
            s.verdict = Some(verdict);
        }
    }

    /// Records the end of the upgrade that started at `started_usec`.
    pub(crate) fn ended(&mut self, started_usec: u64, verdict: Result<u32, String>) {
        self.current = None;
        if verdict.is_err() {
            self.failures += 1;
        }
        self.last_rolled_back = false;
        self.last = Some((started_usec, verdict));
    }

    /// Records the end of an upgrade whose new process died on probation (this process serves again).
    pub(crate) fn rolled_back(&mut self, started_usec: u64, why: String) {
        self.ended(started_usec, Err(why));
        self.rollbacks += 1;
        self.last_rolled_back = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sighup_records_are_bounded_and_settled_by_id() {
        let mut a = Attempts::default();
        let ids: Vec<u64> = (0..40).map(|i| a.sighup(i, i)).collect();
        assert_eq!(a.sighups.len(), SIGHUP_RECORDS);
        a.settle(ids[0], Reply::Ok("lost".into()));
        assert!(a.sighups.iter().all(|s| s.verdict.is_none()));
        a.settle(ids[39], Reply::Failed("no".into()));
        assert_eq!(
            a.sighups.back().unwrap().verdict,
            Some(Reply::Failed("no".into()))
        );
        a.current = Some(5);
        a.ended(5, Err("x".into()));
        a.ended(6, Ok(9));
        assert_eq!(
            (a.current, a.failures, a.last.clone()),
            (None, 1, Some((6, Ok(9))))
        );
    }
}

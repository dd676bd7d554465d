//! CPU scheduling for background initialisation: the policy and nice value of this process and of each of its
//! threads, and the return from `SCHED_IDLE`. `sched_getscheduler`/`sched_setscheduler` are called by hand:
//! neither rustix nor std offers them.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// A scheduling policy, as `sched_getscheduler(2)` and `/proc/PID/task/TID/stat` give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// `SCHED_OTHER`: normal time sharing.
    Other,
    /// `SCHED_IDLE`: only when nothing else wants the CPU.
    Idle,
    /// Any other (`SCHED_BATCH`, real-time ones): its number.
    Else(i32),
}

impl Policy {
    fn from_raw(raw: i32) -> Policy {
        match raw & !libc::SCHED_RESET_ON_FORK {
            libc::SCHED_OTHER => Policy::Other,
            libc::SCHED_IDLE => Policy::Idle,
            other => Policy::Else(other),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Other => f.write_str("SCHED_OTHER"),
            Policy::Idle => f.write_str("SCHED_IDLE"),
            Policy::Else(n) => write!(f, "{n}"),
        }
    }
}

/// A thread's scheduling, or a process's (its calling thread's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scheduling {
    pub(crate) policy: Policy,
    /// The nice value, -20 to 19.
    pub(crate) nice: i32,
}

/// The calling thread's scheduling policy and nice value.
pub(crate) fn scheduling() -> io::Result<Scheduling> {
    // SAFETY: no pointers; 0 is the calling thread.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 {
        return Err(io::Error::last_os_error());
    }
    let nice = rustix::process::getpriority_process(None)?;
    Ok(Scheduling {
        policy: Policy::from_raw(policy),
        nice,
    })
}

/// Whether this process holds `CAP_SYS_NICE` in its effective set.
fn has_cap_sys_nice() -> bool {
    rustix::thread::capabilities(None)
        .map(|c| {
            c.effective
                .contains(rustix::thread::CapabilitySet::SYS_NICE)
        })
        .unwrap_or(false)
}

/// Whether a thread of this process at `SCHED_IDLE` may go back to `SCHED_OTHER` at `nice`: that needs
/// `CAP_SYS_NICE` or an `RLIMIT_NICE` of at least `20 - nice` (systemd: `LimitNICE=`).
pub(crate) fn may_return_to(nice: i32) -> bool {
    let needed = (20 - nice).max(0) as u64;
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nice).current;
    // `None` is RLIM_INFINITY.
    limit.map_or(true, |l| l >= needed) || has_cap_sys_nice()
}

/// The thread ids of `pid` (`0`: this process) with their scheduling policy, from `/proc`.
pub(crate) fn thread_policies(pid: u32) -> io::Result<Vec<(i32, Policy)>> {
    let dir = if pid == 0 {
        PathBuf::from("/proc/self/task")
    } else {
        PathBuf::from(format!("/proc/{pid}/task"))
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        // A thread that exits while we read is simply gone.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command's closing parenthesis start at field 3; the policy is field 41.
        let policy = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(41 - 3))
            .and_then(|p| p.parse::<i32>().ok())
            .ok_or_else(|| io::Error::other(format!("unexpected format of {}", dir.display())))?;
        out.push((tid, Policy::from_raw(policy)));
    }
    Ok(out)
}

/// Puts every thread of this process at `SCHED_OTHER` with `nice`, pass after pass until one finds every
/// thread there (a thread created meanwhile by a thread still at `SCHED_IDLE` is caught by the next pass).
pub(crate) fn return_to_normal_scheduling(nice: i32) -> io::Result<()> {
    for _ in 0..100 {
        let mut changed = false;
        for (tid, policy) in thread_policies(0)? {
            if policy == Policy::Other {
                continue;
            }
            changed = true;
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: integers and a live sched_param.
            let r = unsafe { libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param) };
            if r != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ESRCH) {
                    return Err(e);
                }
                continue; // the thread exited
            }
            // On Linux, PRIO_PROCESS with a thread id sets that thread's nice value.
            match rustix::process::setpriority_process(rustix::process::Pid::from_raw(tid), nice) {
                Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if !changed {
            return Ok(());
        }
    }
    Err(io::Error::other(
        "threads kept appearing at idle priority over 100 passes",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduling_of_this_process_is_readable() {
        let Scheduling { policy, nice } = scheduling().unwrap();
        assert_eq!(policy, Policy::Other);
        assert!((-20..=19).contains(&nice));
        let threads = thread_policies(0).unwrap();
        assert!(!threads.is_empty());
        assert!(
            threads.iter().all(|(_, p)| *p == Policy::Other),
            "{threads:?}"
        );
        // Back to where it already is: nothing to change, no privilege needed.
        return_to_normal_scheduling(nice).unwrap();
    }
}

//! The handover's environment contract, both sides in one place: what the old process sets for the new one
//! ([`Offer::write`], with the fd-passing `LISTEN_*` variables), and what the new one reads back
//! ([`Handover::read`]). Every variable is named here once.

use std::ffi::OsStr;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use crate::activation;
use crate::error::{Error, Result};
use crate::sys::SpawnPlan;

/// The variable that names the channel's fd in the child.
pub(crate) const VAR_FD: &str = "EXUVIA_HANDOVER_FD";
/// The variable that names the connection channel's fd in the child (right after the handover channel): the
/// `SOCK_SEQPACKET` socket established connections move over (`crate::moving`). A build that predates it
/// leaves it unset; the new process then takes no connections.
pub(crate) const VAR_MOVES_FD: &str = "EXUVIA_HANDOVER_MOVES_FD";
/// The pid the channel variable is meant for (like `LISTEN_PID`): a grandchild that inherits the environment
/// by accident ignores it.
pub(crate) const VAR_PID: &str = "EXUVIA_HANDOVER_PID";
/// Set when the old process started this one at `SCHED_IDLE` (background initialisation): the nice value to
/// return to, at `SCHED_OTHER`, before reporting ready.
pub(crate) const VAR_NICE: &str = "EXUVIA_HANDOVER_NICE";
/// Set when the old process watches this one through a probation window: its length in milliseconds. The new
/// process then answers a reload helper's verdict only once the window has passed.
pub(crate) const VAR_PROBATION: &str = "EXUVIA_HANDOVER_PROBATION_MS";
/// The new process's generation (how many upgrades led to it), for logging set up before the `Upgrader` is
/// built ([`crate::logging::generation`]); `Hello` carries the same number for the handover itself.
pub(crate) const VAR_GENERATION: &str = "EXUVIA_HANDOVER_GENERATION";
/// Every variable of this library starts with this; none is passed on to a child except the ones set anew.
pub(crate) const VAR_PREFIX: &str = "EXUVIA_";

/// Every variable of the contract, `LISTEN_*` included: removed from a new process's environment by `build()`
/// (while it has one thread), never copied to a child from this process's own environment.
pub(crate) const ALL: &[&str] = &[
    activation::VAR_PID,
    activation::VAR_FDS,
    activation::VAR_NAMES,
    activation::VAR_PIDFDID,
    VAR_FD,
    VAR_MOVES_FD,
    VAR_PID,
    VAR_NICE,
    VAR_PROBATION,
    VAR_GENERATION,
];

/// Whether `name` is one of this contract's variables (or any `EXUVIA_*`): such a variable is never copied
/// from this process's environment to a child, only set anew.
pub(crate) fn is_ours(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(VAR_PREFIX.as_bytes()) || ALL.iter().any(|v| b == v.as_bytes())
}

/// What the old process offers the new one, as environment variables.
#[derive(Debug)]
pub(crate) struct Offer<'a> {
    /// The sockets' names, in fd order from 3 (the channel comes right after them, then the connection
    /// channel).
    pub(crate) sockets: &'a [&'a str],
    pub(crate) generation: u32,
    /// Whether this process feeds a systemd watchdog: then the child gets `WATCHDOG_PID=<its own pid>`.
    pub(crate) watchdog: bool,
    /// The probation window the new process will be watched through (zero: none).
    pub(crate) probation: Duration,
    /// Background initialisation: the nice value to return to.
    pub(crate) nice: Option<i32>,
}

impl Offer<'_> {
    /// Sets the variables in `plan`; the pid variables are filled in with the child's own pid after fork.
    pub(crate) fn write(&self, plan: &mut SpawnPlan) -> std::io::Result<()> {
        let n = self.sockets.len();
        if n > 0 {
            plan.env(activation::VAR_FDS.as_bytes(), n.to_string().as_bytes())?;
            plan.env(
                activation::VAR_NAMES.as_bytes(),
                self.sockets.join(":").as_bytes(),
            )?;
            plan.env_child_pid(activation::VAR_PID.as_bytes());
        }
        let channel_fd = activation::LISTEN_FDS_START as usize + n;
        plan.env(VAR_FD.as_bytes(), channel_fd.to_string().as_bytes())?;
        plan.env(
            VAR_MOVES_FD.as_bytes(),
            (channel_fd + 1).to_string().as_bytes(),
        )?;
        plan.env_child_pid(VAR_PID.as_bytes());
        plan.env(
            VAR_GENERATION.as_bytes(),
            self.generation.to_string().as_bytes(),
        )?;
        if self.watchdog {
            plan.env_child_pid(crate::systemd::VAR_WATCHDOG_PID.as_bytes());
        }
        if !self.probation.is_zero() {
            plan.env(
                VAR_PROBATION.as_bytes(),
                self.probation.as_millis().to_string().as_bytes(),
            )?;
        }
        if let Some(nice) = self.nice {
            plan.env(VAR_NICE.as_bytes(), nice.to_string().as_bytes())?;
        }
        Ok(())
    }
}

/// What a new process reads of the contract (the sockets themselves are `LISTEN_*`'s: [`activation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Handover {
    /// The channel to the old process.
    pub(crate) channel_fd: RawFd,
    /// The connection channel, if the old process offers one.
    pub(crate) moves_fd: Option<RawFd>,
    /// Background initialisation: the nice value to return to before reporting ready.
    pub(crate) nice: Option<i32>,
    /// The window the old process watches this one through.
    pub(crate) probation: Option<Duration>,
}

impl Handover {
    /// Reads this process's environment. `Ok(None)`: not started by an upgrade (or the variables were meant
    /// for another pid).
    pub(crate) fn read(my_pid: u32) -> Result<Option<Handover>> {
        let var = |name: &str| std::env::var_os(name);
        let Some(channel_fd) = parse_vars(var(VAR_FD).as_deref(), var(VAR_PID).as_deref(), my_pid)?
        else {
            return Ok(None);
        };
        let moves_fd = match var(VAR_MOVES_FD) {
            None => None,
            Some(v) => Some(parse_fd(VAR_MOVES_FD, &v)?),
        };
        if moves_fd == Some(channel_fd) {
            return Err(Error::env(format!(
                "{VAR_MOVES_FD} and {VAR_FD} name the same descriptor; the environment was not made by exuvia"
            )));
        }
        Ok(Some(Handover {
            channel_fd,
            moves_fd,
            nice: parse_nice(var(VAR_NICE).as_deref())?,
            probation: parse_probation(var(VAR_PROBATION).as_deref())?,
        }))
    }
}

/// Reads the two handover variables. `Ok(None)`: this process was not started by an exuvia upgrade (or the
/// variables were meant for another pid).
fn parse_vars(fd: Option<&OsStr>, pid: Option<&OsStr>, my_pid: u32) -> Result<Option<RawFd>> {
    let Some(fd) = fd else { return Ok(None) };
    let Some(pid) = pid else {
        return Err(Error::env(format!(
            "{} is set without {}; the environment was not made by exuvia",
            VAR_FD, VAR_PID
        )));
    };
    let num = |name: &str, v: &OsStr| -> Result<u32> {
        v.to_str()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Error::env(format!("{name}={v:?} is not a number")))
    };
    if num(VAR_PID, pid)? != my_pid {
        return Ok(None);
    }
    parse_fd(VAR_FD, fd).map(Some)
}

/// A descriptor number variable: 3 or more.
fn parse_fd(name: &str, v: &OsStr) -> Result<RawFd> {
    v.to_str()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|fd| (3..=i32::MAX as u32).contains(fd))
        .map(|fd| fd as RawFd)
        .ok_or_else(|| Error::env(format!("{name}={v:?} is not a valid descriptor")))
}

/// Reads the background-initialisation variable: `Ok(None)` when it is absent.
fn parse_nice(v: Option<&OsStr>) -> Result<Option<i32>> {
    let Some(v) = v else { return Ok(None) };
    v.to_str()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|n| (-20..=19).contains(n))
        .map(Some)
        .ok_or_else(|| {
            Error::env(format!(
                "{}={v:?} is not a nice value (-20 to 19)",
                VAR_NICE
            ))
        })
}

/// Reads the probation variable: `Ok(None)` when it is absent.
fn parse_probation(v: Option<&OsStr>) -> Result<Option<Duration>> {
    let Some(v) = v else { return Ok(None) };
    v.to_str()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|ms| Some(Duration::from_millis(ms)))
        .ok_or_else(|| {
            Error::env(format!(
                "{}={v:?} is not a number of milliseconds",
                VAR_PROBATION
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn p(fd: Option<&str>, pid: Option<&str>) -> Result<Option<RawFd>> {
        parse_vars(fd.map(OsStr::new), pid.map(OsStr::new), 50)
    }

    #[test]
    fn vars_for_us_for_others_and_broken() {
        assert_eq!(p(None, None).unwrap(), None);
        assert_eq!(p(Some("5"), Some("50")).unwrap(), Some(5));
        assert_eq!(p(Some("5"), Some("51")).unwrap(), None);
        for (fd, pid) in [
            (Some("5"), None),
            (Some("x"), Some("50")),
            (Some("5"), Some("")),
            (Some("1"), Some("50")),
            (Some("-4"), Some("50")),
            (Some("99999999999"), Some("50")),
        ] {
            assert_eq!(
                p(fd, pid).unwrap_err().kind(),
                ErrorKind::Environment,
                "{fd:?} {pid:?}"
            );
        }
    }

    #[test]
    fn the_nice_variable_is_checked() {
        use std::ffi::OsStr;
        assert_eq!(parse_nice(None).unwrap(), None);
        assert_eq!(parse_nice(Some(OsStr::new("0"))).unwrap(), Some(0));
        assert_eq!(parse_nice(Some(OsStr::new(" -5 "))).unwrap(), Some(-5));
        for bad in ["", "x", "20", "-21", "1.5"] {
            let e = parse_nice(Some(OsStr::new(bad))).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Environment, "{bad}");
            assert!(e.to_string().contains("EXUVIA_HANDOVER_NICE"), "{e}");
        }
    }
}

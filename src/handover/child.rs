//! The new process's side: find the channel, read `Hello`, later report `Ready` (or `Failed`) and wait for
//! `Commit`.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::channel::{Channel, Event};
use super::protocol::Message;
use crate::error::{Error, ErrorKind, Result};
use crate::sys;

/// How long a new process waits for its parent's `Hello`. The parent sends it right after `exec`, so this only
/// bounds a broken parent.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The link from a new process to the old one, until the handover is committed.
#[derive(Debug)]
pub(crate) struct ParentLink {
    channel: Channel,
    pub(crate) parent_pid: u32,
    pub(crate) generation: u32,
    pub(crate) started_usec: u64,
    /// When `Hello` arrived: the start of this process's own initialisation, as the parent accounts it.
    greeted: Instant,
    /// Background initialisation: the nice value to return to (at `SCHED_OTHER`) before reporting ready.
    pub(crate) restore_nice: Option<i32>,
}

/// Reads the two handover variables. `Ok(None)`: this process was not started by an exuvia upgrade (or the
/// variables were meant for another pid).
pub(crate) fn parse_vars(
    fd: Option<&OsStr>,
    pid: Option<&OsStr>,
    my_pid: u32,
) -> Result<Option<RawFd>> {
    let Some(fd) = fd else { return Ok(None) };
    let Some(pid) = pid else {
        return Err(Error::env(format!(
            "{} is set without {}; the environment was not made by exuvia",
            super::VAR_FD,
            super::VAR_PID
        )));
    };
    let num = |name: &str, v: &OsStr| -> Result<u32> {
        v.to_str()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Error::env(format!("{name}={v:?} is not a number")))
    };
    if num(super::VAR_PID, pid)? != my_pid {
        return Ok(None);
    }
    let fd = num(super::VAR_FD, fd)?;
    if !(3..=i32::MAX as u32).contains(&fd) {
        return Err(Error::env(format!(
            "{}={fd} is not a valid descriptor",
            super::VAR_FD
        )));
    }
    Ok(Some(fd as RawFd))
}

/// Reads the background-initialisation variable: `Ok(None)` when it is absent.
pub(crate) fn parse_nice(v: Option<&OsStr>) -> Result<Option<i32>> {
    let Some(v) = v else { return Ok(None) };
    v.to_str()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|n| (-20..=19).contains(n))
        .map(Some)
        .ok_or_else(|| {
            Error::env(format!(
                "{}={v:?} is not a nice value (-20 to 19)",
                super::VAR_NICE
            ))
        })
}

/// Adopts the channel at `raw` and reads `Hello`. Returns the link and the application state.
pub(crate) fn connect(raw: RawFd) -> Result<(ParentLink, Vec<u8>)> {
    let fd: OwnedFd = sys::adopt_inherited_fd(raw).map_err(|e| {
        Error::with_io(
            ErrorKind::Environment,
            format!(
                "{}={raw} names a descriptor that is not open",
                super::VAR_FD
            ),
            e,
        )
    })?;
    match sys::socket_info(fd.as_fd()) {
        Ok(Some(i)) if i.domain == libc::AF_UNIX && i.ty == libc::SOCK_STREAM => {}
        _ => {
            return Err(Error::env(format!(
                "{}={raw} is {}, not the handover channel",
                super::VAR_FD,
                crate::listen::describe(fd.as_fd())
            )))
        }
    }
    sys::set_cloexec(fd.as_fd(), true)
        .map_err(|e| Error::io("cannot set close-on-exec on the channel", e))?;
    let mut channel = Channel::new(UnixStream::from(fd))?;
    let deadline = Instant::now() + HELLO_TIMEOUT;
    let hello = match channel.recv(Some(deadline), None) {
        Ok(ev) => ev,
        Err(e) => {
            // Tell the parent why, if it can still hear: a version mismatch then reads as such in its logs
            // instead of as a timeout.
            let _ = channel.send(
                &Message::Failed(e.to_string()),
                Instant::now() + Duration::from_secs(1),
            );
            return Err(e);
        }
    };
    match hello {
        Event::Message(Message::Hello {
            parent_pid,
            generation,
            started_usec,
            state,
        }) => Ok((
            ParentLink {
                channel,
                parent_pid,
                generation,
                started_usec,
                greeted: Instant::now(),
                restore_nice: None,
            },
            state,
        )),
        Event::Message(m) => Err(Error::protocol(format!(
            "handover channel: expected hello from the parent, got {}",
            m.name()
        ))),
        Event::Closed => Err(Error::new(
            ErrorKind::Channel,
            "the old process closed the handover channel before greeting; it has probably given up on this \
             upgrade",
        )),
        Event::Timeout | Event::Extra => Err(Error::new(
            ErrorKind::Channel,
            "the old process sent nothing on the handover channel within 10 s",
        )),
    }
}

impl ParentLink {
    /// Reports ready and waits for the parent to commit (or to vanish, which leaves this process in charge).
    pub(crate) fn ready(mut self, commit_timeout: Duration) -> Result<()> {
        let init_usec = u64::try_from(self.greeted.elapsed().as_micros()).unwrap_or(u64::MAX);
        let deadline = Instant::now() + commit_timeout;
        if let Some(nice) = self.restore_nice {
            // Started at idle priority for a background initialisation: every thread back to normal first,
            // or this process would serve at idle priority. If that fails, say so and do not take over.
            if let Err(e) = sys::return_to_normal_scheduling(nice) {
                let reason = format!(
                    "cannot return to normal CPU priority after the background initialisation: {e}"
                );
                let _ = self
                    .channel
                    .send(&Message::Failed(reason.clone()), deadline);
                return Err(Error::with_io(ErrorKind::Environment, reason, e));
            }
        }
        self.channel.send(&Message::Ready { init_usec }, deadline).map_err(|e| {
            Error::new(
                ErrorKind::Channel,
                format!("cannot report ready to the old process (it may have given up on this upgrade): {e}"),
            )
        })?;
        match self.channel.recv(Some(deadline), None)? {
            Event::Message(Message::Commit) => Ok(()),
            Event::Closed => {
                // The parent died between our ready and its commit; nobody else serves now, so we do.
                tracing::warn!(
                    parent_pid = self.parent_pid,
                    "the old process went away before confirming the handover; continuing as the main process"
                );
                Ok(())
            }
            Event::Message(m) => Err(Error::protocol(format!(
                "handover channel: expected commit from the parent, got {}",
                m.name()
            ))),
            Event::Timeout | Event::Extra => Err(Error::new(
                ErrorKind::Channel,
                format!(
                    "the old process did not confirm the handover within {}",
                    crate::error::human_duration(commit_timeout)
                ),
            )),
        }
    }

    /// Reports that initialisation failed.
    pub(crate) fn fail(mut self, reason: &str) -> Result<()> {
        self.channel.send(
            &Message::Failed(reason.to_string()),
            Instant::now() + Duration::from_secs(5),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn connect_refuses_what_is_not_a_channel() {
        let e = connect(1_000_000).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Environment);
        let (r, _w) = sys::pipe().unwrap();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(r);
        let e = connect(raw).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
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

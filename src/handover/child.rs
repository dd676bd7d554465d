//! The new process's side: find the channel, read `Hello`, later report `Ready` (or `Failed`) and wait for
//! `Commit`.

use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::channel::{Also, Channel, Event};
use super::protocol::Message;
use super::Came;
use crate::error::{Error, ErrorKind, Result};
use crate::sys;

/// How long a new process waits for its parent's `Hello`. The parent sends it right after `exec`, so this only
/// bounds a broken parent.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The link from a new process to the old one, until the handover is committed.
#[derive(Debug)]
pub(crate) struct ParentLink {
    channel: Channel,
    watch: ParentWatch,
    /// Started by the old process (an upgrade), or by someone else (a takeover).
    pub(crate) came: Came,
    pub(crate) parent_pid: u32,
    pub(crate) generation: u32,
    pub(crate) started_usec: u64,
    /// When `Hello` arrived: the start of this process's own initialisation, as the parent accounts it.
    greeted: Instant,
    /// Background initialisation: the nice value to return to (at `SCHED_OTHER`) before reporting ready.
    pub(crate) restore_nice: Option<i32>,
}

/// Adopts the connection channel at `raw` (`crate::moving`): a Unix packet socket, made non-blocking.
pub(crate) fn adopt_moves(raw: RawFd, inherited: &mut sys::Inherited) -> Result<OwnedFd> {
    let var = super::env::VAR_MOVES_FD;
    let fd: OwnedFd = inherited.adopt(raw).map_err(|e| {
        Error::with_io(
            ErrorKind::Environment,
            format!("{var}={raw} names a descriptor that is not open"),
            e,
        )
    })?;
    check_moves(fd, &format!("{var}={raw}"))
}

/// Checks that `fd` (`what`) is the connection channel (a Unix packet socket) and makes it non-blocking.
pub(crate) fn check_moves(fd: OwnedFd, what: &str) -> Result<OwnedFd> {
    match sys::socket_info(fd.as_fd()) {
        Ok(Some(i))
            if i.domain == sys::AddressFamily::UNIX && i.ty == sys::SocketType::SEQPACKET => {}
        _ => {
            return Err(Error::env(format!(
                "{what} is {}, not the connection channel",
                crate::listen::describe(fd.as_fd())
            )))
        }
    }
    sys::set_cloexec(fd.as_fd(), true)
        .and_then(|()| sys::set_nonblocking(fd.as_fd(), true))
        .map_err(|e| Error::io("cannot set up the connection channel", e))?;
    Ok(fd)
}

/// Adopts the channel at `raw` and reads `Hello`. Returns the link and the application state.
pub(crate) fn connect(raw: RawFd, inherited: &mut sys::Inherited) -> Result<(ParentLink, Vec<u8>)> {
    let fd: OwnedFd = inherited.adopt(raw).map_err(|e| {
        Error::with_io(
            ErrorKind::Environment,
            format!(
                "{}={raw} names a descriptor that is not open",
                super::env::VAR_FD
            ),
            e,
        )
    })?;
    greet(fd, &format!("{}={raw}", super::env::VAR_FD), Came::Spawned)
}

/// Checks that `fd` (`what`) is the handover channel and reads `Hello` on it. Returns the link and the
/// application state.
pub(crate) fn greet(fd: OwnedFd, what: &str, came: Came) -> Result<(ParentLink, Vec<u8>)> {
    match sys::socket_info(fd.as_fd()) {
        Ok(Some(i)) if i.domain == sys::AddressFamily::UNIX && i.ty == sys::SocketType::STREAM => {}
        _ => {
            return Err(Error::env(format!(
                "{what} is {}, not the handover channel",
                crate::listen::describe(fd.as_fd())
            )))
        }
    }
    sys::set_cloexec(fd.as_fd(), true)
        .map_err(|e| Error::io("cannot set close-on-exec on the channel", e))?;
    let mut channel = Channel::new(UnixStream::from(fd))?;
    let deadline = Instant::now() + HELLO_TIMEOUT;
    let hello = match channel.recv(Some(deadline), Also::NOTHING) {
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
                watch: ParentWatch::start(&channel, parent_pid, came)?,
                channel,
                came,
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
        Event::Timeout | Event::Ended | Event::Stop => Err(Error::new(
            ErrorKind::Channel,
            "the old process sent nothing on the handover channel within 10 s",
        )),
    }
}

impl ParentLink {
    /// Reports ready and waits for the parent to commit (or to vanish, which leaves this process in charge).
    /// With `keep` (the parent watches this process through a probation window) the channel is returned after
    /// the commit, to tell the parent of a stop and to hear that the window passed.
    pub(crate) fn ready(mut self, commit_timeout: Duration, keep: bool) -> Result<Option<Channel>> {
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
        // Read now, while the old process certainly lives (it waits for this report): once it has committed it
        // may exit within a millisecond, before this process gets to read them.
        let parent_ways = (self.came == Came::Spawned).then(|| ParentWays::read(self.parent_pid));
        self.watch.reporting();
        self.channel.send(&Message::Ready { init_usec }, deadline).map_err(|e| {
            Error::new(
                ErrorKind::Channel,
                format!("cannot report ready to the old process (it may have given up on this upgrade): {e}"),
            )
        })?;
        match self.channel.recv(Some(deadline), Also::NOTHING)? {
            Event::Message(Message::Commit) => {
                self.watch.stop();
                if let Some(ways) = parent_ways {
                    ways.adopt();
                }
                Ok(keep.then_some(self.channel))
            }
            Event::Message(Message::Failed(why)) => Err(Error::new(
                ErrorKind::TakeoverRefused,
                format!(
                    "the old process (pid {}) gave up on this handover: {why}",
                    self.parent_pid
                ),
            )),
            Event::Closed => {
                // The old process died between our ready and its commit. It never handed over: this process
                // must not become a second, unmanaged server (under systemd, Restart= brings the service back
                // with the sockets systemd holds).
                end_this_process(
                    self.came,
                    self.parent_pid,
                    "before confirming the handover",
                    None,
                )
            }
            Event::Message(m) => Err(Error::protocol(format!(
                "handover channel: expected commit from the parent, got {}",
                m.name()
            ))),
            Event::Timeout | Event::Ended | Event::Stop => Err(Error::new(
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

/// What a committed new process takes over from the old one: its process group (where a terminal's Ctrl-C or
/// a `kill` of the group reaches the service as before the upgrade) and its OOM score.
struct ParentWays {
    group: std::io::Result<u32>,
    oom_score_adj: std::io::Result<String>,
}

impl ParentWays {
    fn read(parent_pid: u32) -> ParentWays {
        ParentWays {
            group: sys::getpgid(Some(parent_pid)),
            oom_score_adj: std::fs::read_to_string(format!("/proc/{parent_pid}/oom_score_adj")),
        }
    }

    /// Once committed.
    fn adopt(self) {
        match self.group.and_then(sys::join_process_group) {
            Ok(()) => {}
            Err(e) => tracing::debug!(error = %e, "staying in this process's own process group"),
        }
        let score = self
            .oom_score_adj
            .and_then(|s| std::fs::write("/proc/self/oom_score_adj", s.trim()));
        if let Err(e) = score {
            tracing::warn!(
                error = %e,
                "cannot take the old process's oom_score_adj; this process stays the OOM killer's preferred victim"
            );
        }
    }
}

/// Ends this process because the old process went away (or gave up on it, for `why`) `when`. A process the
/// old one started ends everything it started too (its process group: see `sys::spawn`; only when it leads
/// that group). A taker's group is not this library's: it exits alone, with [`crate::EXIT_TAKEOVER_FAILED`],
/// having said why (under systemd, in its unit's status too).
pub(crate) fn end_this_process(came: Came, parent_pid: u32, when: &str, why: Option<&str>) -> ! {
    match came {
        Came::Spawned => {
            tracing::error!(
                parent_pid,
                "the old process went away {when}; exiting with everything this process started, so as not to \
                 serve unmanaged (under systemd, Restart= starts the service again)"
            );
            if sys::getpgid(None).ok() == Some(std::process::id()) {
                let _ = sys::kill_own_process_group();
            }
        }
        Came::TookOver => {
            let why = why.unwrap_or("it went away");
            let line = format!(
                "takeover failed: the process serving before (pid {parent_pid}) ended the handover {when}: {why}"
            );
            tracing::error!("{line}; exiting (the old process serves on, if it lives)");
            let told = crate::notify::Notifier::from_env().and_then(|n| match n {
                Some(n) => n.notify(&[crate::notify::State::Status(&crate::systemd::one_line(
                    &line,
                ))]),
                None => Ok(()),
            });
            if let Err(e) = told {
                tracing::debug!(error = %e, "cannot tell the service manager why");
            }
            std::process::exit(i32::from(crate::EXIT_TAKEOVER_FAILED))
        }
    }
    std::process::exit(1)
}

/// Watches the channel from a thread of its own until the handover is committed: if the old process dies
/// while this one initialises (the channel hangs up), this process ends itself and what it started, rather
/// than become a server nobody manages. The channel's end of file is how it learns (a parent-death signal
/// would follow the old process's spawning thread, which ends with every upgrade, not the old process).
#[derive(Debug)]
struct ParentWatch {
    /// Closing it (drop) ends the watch.
    stop: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Set once `ready` reports and waits for the commit: the watch then leaves the verdict to it.
    reporting: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ParentWatch {
    fn start(channel: &Channel, parent_pid: u32, came: Came) -> Result<ParentWatch> {
        let fd = channel.watch_fd()?;
        // A taker reads the old process's reason, if it gave one, from its own copy of the channel.
        let mut reader = match came {
            Came::TookOver => Some(channel.duplicate()?),
            Came::Spawned => None,
        };
        let (stop_read, stop_write) =
            sys::pipe().map_err(|e| Error::io("cannot create the parent watch's pipe", e))?;
        let reporting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = reporting.clone();
        let thread = std::thread::Builder::new()
            .name("exuvia-parent-watch".into())
            .spawn(move || {
                let mut set = sys::PollSet::new();
                let channel = set.add(fd.as_fd(), sys::PollFlags::RDHUP);
                let stop = set.readable(stop_read.as_fd());
                loop {
                    match set.wait(None) {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot watch the old process; continuing without");
                            return;
                        }
                    }
                    if set.fired(stop) {
                        return;
                    }
                    if set.fired(channel) {
                        // `ready` owns the verdict once it reports; before that, nobody would notice.
                        if !r.load(std::sync::atomic::Ordering::SeqCst) {
                            let why = reader.as_mut().and_then(|c| {
                                let soon = Instant::now() + Duration::from_millis(100);
                                match c.recv(Some(soon), Also::NOTHING) {
                                    Ok(Event::Message(Message::Failed(why))) => Some(why),
                                    _ => None,
                                }
                            });
                            end_this_process(
                                came,
                                parent_pid,
                                "while this process was initialising",
                                why.as_deref(),
                            );
                        }
                        return;
                    }
                }
            })
            .map_err(|e| Error::io("cannot start the thread that watches the old process", e))?;
        Ok(ParentWatch {
            stop: Some(stop_write),
            thread: Some(thread),
            reporting,
        })
    }

    /// From now on `ready` decides what the channel's end means.
    fn reporting(&self) {
        self.reporting
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn stop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ParentWatch {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_refuses_what_is_not_a_channel() {
        let mut inherited = sys::Inherited::for_test();
        let e = connect(1_000_000, &mut inherited).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Environment);
        let (r, _w) = sys::pipe().unwrap();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(r);
        let e = connect(raw, &mut inherited).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
    }
}

//! The old process's side: start the new binary with the sockets and wait for its verdict.

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::channel::{Also, Channel, Event};
use super::probation::{self, QueueWatch, Stalled};
use super::protocol::Message;
pub(crate) use super::Came;
use crate::error::{Error, ErrorKind, Result};
use crate::sys::{self, PollSet, SpawnPlan};

/// What to start.
#[derive(Debug)]
pub(crate) struct Launch<'a> {
    pub(crate) program: &'a Path,
    /// Full argv, argv[0] included.
    pub(crate) argv: &'a [OsString],
    pub(crate) extra_env: &'a [(OsString, OsString)],
    pub(crate) generation: u32,
    /// Whether this process feeds a systemd watchdog: then the child gets `WATCHDOG_PID=<its own pid>`;
    /// otherwise no watchdog variable reaches it.
    pub(crate) watchdog: bool,
    /// When the upgrade started (`CLOCK_MONOTONIC`, µs), passed on in `Hello`.
    pub(crate) started_usec: u64,
    /// Background initialisation: start the child at `SCHED_IDLE`, to return to `SCHED_OTHER` at this nice
    /// value before it reports ready.
    pub(crate) background: Option<i32>,
    /// The probation window after the commit (zero: none), told to the new process.
    pub(crate) probation: Duration,
}

/// A started child that has not yet been committed. Dropping it kills (and reaps, if it is this process's
/// child) the new process, so no error path can leave a half-started process behind.
#[derive(Debug)]
pub(crate) struct PendingChild {
    pid: u32,
    came: Came,
    hold: Hold,
    channel: Channel,
    /// This process's end of the connection channel (`crate::moving`), until the commit takes it.
    moves: Option<OwnedFd>,
    done: bool,
}

/// This process's hold on the new process: how it learns of its end, and whether it can signal it.
#[derive(Debug)]
pub(crate) struct Hold {
    /// Readable once the process has ended. `None` only for a taker in another PID namespace on a kernel
    /// without `SO_PEERPIDFD` (before 6.5): the end of the channel, which only it holds, is then the sign.
    pub(crate) pidfd: Option<OwnedFd>,
    /// Whether signals reach it: a process of this PID namespace (or one below it). A taker in a sibling
    /// namespace (another container) can only be told, on the channel.
    pub(crate) signals: bool,
}

impl Hold {
    fn ended_fd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|f| f.as_fd())
    }

    /// Waits until `deadline` for the process's end: its pidfd, else the channel's hang-up.
    fn wait_ended(&self, channel: &Channel, deadline: Instant) -> bool {
        let watch;
        let mut set = PollSet::new();
        match self.ended_fd() {
            Some(fd) => {
                set.readable(fd);
            }
            None => {
                let Ok(fd) = channel.watch_fd() else {
                    return false;
                };
                watch = fd;
                set.add(watch.as_fd(), sys::PollFlags::RDHUP);
            }
        }
        set.wait(Some(deadline)).unwrap_or(false)
    }

    /// SIGKILL, where signals reach.
    fn kill(&self, pid: u32) {
        match (&self.pidfd, self.signals) {
            (Some(fd), true) => {
                if let Err(e) = sys::kill_pidfd(fd.as_fd()) {
                    tracing::warn!(pid, error = %e, "cannot kill the new process");
                }
            }
            _ => tracing::warn!(
                pid,
                "the new process is in another PID namespace: it was told to go, and cannot be killed from here"
            ),
        }
    }

    fn try_clone(&self) -> std::io::Result<Hold> {
        Ok(Hold {
            pidfd: self.pidfd.as_ref().map(OwnedFd::try_clone).transpose()?,
            signals: self.signals,
        })
    }
}

/// Builds the child's environment: this process's, minus the fd-passing variables, plus `extra_env`, plus
/// fresh `LISTEN_*` and handover variables whose pids are filled in after fork.
fn plan(launch: &Launch<'_>, names: &[&str]) -> Result<SpawnPlan> {
    let bad = |e| Error::with_io(ErrorKind::Spawn, "cannot prepare the new process", e);
    let mut plan = SpawnPlan::new(launch.program, launch.argv).map_err(bad)?;
    for (k, v) in std::env::vars_os() {
        if super::env::is_ours(&k) || launch.extra_env.iter().any(|(ek, _)| *ek == k) {
            continue;
        }
        // A watchdog variable names one process; it is set anew below for the child, or not at all.
        if k == crate::systemd::VAR_WATCHDOG_PID
            || (k == crate::systemd::VAR_WATCHDOG_USEC && !launch.watchdog)
        {
            continue;
        }
        plan.env(k.as_bytes(), v.as_bytes()).map_err(bad)?;
    }
    for (k, v) in launch.extra_env {
        if super::env::is_ours(k) {
            return Err(Error::new(
                ErrorKind::Spawn,
                format!("{k:?} is managed by exuvia and cannot be set for the new process"),
            ));
        }
        plan.env(k.as_bytes(), v.as_bytes()).map_err(bad)?;
    }
    super::env::Offer {
        sockets: names,
        generation: launch.generation,
        watchdog: launch.watchdog,
        probation: launch.probation,
        nice: launch.background,
    }
    .write(&mut plan)
    .map_err(bad)?;
    if launch.background.is_some() {
        plan.idle = true;
    }
    Ok(plan)
}

/// The error for a failed spawn, by the step that failed.
fn spawn_error(program: &Path, sockets: usize, e: sys::SpawnError) -> Error {
    let errno = e.error.raw_os_error();
    match e.step {
        sys::SpawnStep::Exec => Error::exec(program, e.error),
        sys::SpawnStep::PlaceFds => Error::with_io(
            ErrorKind::Spawn,
            format!(
                "cannot place the {sockets} inherited descriptors in the new process (raise LimitNOFILE= if \
                 descriptors ran out)"
            ),
            e.error,
        ),
        sys::SpawnStep::Priority => Error::with_io(
            ErrorKind::Spawn,
            "cannot start the new process at idle CPU priority (background initialisation)",
            e.error,
        ),
        sys::SpawnStep::Start if errno == Some(libc::EAGAIN) || errno == Some(libc::ENOMEM) => {
            Error::with_io(
                ErrorKind::Spawn,
                "cannot fork the new process (out of memory or process limit, e.g. TasksMax=)",
                e.error,
            )
        }
        sys::SpawnStep::Start => {
            Error::with_io(ErrorKind::Spawn, "cannot start the new process", e.error)
        }
    }
}

/// Forks and executes the new binary with `sockets` at fds 3.. and the handover channel after them, then sends
/// it `Hello` with `state`.
pub(crate) fn start(
    launch: &Launch<'_>,
    sockets: &[(&str, BorrowedFd<'_>)],
    state: Vec<u8>,
    deadline: Instant,
) -> Result<PendingChild> {
    let names: Vec<&str> = sockets.iter().map(|(n, _)| *n).collect();
    let mut plan = plan(launch, &names)?;
    let (ours, theirs) = UnixStream::pair()
        .map_err(|e| Error::io("cannot create the handover channel (socketpair)", e))?;
    let (moves, moves_theirs) = sys::packet_pair()
        .map_err(|e| Error::io("cannot create the connection channel (socketpair)", e))?;
    let mut fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|(_, fd)| *fd).collect();
    fds.push(theirs.as_fd());
    fds.push(moves_theirs.as_fd());
    let pid = match sys::spawn(&mut plan, &fds) {
        Ok(pid) => pid,
        Err(e) => return Err(spawn_error(launch.program, fds.len(), e)),
    };
    drop(theirs);
    drop(moves_theirs);
    // (The new process runs at oom_score_adj 1000, the OOM killer's first choice, from before its exec: see
    // `sys::spawn`. It returns to this process's score at commit.)
    tracing::info!(
        child_pid = pid,
        program = %launch.program.display(),
        sockets = names.len(),
        generation = launch.generation,
        "upgrade: child spawned"
    );
    for (i, name) in names.iter().enumerate() {
        tracing::debug!(child_pid = pid, fd = 3 + i, name, "upgrade: passing socket");
    }
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = sys::kill_process(pid);
            let _ = sys::waitpid(pid, false);
            return Err(Error::io(
                "pidfd_open failed (exuvia needs Linux 5.3 or newer to watch the new process)",
                e,
            ));
        }
    };
    let channel = match Channel::new(ours) {
        Ok(c) => c,
        Err(e) => {
            let _ = sys::kill_process(pid);
            let _ = sys::waitpid(pid, false);
            return Err(e);
        }
    };
    let mut child = PendingChild {
        pid,
        came: Came::Spawned,
        hold: Hold {
            pidfd: Some(pidfd),
            signals: true,
        },
        channel,
        moves: Some(moves),
        done: false,
    };
    let hello = Message::Hello {
        parent_pid: std::process::id(),
        generation: launch.generation,
        started_usec: launch.started_usec,
        state,
    };
    child.greet(&hello, deadline)?;
    Ok(child)
}

impl PendingChild {
    /// A process that took the service over (see [`super::takeover`]), watched through `hold`.
    pub(crate) fn taker(pid: u32, hold: Hold, channel: Channel, moves: OwnedFd) -> PendingChild {
        PendingChild {
            pid,
            came: Came::TookOver,
            hold,
            channel,
            moves: Some(moves),
            done: false,
        }
    }

    /// Sends `Hello`; a new process that exited before reading it explains itself better than the broken pipe.
    pub(crate) fn greet(&mut self, hello: &Message, deadline: Instant) -> Result<()> {
        if let Err(e) = self.channel.send(hello, deadline) {
            return Err(self.fail_with(e));
        }
        Ok(())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn came(&self) -> Came {
        self.came
    }

    pub(crate) fn has_exited(&self) -> bool {
        self.hold.wait_ended(&self.channel, Instant::now())
    }

    /// Kills (if still running) and reaps the child, returning how it ended. Everything it started dies with
    /// it: its process group (see [`sys::spawn`]) is killed too.
    ///
    /// A taker is not this process's child: it gets the reason on the channel (`Failed`), which its own watch
    /// reports before it exits (under systemd, in its unit's status), and a second to go; then SIGKILL through
    /// its pidfd (only that process: its group is its own business). No exit status is ours to read.
    fn kill_and_reap(&mut self) -> Option<std::process::ExitStatus> {
        self.end_with("the takeover failed (the old process's log says why)")
    }

    /// Ends the handover with a taker for `why` (told to it), or kills and reaps a spawned child.
    fn end_with(&mut self, why: &str) -> Option<std::process::ExitStatus> {
        self.done = true;
        if self.came == Came::TookOver {
            self.give_up_on_taker(why);
            return None;
        }
        // The group id is the child's pid, which cannot be reused before the child is reaped below.
        let _ = sys::kill_process_group(self.pid);
        let _ = sys::kill_process(self.pid);
        // An error is ECHILD: the application set SIGCHLD to SIG_IGN and the kernel reaped it already.
        sys::waitpid(self.pid, false).unwrap_or_default()
    }

    /// Tells a taker why this process gives up on it, closes the channel, and kills it if it has not exited
    /// within a second.
    fn give_up_on_taker(&mut self, why: &str) {
        let now = Instant::now();
        let _ = self.channel.send(
            &Message::Failed(why.to_string()),
            now + Duration::from_millis(100),
        );
        // The channel's hang-up cannot tell once it is shut here: without a pidfd, the taker's own watch
        // (which exits when told) is all there is.
        let ended = match self.hold.ended_fd() {
            Some(_) => {
                self.channel.shut();
                self.hold
                    .wait_ended(&self.channel, now + Duration::from_secs(1))
            }
            None => {
                let ended = self
                    .hold
                    .wait_ended(&self.channel, now + Duration::from_secs(1));
                self.channel.shut();
                ended
            }
        };
        if !ended {
            self.hold.kill(self.pid);
        }
    }

    /// Turns a failure into the most telling error: if the child has exited, its exit status; otherwise `e`,
    /// after killing it.
    fn fail_with(&mut self, e: Error) -> Error {
        if self.has_exited() {
            if let Some(status) = self.kill_and_reap() {
                return Error::child_exited(status);
            }
            if self.came == Came::TookOver {
                return self.taker_exited();
            }
        }
        self.end_with(&e.to_string());
        e
    }

    /// A taker ended before it reported ready (its status is its own parent's to read).
    fn taker_exited(&self) -> Error {
        Error::new(
            ErrorKind::ChildExited,
            format!(
                "the taking process (pid {}) exited during its initialisation (its own log, or its unit's \
                 status, says why)",
                self.pid
            ),
        )
    }

    /// Waits for `Ready` and returns the child's own initialisation time as it reported it. Any other outcome
    /// kills and reaps the child and is returned as an error. `tick` runs at least every `tick_every` while
    /// waiting (to feed a watchdog). `stop`, when it turns readable, abandons the upgrade at once (this
    /// process is stopping).
    pub(crate) fn await_ready(
        &mut self,
        timeout: Duration,
        tick_every: Duration,
        stop: Option<BorrowedFd<'_>>,
        tick: &mut dyn FnMut(),
    ) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            let next_tick = (Instant::now() + tick_every).min(deadline);
            let also = Also {
                ended: self.hold.ended_fd(),
                stop,
            };
            let event = match self.channel.recv(Some(next_tick), also) {
                Ok(ev) => ev,
                Err(e) => return Err(self.fail_with(e)),
            };
            match event {
                Event::Message(Message::Ready { init_usec }) => {
                    return Ok(Duration::from_micros(init_usec))
                }
                Event::Message(Message::Failed(reason)) => {
                    self.end_with("it reported a failure");
                    let who = match self.came {
                        Came::Spawned => "child".to_string(),
                        Came::TookOver => format!("the taking process (pid {})", self.pid),
                    };
                    return Err(Error::new(
                        ErrorKind::ChildFailed,
                        format!("{who} reported failure during initialisation: {reason}"),
                    ));
                }
                Event::Message(other) => {
                    let e = Error::protocol(format!(
                        "handover channel: unexpected {} message from the child",
                        other.name()
                    ));
                    return Err(self.fail_with(e));
                }
                Event::Stop => {
                    self.end_with(
                        "the old process is stopping: the service stops, nothing to take over",
                    );
                    return Err(Error::new(
                        ErrorKind::Finishing,
                        "upgrade abandoned: this process is stopping (the new process was killed)",
                    ));
                }
                Event::Ended => {
                    let status = self.kill_and_reap();
                    return Err(match status {
                        Some(s) => Error::child_exited(s),
                        None if self.came == Came::TookOver => self.taker_exited(),
                        None => {
                            Error::new(ErrorKind::ChildExited, "child exited during initialisation")
                        }
                    });
                }
                Event::Closed => {
                    // The channel closes as the child exits; its pidfd turns readable a moment later. Wait a
                    // bounded time for that to report the exit status rather than a bare "closed".
                    let exited = match self.hold.ended_fd() {
                        Some(fd) => {
                            let mut set = PollSet::new();
                            set.readable(fd);
                            set.wait(Some(Instant::now() + Duration::from_secs(2)))
                                .unwrap_or(false)
                        }
                        // Only it held the other end.
                        None => true,
                    };
                    let status = self.kill_and_reap();
                    return Err(match (exited, status) {
                        (true, Some(s)) => Error::child_exited(s),
                        (true, None) if self.came == Came::TookOver => self.taker_exited(),
                        _ => Error::new(
                            ErrorKind::Channel,
                            "child closed the handover channel without reporting ready; killed",
                        ),
                    });
                }
                Event::Timeout => {
                    if Instant::now() >= deadline {
                        if self.came == Came::TookOver {
                            let why = format!(
                                "it did not report ready within {} (the running process's ready timeout: raise \
                                 it there if this initialisation is legitimately slow)",
                                crate::error::human_duration(timeout)
                            );
                            self.end_with(&why);
                            return Err(Error::new(
                                ErrorKind::ReadyTimeout,
                                format!(
                                    "the taking process (pid {}): {why}; it was told and ended",
                                    self.pid
                                ),
                            ));
                        }
                        self.kill_and_reap();
                        return Err(Error::ready_timeout(timeout));
                    }
                    tick();
                }
            }
        }
    }

    /// Tells the child it is now the main process. After this the child is on its own: it is no longer killed
    /// when this value is dropped. The returned handle watches it during a probation window.
    pub(crate) fn commit(mut self) -> Result<CommittedChild> {
        // The OOM score returns to this process's before the commit, not only when the child gets to it after:
        // whoever learns of the commit (a reload's verdict) finds the main process's score in place.
        // (A taker keeps its own: its unit's OOMScoreAdjust=, not this one's.)
        let score = match self.came {
            Came::Spawned => std::fs::read_to_string("/proc/self/oom_score_adj").and_then(|s| {
                std::fs::write(format!("/proc/{}/oom_score_adj", self.pid), s.trim())
            }),
            Came::TookOver => Ok(()),
        };
        if let Err(e) = score {
            tracing::debug!(child_pid = self.pid, error = %e, "cannot return the new process's oom_score_adj to this process's; it takes it itself once committed");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        if let Err(e) = self.channel.send(&Message::Commit, deadline) {
            return Err(self.fail_with(e));
        }
        if self.has_exited() {
            let status = self.kill_and_reap();
            return Err(match status {
                Some(s) => Error::new(
                    ErrorKind::ChildExited,
                    format!(
                        "child ended right after reporting ready ({s}); keeping the old process"
                    ),
                ),
                None => Error::new(
                    ErrorKind::ChildExited,
                    "child ended right after reporting ready",
                ),
            });
        }
        self.done = true;
        let keep = || -> Result<(Hold, Channel)> {
            let hold = self
                .hold
                .try_clone()
                .map_err(|e| Error::io("cannot keep a handle on the new process", e))?;
            Ok((hold, self.channel.duplicate()?))
        };
        let (hold, channel) = keep()?;
        Ok(CommittedChild {
            pid: self.pid,
            came: self.came,
            hold,
            channel,
            moves: self.moves.take(),
        })
    }

    /// Abandons the handover: kills and reaps the child (tells a taker why, then ends it).
    pub(crate) fn abort(mut self, why: &str) {
        self.end_with(why);
    }

    /// After a background initialisation: checks that every thread of the child is back at `SCHED_OTHER`
    /// (a new program that does not know the convention would stay at idle priority for good); kills it
    /// otherwise.
    pub(crate) fn check_normal_priority(&mut self) -> Result<()> {
        let verdict = match sys::thread_policies(self.pid) {
            Ok(threads) => match threads.iter().find(|(_, p)| *p != sys::Policy::Other) {
                None => return Ok(()),
                Some((tid, p)) => format!(
                    "the new process did not return to normal CPU priority after its background \
                     initialisation (thread {tid} has policy {p}); does it use this version of exuvia?"
                ),
            },
            Err(e) => format!(
                "cannot check the new process's CPU priority after its background initialisation: {e}"
            ),
        };
        self.kill_and_reap();
        Err(Error::new(ErrorKind::ChildFailed, verdict))
    }
}

/// A committed child: the main process now. This process watches it only during a probation window, over
/// the channel (kept open for that: the child says `Stopping` on it before a stop can end it) and its pidfd.
#[derive(Debug)]
pub(crate) struct CommittedChild {
    pid: u32,
    came: Came,
    hold: Hold,
    channel: Channel,
    /// This process's end of the connection channel, until taken to move connections.
    moves: Option<OwnedFd>,
}

/// How a probation window ended for the committed child.
#[derive(Debug)]
pub(crate) enum Watched {
    /// The window passed with the child alive (it has been told).
    Passed,
    /// The child ended within the window without having said it was stopping: a crash, whatever its status.
    Crashed {
        /// How, for the logs and the verdict ("exited with status 0", "was killed by SIGKILL", ...).
        how: String,
    },
    /// The child stopped accepting: a listener's queue was held for the stall time. It has been killed.
    Stalled(Stalled),
    /// The child said a stop reached it (`exuvia-ctl stop`, a SIGTERM): this process stops too.
    SuccessorStopping,
    /// `stop` turned readable first: this process is stopping.
    Stopped,
}

impl CommittedChild {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn came(&self) -> Came {
        self.came
    }

    /// This process's end of the connection channel (once).
    pub(crate) fn take_moves(&mut self) -> Option<OwnedFd> {
        self.moves.take()
    }

    /// Watches the child until `deadline`, its end (reaped then, if this process still can), its `Stopping`
    /// message, `stop` turning readable, or a listener of `queues` held for the stall time (the child is then
    /// killed and reaped).
    pub(crate) fn watch(
        &mut self,
        deadline: Instant,
        stop: BorrowedFd<'_>,
        queues: &mut QueueWatch,
    ) -> Watched {
        let mut channel_open = true;
        loop {
            let now = Instant::now();
            if now >= deadline {
                let _ = self
                    .channel
                    .send(&Message::Passed, now + Duration::from_secs(1));
                return Watched::Passed;
            }
            if let Some(stalled) = queues.sample(now) {
                self.kill_and_reap();
                return Watched::Stalled(stalled);
            }
            let next = if queues.is_empty() {
                deadline
            } else {
                (now + probation::SAMPLE_EVERY).min(deadline)
            };
            let event = if channel_open {
                let also = Also {
                    ended: self.hold.ended_fd(),
                    stop: Some(stop),
                };
                self.channel.recv(Some(next), also)
            } else {
                let Some(pidfd) = self.hold.ended_fd() else {
                    // A taker without a pidfd: only it held the channel's other end.
                    return Watched::Crashed {
                        how: "ended (its channel closed; no pidfd for a process in another PID namespace on \
                              this kernel)"
                            .into(),
                    };
                };
                let mut set = PollSet::new();
                let ended = set.readable(pidfd);
                let stopped = set.readable(stop);
                match set.wait(Some(next)) {
                    Ok(false) => Ok(Event::Timeout),
                    Ok(true) if set.fired(ended) => Ok(Event::Ended),
                    Ok(true) if set.fired(stopped) => Ok(Event::Stop),
                    Ok(true) => Ok(Event::Timeout),
                    Err(e) => Err(Error::io("poll failed", e)),
                }
            };
            match event {
                Ok(Event::Timeout) => {}
                Ok(Event::Message(Message::Stopping)) => return Watched::SuccessorStopping,
                Ok(Event::Message(m)) => {
                    tracing::warn!(
                        child_pid = self.pid,
                        message = m.name(),
                        "unexpected message from the new process during its probation; ignored"
                    );
                }
                // The child closed its end (it exited, or a build that keeps no channel): its pidfd decides.
                Ok(Event::Closed) => channel_open = false,
                Ok(Event::Stop) => return Watched::Stopped,
                Ok(Event::Ended) => {
                    return Watched::Crashed {
                        how: self.reap_ended(),
                    }
                }
                Err(e) => {
                    tracing::warn!(child_pid = self.pid, error = %e, "the handover channel failed during the probation; watching the new process's pid only");
                    channel_open = false;
                }
            }
        }
    }

    /// Reaps the child, which has ended; how it ended, in words.
    fn reap_ended(&self) -> String {
        if self.came == Came::TookOver {
            return "exited (not this process's child: its own parent, systemd say, has its status)".into();
        }
        match sys::waitpid(self.pid, false) {
            Ok(Some(status)) => crate::error::exit_description(status),
            // Reaped by someone else: the application set SIGCHLD to SIG_IGN, or runs its own reaper. Ended
            // all the same (its pidfd says so), without having said it was stopping.
            Ok(None) | Err(_) => {
                "ended (its exit status was not ours to read: SIGCHLD ignored, or another \
                                  reaper in this process)"
                    .to_string()
            }
        }
    }

    /// Kills the child (only the child: after the commit it joined this process's process group) and reaps it.
    fn kill_and_reap(&mut self) {
        if self.came == Came::TookOver {
            // Told first: a taker that cannot be signalled (another PID namespace) exits on it.
            let _ = self.channel.send(
                &Message::Failed(
                    "rolled back: it stopped accepting during its probation window".into(),
                ),
                Instant::now() + Duration::from_millis(100),
            );
            self.hold.kill(self.pid);
            return;
        }
        let _ = sys::kill_process(self.pid);
        let _ = sys::waitpid(self.pid, false);
    }

    /// Tells the child its probation window is over (this process stops without taking the service back).
    pub(crate) fn pass(&mut self) {
        let _ = self
            .channel
            .send(&Message::Passed, Instant::now() + Duration::from_secs(1));
    }

    /// Asks the child to stop (SIGTERM: it drains as on `systemctl stop`).
    pub(crate) fn terminate(&self) {
        let sent = match (&self.hold.pidfd, self.hold.signals) {
            (Some(fd), true) => sys::terminate_pidfd(fd.as_fd()),
            _ => Err(std::io::Error::from_raw_os_error(libc::ESRCH)),
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, pid = self.pid, "cannot ask the new process to stop");
        }
    }
}

impl Drop for PendingChild {
    fn drop(&mut self) {
        if !self.done {
            self.kill_and_reap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_variables_are_never_copied() {
        for v in [
            "LISTEN_FDS",
            "LISTEN_FDNAMES",
            "LISTEN_PID",
            "LISTEN_PIDFDID",
            "EXUVIA_HANDOVER_FD",
            "EXUVIA_X",
        ] {
            assert!(super::super::env::is_ours(std::ffi::OsStr::new(v)), "{v}");
        }
        for v in ["PATH", "LISTEN", "NOTIFY_SOCKET", "LISTEN_FDS_X"] {
            assert!(!super::super::env::is_ours(std::ffi::OsStr::new(v)), "{v}");
        }
    }

    fn start_program(
        program: &str,
        argv: &[&str],
        extra_env: &[(OsString, OsString)],
    ) -> Result<PendingChild> {
        start_program_in(program, argv, extra_env, None)
    }

    fn start_program_in(
        program: &str,
        argv: &[&str],
        extra_env: &[(OsString, OsString)],
        background: Option<i32>,
    ) -> Result<PendingChild> {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        let launch = Launch {
            program: Path::new(program),
            argv: &argv,
            extra_env,
            generation: 1,
            watchdog: false,
            started_usec: 0,
            background,
            probation: Duration::ZERO,
        };
        start(
            &launch,
            &[],
            Vec::new(),
            Instant::now() + Duration::from_secs(5),
        )
    }

    #[test]
    fn a_missing_program_is_a_spawn_error_with_the_path() {
        let e = start_program("/nonexistent/bin/app", &["app"], &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Spawn);
        assert_eq!(
            e.to_string(),
            "cannot execute /nonexistent/bin/app: No such file or directory"
        );
    }

    #[test]
    fn extra_env_cannot_override_managed_variables() {
        let e = start_program("/bin/true", &["true"], &[("LISTEN_FDS".into(), "9".into())])
            .unwrap_err();
        assert!(e.to_string().contains("managed by exuvia"), "{e}");
    }

    #[test]
    fn a_child_that_exits_is_reported_with_its_status() {
        // A child that reads the start of the greeting from the channel (fd 3) and exits 3: the parent must say
        // so and leave no zombie. (Reading first makes sure the greeting was sent before the exit.)
        let script = "head -c 1 <&3 >/dev/null; exit 3";
        let mut child = start_program("/bin/sh", &["sh", "-c", script], &[]).unwrap();
        let pid = child.pid();
        let e = child
            .await_ready(
                Duration::from_secs(10),
                Duration::from_secs(1),
                None,
                &mut || {},
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "child exited with status 3 during initialisation"
        );
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "zombie left behind"
        );
    }

    #[test]
    fn a_child_that_hangs_is_killed_at_the_deadline() {
        let mut child = start_program("/bin/sleep", &["sleep", "30"], &[]).unwrap();
        let pid = child.pid();
        let mut ticks = 0;
        let t0 = Instant::now();
        let e = child
            .await_ready(
                Duration::from_millis(300),
                Duration::from_millis(50),
                None,
                &mut || ticks += 1,
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadyTimeout);
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert!(ticks >= 3, "watchdog tick ran {ticks} times");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "zombie left behind"
        );
    }

    #[test]
    fn a_child_that_stays_at_idle_priority_is_refused() {
        // A new program that does not know the background convention: it reports ready (a valid frame, with
        // an init time of 0) without returning to normal priority. The old process must not hand over to it.
        let nice = sys::scheduling().unwrap().nice;
        let ready = r"printf 'EXUV\001\002\000\000\010\000\000\000\000\000\000\000\000\000\000\000' >&3; sleep 30";
        let mut child = start_program_in("/bin/sh", &["sh", "-c", ready], &[], Some(nice)).unwrap();
        let pid = child.pid();
        let policies = sys::thread_policies(pid).unwrap();
        assert!(
            policies.iter().all(|(_, p)| *p == sys::Policy::Idle),
            "{policies:?}"
        );
        child
            .await_ready(
                Duration::from_secs(10),
                Duration::from_secs(1),
                None,
                &mut || {},
            )
            .unwrap();
        let e = child.check_normal_priority().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ChildFailed);
        assert!(
            e.to_string()
                .contains("did not return to normal CPU priority"),
            "{e}"
        );
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the refused child still exists"
        );
    }
}

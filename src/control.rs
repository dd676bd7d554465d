//! The control socket: lets an operator, or systemd's `ExecReload=`/`ExecStop=` through the `exuvia-ctl`
//! helper, trigger an upgrade or a stop and get the verdict.
//!
//! One request per connection, one line each way:
//!
//! ```text
//! -> exuvia-ctl/1 status            <- ok pid=1234 generation=3 origin=upgrade connections=12 state=serving rollbacks=0 (tracked client connections ...)
//! -> exuvia-ctl/1 upgrade           <- ok upgraded to pid 1240 in 104 ms (its own initialisation 100 ms, handover overhead 3 ms)  |  error child exited with status 3 ...
//! -> exuvia-ctl/1 verdict <usec>    <- the verdict of the upgrade the reload signal started (see below)
//! -> exuvia-ctl/1 stop              <- ok stopping pid 1240 [and pid 1236 (on standby ...)]; the connection then stays open until it exits
//! -> exuvia-ctl/1 config            <- ok drain_ms=30000 ready_ms=30000 probation_ms=0 fd_store=false taken=http:exuvia-control unclaimed= take_over=false
//! ```
//!
//! `status`'s `origin=` is how the process came to serve: `fresh`, `upgrade` (started by its predecessor) or
//! `takeover` (started by someone else, it took the service over). Its `state=` is `starting`, `serving`, `upgrading`, `probation` (a new process serves, this one stands
//! by) or `finishing`; `rollbacks=` counts the upgrades taken back after a probation window, and the last one's
//! reason follows in the parenthesis. Any request may be answered `error busy: ...` when 16 requests already run
//! (`exuvia-ctl` asks again); `error retry: ...` asks the helper to ask again (it then reaches the new process).
//!
//! `verdict` serves `Type=notify-reload` units, where systemd both sends the reload signal and runs
//! `ExecReload=`: the helper must report on the upgrade that signal started, not start another one. `<usec>` is
//! the helper's own `CLOCK_MONOTONIC` start time; the signal was sent before the helper started.
//!
//! The socket file is mode 0600 and the server checks the peer's uid (`SO_PEERCRED`): only the service's own
//! user (or root) may use it. The listening socket is handed over on upgrade like any other, so its path never
//! changes hands.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::drain::{ConnectionGuard, Tracker};
use crate::error::{Error, ErrorKind, Result};
use crate::lifecycle::{Attempts, Finish, Finishing};
use crate::sys::{self, PollSet};

/// The first word of every request: the protocol and its version.
pub const PROTOCOL: &str = "exuvia-ctl/1";
/// The socket's file name in `$RUNTIME_DIRECTORY`.
pub const SOCKET_NAME: &str = "exuvia-control.sock";
/// The name the control socket is handed over under.
pub(crate) const REGISTRY_NAME: &str = "exuvia-control";
const MAX_REQUEST: u64 = 256;

/// `$RUNTIME_DIRECTORY/exuvia-control.sock`, when systemd set `RUNTIME_DIRECTORY` (`RuntimeDirectory=` in the
/// unit); both the service and its `ExecReload=`/`ExecStop=` helpers see the same value.
pub fn default_socket_path() -> Option<PathBuf> {
    let dirs = std::env::var_os("RUNTIME_DIRECTORY")?;
    let first = std::env::split_paths(&dirs).next()?;
    if first.as_os_str().is_empty() {
        return None;
    }
    Some(first.join(SOCKET_NAME))
}

/// Where the control socket of a system service with `RuntimeDirectory=<dir>` is, seen from outside the service
/// (`exuvia-ctl check`, an operator's shell): systemd creates a system service's runtime directories under
/// `/run` (a user service's under `$XDG_RUNTIME_DIR`: pass `--socket` for those).
pub fn socket_path_for_runtime_directory(dir: &str) -> PathBuf {
    Path::new("/run").join(dir).join(SOCKET_NAME)
}

/// At most this many connections wait for their request line at once, all read by the control thread's one
/// `poll` (no thread each): a newcomer beyond it pushes out the one that has waited longest. A helper sends its
/// line as soon as it connects, so it is read in the next round, however many idle or slow connections wait.
const MAX_PENDING: usize = 64;
/// At most this many requests run at once on threads of their own (`upgrade`, `verdict`, `stop`: the ones that
/// wait); more are answered [`BUSY`], which `exuvia-ctl` asks again on, except a `stop`, which is always
/// served. `status` and `config` are answered by the control thread itself and are never busy.
const MAX_RUNNING: usize = 16;
/// The whole request line must arrive within this (a client trickling bytes cannot hold a drain or a stop).
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// The longest reply `request` reads.
const MAX_REPLY: u64 = 64 * 1024;

/// What the control server may do to the process it serves (the upgrader does it).
pub(crate) trait Actions: Send + Sync + 'static {
    /// Runs an upgrade; the reply.
    fn run_upgrade(&self) -> Reply;
    /// Hands the service to the process at the other end of `conn` (a takeover request, its peer checked);
    /// everything it is told goes on `conn` and the channel passed on it.
    fn run_takeover(&self, conn: UnixStream, claimed_pid: u32);
    /// Asks the process to stop.
    fn stop(&self);
    /// The old process that stops with this one (it watches this one through a probation window), if any.
    fn standby(&self) -> Option<u32>;
    /// The process's own settings, as the `config` command answers them.
    fn config(&self) -> Config;
}

/// What the control server knows of the process it serves: its finishing handle, its connection count, and
/// what it may ask it to do. It holds no `Upgrader`.
#[derive(Clone)]
pub(crate) struct Served {
    pub(crate) finishing: Finishing,
    pub(crate) tracker: Tracker,
    pub(crate) generation: u32,
    /// How this process came to serve (`fresh`, `upgrade`, `takeover`), for `status`.
    pub(crate) origin: &'static str,
    /// How long a `verdict` request waits for an upgrade to end.
    pub(crate) verdict_wait: Duration,
    /// When the probation window this process serves through ends (it was started with one): a verdict on
    /// the upgrade that created it is given only then (if it dies first, the old process gives it).
    pub(crate) own_probation_ends: Option<std::time::Instant>,
    pub(crate) actions: std::sync::Arc<dyn Actions>,
}

impl Served {
    /// Waits until `f` says it is done with the attempt record, up to `timeout`.
    fn attempts<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&Attempts) -> Option<T>,
    ) -> Option<T> {
        self.finishing
            .lifecycle()
            .wait(Some(timeout), |c| f(&c.attempts))
    }
}

/// A connection whose request line is still being read.
struct Pending {
    conn: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// What reading a pending connection gave.
enum Got {
    /// Not the whole line yet.
    More,
    /// The request line.
    Line(String),
    /// The client closed, sent too much or something that is not text: answered and dropped.
    Bad(&'static str),
}

impl Pending {
    /// Reads what has arrived, without blocking.
    fn read_some(&mut self) -> Got {
        let mut buf = [0u8; 256];
        loop {
            let want = (MAX_REQUEST as usize)
                .saturating_sub(self.line.len())
                .min(buf.len());
            if want == 0 {
                return Got::Bad("malformed request: send one line of at most 256 bytes");
            }
            match (&self.conn).read(&mut buf[..want]) {
                Ok(0) => {
                    return Got::Bad("malformed request: the connection ended before a whole line")
                }
                Ok(n) => {
                    self.line.extend_from_slice(&buf[..n]);
                    if let Some(end) = self.line.iter().position(|b| *b == b'\n') {
                        self.line.truncate(end + 1);
                        return match String::from_utf8(std::mem::take(&mut self.line)) {
                            Ok(l) => Got::Line(l),
                            Err(_) => Got::Bad("malformed request: not UTF-8"),
                        };
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Got::More,
                Err(_) => return Got::Bad("malformed request: cannot read it"),
            }
        }
    }
}

/// Serves the control socket on a thread of its own until this process is finishing (and every connection
/// that had begun its request by then has its answer).
pub(crate) fn serve(served: Served, listener: UnixListener) {
    // The loop itself counts as in flight until it has ended: a request accepted in the instant before this
    // process started finishing must get its guard before the drain can find nothing to wait for (the drain
    // is not sequenced after this loop, as an application's is after its own).
    let loop_guard = served.tracker.guard();
    let spawned = std::thread::Builder::new()
        .name("exuvia-control".into())
        .spawn(move || {
            if let Err(e) = listener.set_nonblocking(true) {
                tracing::warn!(error = %e, "control socket: cannot make it non-blocking; not serving it");
                return;
            }
            let running = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut pending: std::collections::VecDeque<Pending> = std::collections::VecDeque::new();
            loop {
                if let Some(finish) = served.finishing.get() {
                    // Once finishing, nothing waits for a line still on its way: this process may be about to
                    // exit (and must not be held by a client that never finishes its line).
                    for mut p in pending.drain(..) {
                        match p.read_some() {
                            Got::Line(line) => dispatch(&served, p.conn, &line, &running),
                            Got::Bad(why) => answer(&p.conn, &Reply::Failed(why.to_string())),
                            Got::More => answer(&p.conn, &finishing_reply(finish)),
                        }
                    }
                    break;
                }
                let gate = served.finishing.gate();
                let (accept, ready) = {
                    let mut set = PollSet::new();
                    // The finish and a change of the gate only wake the loop: it looks at the state again.
                    set.readable(served.finishing.fd());
                    set.readable(gate.changed_fd());
                    // On probation the gate is shut: the new process serves the socket meanwhile.
                    let accept = gate.open.then(|| set.readable(listener.as_fd()));
                    let conns: Vec<usize> =
                        pending.iter().map(|p| set.readable(p.conn.as_fd())).collect();
                    let until = pending.iter().map(|p| p.deadline).min();
                    if let Err(e) = set.wait(until) {
                        tracing::warn!(error = %e, "control socket: poll failed; retrying in 100 ms");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    let ready: Vec<bool> = conns.iter().map(|i| set.fired(*i)).collect();
                    (accept.is_some_and(|i| set.fired(i)), ready)
                };
                let now = Instant::now();
                let mut kept = std::collections::VecDeque::with_capacity(pending.len());
                for (mut p, readable) in pending.drain(..).zip(ready) {
                    let read = if readable { p.read_some() } else { Got::More };
                    match read {
                        Got::Line(line) => dispatch(&served, p.conn, &line, &running),
                        Got::Bad(why) => answer(&p.conn, &Reply::Failed(why.to_string())),
                        Got::More if now >= p.deadline => answer(
                            &p.conn,
                            &Reply::Failed(
                                "malformed request: send one line, 'exuvia-ctl/1 <command>', within 2 s".into(),
                            ),
                        ),
                        Got::More => kept.push_back(p),
                    }
                }
                pending = kept;
                if accept {
                    accept_all(&listener, &mut pending);
                }
            }
            drop(loop_guard);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the control socket thread");
    }
}

/// The answer to a request still incomplete when this process started finishing.
fn finishing_reply(finish: Finish) -> Reply {
    let me = std::process::id();
    match finish {
        Finish::Upgraded { child_pid } => Reply::Retry(format!(
            "pid {me} has handed over to pid {child_pid}, which answers on the same socket: ask again"
        )),
        _ => Reply::Failed(format!("pid {me} is stopping")),
    }
}

/// Accepts every connection waiting, into `pending`; when that is full the one that has waited longest is
/// told so and dropped.
fn accept_all(listener: &UnixListener, pending: &mut std::collections::VecDeque<Pending>) {
    loop {
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::ConnectionAborted =>
            {
                continue
            }
            Err(e) => {
                // Out of descriptors (or memory): the next round tries again; do not spin meanwhile.
                tracing::warn!(error = %e, "control socket: accept failed; retrying in 100 ms");
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
        };
        if conn.set_nonblocking(true).is_err() {
            continue;
        }
        if pending.len() >= MAX_PENDING {
            if let Some(oldest) = pending.pop_front() {
                answer(
                    &oldest.conn,
                    &Reply::Busy(
                        "too many control connections waiting for their request; this one waited longest"
                            .into(),
                    ),
                );
            }
        }
        pending.push_back(Pending {
            conn,
            line: Vec::new(),
            deadline: Instant::now() + REQUEST_DEADLINE,
        });
    }
}

/// Writes a short reply without blocking (it fits a fresh connection's socket buffer).
fn answer(conn: &UnixStream, reply: &Reply) {
    let _ = conn.set_nonblocking(true);
    let _ = (&*conn).write_all(format!("{reply}\n").as_bytes());
}

/// Serves one whole request: the quick ones on this thread, the waiting ones on a thread each.
fn dispatch(
    served: &Served,
    conn: UnixStream,
    line: &str,
    running: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::Ordering;
    match sys::peer_uid(conn.as_fd()) {
        Ok(uid) if uid == 0 || uid == sys::euid() => {}
        Ok(uid) => {
            tracing::warn!(uid, "control socket: refused a request from another user");
            answer(
                &conn,
                &Reply::Failed("permission denied: only the service's user may control it".into()),
            );
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "control socket: cannot read the peer's credentials");
            return;
        }
    }
    let command = match Command::parse(line) {
        Ok(c) => c,
        Err(why) => return answer(&conn, &Reply::Failed(why)),
    };
    tracing::info!(%command, "control socket request");
    match command {
        Command::Status => {
            // The drain also counts the control socket's own loop and running requests: leave them out of
            // what an operator calls in flight.
            let control = running.load(Ordering::Acquire) + 1;
            return answer(&conn, &Reply::Ok(status(served, control)));
        }
        Command::Config => return answer(&conn, &Reply::Ok(served.actions.config().to_string())),
        Command::Upgrade | Command::Verdict { .. } | Command::Stop | Command::Takeover { .. } => {}
    }
    // A stop is always served (it is what ExecStop= asks, and nothing else may hold it up); the others wait
    // their turn beyond MAX_RUNNING.
    if running.fetch_add(1, Ordering::AcqRel) >= MAX_RUNNING && command != Command::Stop {
        running.fetch_sub(1, Ordering::AcqRel);
        return answer(
            &conn,
            &Reply::Busy(format!(
                "{MAX_RUNNING} control requests are running; ask again"
            )),
        );
    }
    // Counted like a client connection, so that this process does not exit (after an upgrade it just ran,
    // say) before the reply is written.
    let guard = served.tracker.guard();
    let u = served.clone();
    let done = Done(running.clone());
    let spawned = std::thread::Builder::new()
        .name("exuvia-control-conn".into())
        .spawn(move || {
            let _done = done;
            run(&u, conn, command, guard)
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "control socket: cannot start a thread for a request");
    }
}

/// Counts a request as served when dropped.
struct Done(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The `status` text; `control` is how many of the tracked connections are the control socket's own.
fn status(served: &Served, control: usize) -> String {
    let (state, rollbacks, last) = served.finishing.lifecycle().read(|c| {
        let last = match (&c.attempts.last, c.attempts.last_rolled_back) {
            (Some((_, Err(why))), true) => format!("; last upgrade: {why}"),
            _ => String::new(),
        };
        (c.phase.name(), c.attempts.rollbacks, last)
    });
    format!(
        "pid={} generation={} origin={} connections={} state={state} rollbacks={rollbacks} (tracked client \
         connections open now; control requests not counted{last})",
        std::process::id(),
        served.generation,
        served.origin,
        served.tracker.open().saturating_sub(control)
    )
}

/// Runs a request that waits (`upgrade`, `verdict`, `stop`) and answers it.
fn run(served: &Served, mut conn: UnixStream, command: Command, guard: ConnectionGuard) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_write_timeout(Some(REQUEST_DEADLINE));
    let reply = match command {
        Command::Upgrade => served.actions.run_upgrade(),
        Command::Takeover { pid } => {
            // The answer goes with the sockets; the guard holds this process's drain until the takeover has
            // ended either way.
            served.actions.run_takeover(conn, pid);
            drop(guard);
            return;
        }
        Command::Verdict { since_usec } => verdict(served, since_usec),
        Command::Stop => {
            // The answer first: once the stop is taken, this process may exit at any moment.
            let stopping = StopAnswer {
                pid: std::process::id(),
                standby: served.actions.standby(),
            };
            let _ = conn.write_all(format!("{}\n", Reply::Ok(stopping.to_string())).as_bytes());
            // From here the connection must not hold up the drain: it waits for this process to exit.
            drop(guard);
            served.actions.stop();
            // Hold the connection: it closes when this process exits, which is what the helper waits for
            // (then it waits for every pid named above too).
            let _ = conn.set_read_timeout(None);
            loop {
                match conn.read(&mut [0u8; 1]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    _ => return,
                }
            }
        }
        Command::Status | Command::Config => return,
    };
    let _ = conn.write_all(format!("{reply}\n").as_bytes());
    drop(guard);
}

/// A reload signal is sent right before systemd starts the helper: a SIGHUP received longer than this before
/// the helper started belongs to some other trigger (`kill -HUP`, an earlier reload).
const SIGNAL_LEAD_USEC: u64 = 2_000_000;
/// How long after the helper started its signal may still be on its way to this process's signal thread.
const SIGNAL_GRACE: Duration = Duration::from_secs(1);
/// The start of an `error` reply that asks the helper to ask again (it then reaches the new process).
pub const RETRY: &str = "retry:";
/// The start of an `error` reply from a control socket that has too many requests at once: ask again.
pub const BUSY: &str = "busy:";
/// The start of an `error` reply for an upgrade that a stop abandoned: the operator asked for the stop, so a
/// reload helper ends quietly (as it does when systemd's SIGTERM reaches it first).
pub const STOPPING: &str = "stopping:";

/// Which recorded SIGHUP is the reload's, for a helper that started at `since_usec`: the last one received
/// from `SIGNAL_LEAD_USEC` before to `SIGNAL_GRACE` after it, and not before this process handed over (systemd
/// signals the new main process from then on).
fn reload_sighup(a: &Attempts, since_usec: u64) -> Option<u64> {
    let earliest = since_usec.saturating_sub(SIGNAL_LEAD_USEC);
    let latest = since_usec + SIGNAL_GRACE.as_micros() as u64;
    let floor = a.handed_over_usec.filter(|h| *h <= since_usec).unwrap_or(0);
    a.sighups
        .iter()
        .rev()
        .find(|s| s.at_usec >= earliest.max(floor) && s.at_usec <= latest)
        .map(|s| s.id)
}

/// How long a SIGHUP may stay invisible between the kernel's taking it off the pending set and the handler's
/// noting it: the thread that takes it may be preempted in between, on a busy machine.
const SIGNAL_SETTLE: Duration = Duration::from_millis(50);

/// Whether a SIGHUP is on its way to this process's records: caught by the handler (the count is ahead of
/// the last record's) or still pending. Then the count its record will carry.
fn sighup_on_its_way(served: &Served) -> Option<u64> {
    let caught = sys::sighups_caught();
    let recorded = served
        .attempts(Duration::ZERO, |a| {
            Some(a.sighups.back().map_or(0, |s| s.caught))
        })
        .unwrap_or(0);
    if caught > recorded {
        Some(caught)
    } else if sys::sighup_pending() {
        Some(recorded + 1)
    } else {
        None
    }
}

/// [`sighup_on_its_way`], looked at again after [`SIGNAL_SETTLE`] when not: for the one moment when a SIGHUP
/// is neither pending nor caught (taken off the pending set, its handler not run yet).
fn sighup_on_its_way_settled(served: &Served) -> bool {
    sighup_on_its_way(served).is_some() || {
        std::thread::sleep(SIGNAL_SETTLE);
        sighup_on_its_way(served).is_some()
    }
}

/// The verdict of the upgrade that the reload signal (sent just before `since_usec`) started: each SIGHUP
/// has its own, so a reload never reports another trigger's upgrade.
fn verdict(served: &Served, since_usec: u64) -> Reply {
    let earliest = since_usec.saturating_sub(SIGNAL_LEAD_USEC);
    let wait = served.verdict_wait;
    let me = std::process::id();
    let verdict_of = |id: u64| {
        served
            .attempts(wait, |a| {
                a.sighups.iter().find(|s| s.id == id).map_or(
                    Some(Reply::Failed(
                        "the record of the reload signal was lost".to_string(),
                    )),
                    |s| s.verdict.clone(),
                )
            })
            .unwrap_or_else(|| Reply::Failed("the upgrade did not finish in time".to_string()))
    };
    // A SIGHUP caught but not recorded yet is the reload's (sent before the helper started): wait for its
    // record, or an earlier SIGHUP's would be taken for it.
    if let Some(coming) = sighup_on_its_way(served) {
        served.attempts(SIGNAL_GRACE, |a| {
            a.sighups
                .back()
                .is_some_and(|s| s.caught >= coming)
                .then_some(())
        });
    }
    // The reload's SIGHUP: the last one received around the helper's start.
    if let Some(id) = served
        .attempts(Duration::ZERO, |a| Some(reload_sighup(a, since_usec)))
        .flatten()
    {
        return verdict_of(id);
    }
    // Not that, and this process has handed over: no reload signal comes here any more (systemd sends it to
    // the new main process), and whatever this process received before its handover was some earlier
    // trigger's, or this reload's with the helper late; either way the new process knows (it was born of this
    // reload's upgrade, or it received this reload's signal). The helper asks again and reaches it.
    if served.attempts(Duration::ZERO, |a| Some(a.handed_over_usec.is_some())) == Some(true) {
        return Reply::Retry(format!(
            "pid {me} has handed over; the new process answers for the reload"
        ));
    }
    // Not recorded here yet, but on its way (caught, the signal thread or task has yet to record it; or still
    // pending): it was sent before the helper started, so it is the reload's. Without this a process that an
    // upgrade created a moment ago would take a second reload's signal for the first one's (just below).
    if sighup_on_its_way_settled(served) {
        if let Some(id) = served.attempts(SIGNAL_GRACE, |a| reload_sighup(a, since_usec)) {
            return verdict_of(id);
        }
    }
    // Not received here. This process may be the one the reload's upgrade created: the helper reached it
    // after the old one stopped accepting (the usual case once the upgrade is fast). Answered at once.
    if served.attempts(Duration::ZERO, |a| {
        Some(a.born_of.is_some_and(|b| b >= earliest))
    }) == Some(true)
    {
        if let Some(end) = served.own_probation_ends {
            // The verdict waits for the old process to say the window passed (or to be gone), not for this
            // process's own clock: from then on this process may upgrade, so a reload queued behind this one
            // (systemd runs them one at a time) finds it free. If this process dies first, the helper's
            // connection ends with it and it asks the old process.
            let left = end.saturating_duration_since(Instant::now());
            let passed = served.attempts(left + wait, |a| {
                a.on_probation_under.is_none().then_some(())
            });
            return match passed {
                Some(()) => Reply::Ok(format!("upgraded to pid {me} (its probation passed)")),
                None => Reply::Failed(format!(
                    "pid {me} was still on probation {} ms after its window should have ended",
                    wait.as_millis()
                )),
            };
        }
        return Reply::Ok(format!("upgraded to pid {me}"));
    }
    // The signal may still be on its way to this process's signal thread.
    if let Some(id) = served.attempts(SIGNAL_GRACE, |a| reload_sighup(a, since_usec)) {
        return verdict_of(id);
    }
    // Or an upgrade started another way is handing over right now, and systemd sent the signal to its new
    // process (the main one for systemd from the handover on): once this process has handed over, the
    // helper asks again and reaches the new one.
    served.attempts(wait, |a| a.current.is_none().then_some(()));
    if matches!(served.finishing.get(), Some(Finish::Upgraded { .. })) {
        return Reply::Retry(format!(
            "pid {me} has handed over; the reload signal went to the new process, ask it"
        ));
    }
    Reply::Failed(
        "no upgrade was started by the reload signal (is ReloadSignal= the signal the service upgrades on?)"
            .to_string(),
    )
}

/// A request on the control socket: what `exuvia-ctl` sends and the service understands. `Display` is the
/// wire form (`exuvia-ctl/1 verdict 123`), [`Command::parse`] reads it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// `status`: pid, generation, connections in flight.
    Status,
    /// `upgrade`: start an upgrade now and answer with its verdict.
    Upgrade,
    /// `verdict <usec>`: the verdict of the upgrade a reload signal started, sent before `since_usec`
    /// (`CLOCK_MONOTONIC`, µs: the helper's own start).
    Verdict {
        /// When the asking helper started.
        since_usec: u64,
    },
    /// `stop`: stop gracefully; the connection stays open until the service has exited.
    Stop,
    /// `config`: the service's own settings, for `exuvia-ctl check`: `drain_ms= ready_ms= probation_ms=
    /// fd_store= taken= unclaimed=` (socket names separated by `:`, which a name cannot contain).
    Config,
    /// `takeover <pid>`: sent by a new process built with [`Builder::take_over`](crate::Builder::take_over),
    /// not by `exuvia-ctl`: the answer carries the sockets (`SCM_RIGHTS`), and the handover follows on a
    /// channel passed with them.
    Takeover {
        /// The asking process's own pid, as it sees it: used only where the kernel cannot show its pid (a
        /// process in another PID namespace), in logs and reports.
        pid: u32,
    },
}

impl Command {
    /// Reads one request line (with or without its newline).
    ///
    /// # Errors
    /// The reason, as the service answers it after `error `.
    pub fn parse(line: &str) -> std::result::Result<Command, String> {
        let mut words = line.split_whitespace();
        if words.next() != Some(PROTOCOL) {
            return Err(format!(
                "unsupported protocol: this service speaks {PROTOCOL}"
            ));
        }
        let command = match words.next().unwrap_or("") {
            "status" => Command::Status,
            "upgrade" => Command::Upgrade,
            "verdict" => match words.next().and_then(|t| t.parse::<u64>().ok()) {
                Some(since_usec) => Command::Verdict { since_usec },
                None => return Err("verdict needs the helper's start time".to_string()),
            },
            "stop" => Command::Stop,
            "config" => Command::Config,
            "takeover" => match words.next().and_then(|t| t.parse::<u32>().ok()) {
                Some(pid) => Command::Takeover { pid },
                None => return Err("takeover needs the asking process's pid".to_string()),
            },
            other => {
                let other: String = other.chars().take(32).collect();
                return Err(format!(
                    "unknown command {other:?}: use status, upgrade, verdict, stop, config or takeover"
                ));
            }
        };
        match words.next() {
            None => Ok(command),
            Some(_) => Err(format!("{command}: too many words")),
        }
    }
}

impl Command {
    /// The words `exuvia-ctl` takes for the commands, in its usage's order (`reload-verdict` is `verdict`).
    pub const CLI_WORDS: &'static [&'static str] =
        &["status", "upgrade", "reload-verdict", "stop", "config"];

    /// The command for an `exuvia-ctl` word; `started_usec` (the helper's own start, `CLOCK_MONOTONIC` µs)
    /// completes `reload-verdict`.
    pub fn from_cli_word(word: &str, started_usec: u64) -> Option<Command> {
        Some(match word {
            "status" => Command::Status,
            "upgrade" => Command::Upgrade,
            "reload-verdict" => Command::Verdict {
                since_usec: started_usec,
            },
            "stop" => Command::Stop,
            "config" => Command::Config,
            _ => return None,
        })
    }

    /// The `exuvia-ctl` word for this command.
    pub fn cli_word(&self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Upgrade => "upgrade",
            Command::Verdict { .. } => "reload-verdict",
            Command::Stop => "stop",
            Command::Config => "config",
            // Not a word of exuvia-ctl's: a new process asks for a takeover itself.
            Command::Takeover { .. } => "takeover",
        }
    }
}

impl fmt::Display for Command {
    /// The command as the request line carries it, after the protocol word.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Status => f.write_str("status"),
            Command::Upgrade => f.write_str("upgrade"),
            Command::Verdict { since_usec } => write!(f, "verdict {since_usec}"),
            Command::Stop => f.write_str("stop"),
            Command::Config => f.write_str("config"),
            Command::Takeover { pid } => write!(f, "takeover {pid}"),
        }
    }
}

/// A reply from the control socket: one line, `ok <text>` or `error [<kind>: ]<text>`. `Display` is the wire
/// form (without the newline; a newline in the text is sent as a space), [`Reply::parse`] reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// `ok <text>`: done.
    Ok(String),
    /// `error <text>`: the service said no (the upgrade failed, the request was malformed, ...).
    Failed(String),
    /// `error busy: <text>`: too many control requests at once; ask again soon (`exuvia-ctl` does).
    Busy(String),
    /// `error retry: <text>`: ask again; the request reached a process that has handed over (a `verdict`
    /// whose signal went to the new process, a request that was incomplete when this process finished).
    Retry(String),
    /// `error stopping: <text>`: the upgrade asked about was abandoned because the service is stopping.
    Stopping(String),
}

impl Reply {
    /// Whether the service said `ok`.
    pub fn is_ok(&self) -> bool {
        matches!(self, Reply::Ok(_))
    }

    /// The text, without `ok`/`error` or the kind.
    pub fn text(&self) -> &str {
        match self {
            Reply::Ok(t)
            | Reply::Failed(t)
            | Reply::Busy(t)
            | Reply::Retry(t)
            | Reply::Stopping(t) => t,
        }
    }

    /// Whether the service asks to be asked again.
    pub fn is_retry(&self) -> bool {
        matches!(self, Reply::Retry(_))
    }

    /// Whether the service had too many control requests at once.
    pub fn is_busy(&self) -> bool {
        matches!(self, Reply::Busy(_))
    }

    /// Whether the upgrade asked about was abandoned because the service is stopping.
    pub fn is_stopping(&self) -> bool {
        matches!(self, Reply::Stopping(_))
    }

    /// Reads one reply line.
    ///
    /// # Errors
    /// [`ErrorKind::Protocol`] for anything but `ok ...` or `error ...`.
    pub fn parse(line: &str) -> Result<Reply> {
        let line = line.trim_end();
        let (ok, text) = match line.split_once(' ') {
            Some(("ok", t)) => (true, t),
            Some(("error", t)) => (false, t),
            _ if line == "ok" => (true, ""),
            _ => {
                let shown: String = line.chars().take(80).collect();
                return Err(Error::protocol(format!(
                    "the control socket answered {shown:?}, not 'ok ...' or 'error ...'"
                )));
            }
        };
        if ok {
            return Ok(Reply::Ok(text.to_string()));
        }
        for marker in [BUSY, RETRY, STOPPING] {
            if let Some(rest) = text.strip_prefix(marker) {
                let rest = rest.trim_start().to_string();
                return Ok(match marker {
                    BUSY => Reply::Busy(rest),
                    RETRY => Reply::Retry(rest),
                    _ => Reply::Stopping(rest),
                });
            }
        }
        Ok(Reply::Failed(text.to_string()))
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (word, marker) = match self {
            Reply::Ok(_) => ("ok", None),
            Reply::Failed(_) => ("error", None),
            Reply::Busy(_) => ("error", Some(BUSY)),
            Reply::Retry(_) => ("error", Some(RETRY)),
            Reply::Stopping(_) => ("error", Some(STOPPING)),
        };
        let text = self.text().replace(['\n', '\r'], " ");
        match (marker, text.is_empty()) {
            (Some(m), _) => write!(f, "{word} {m} {text}"),
            (None, true) => f.write_str(word),
            (None, false) => write!(f, "{word} {text}"),
        }
    }
}

/// What `stop` answers: the processes that exit because of it (this one, and on probation the old one that
/// stands by with it). `Display` is the reply's text, [`StopAnswer::parse`] reads it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopAnswer {
    /// The process that answered.
    pub pid: u32,
    /// The old process that stands by through this one's probation window, and stops with it.
    pub standby: Option<u32>,
}

impl StopAnswer {
    /// Every process that exits because of the stop.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(self.pid).chain(self.standby).collect()
    }

    /// Reads a `stop` reply's text.
    pub fn parse(text: &str) -> Option<StopAnswer> {
        let rest = text.strip_prefix("stopping pid ")?;
        let (pid, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let standby = match rest.strip_prefix("and pid ") {
            Some(r) => Some(r.split_whitespace().next()?.parse().ok()?),
            None => None,
        };
        Some(StopAnswer {
            pid: pid.parse().ok()?,
            standby,
        })
    }
}

impl fmt::Display for StopAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stopping pid {}", self.pid)?;
        if let Some(s) = self.standby {
            write!(f, " and pid {s} (on standby through its probation window)")?;
        }
        Ok(())
    }
}

/// The service's own settings, as `config` answers them (for `exuvia-ctl check`). `Display` is the reply's
/// text (`drain_ms=30000 ready_ms=30000 probation_ms=0 fd_store=false taken=http:exuvia-control unclaimed=`),
/// [`Config::parse`] reads it back; socket names are separated by `:`, which a name cannot contain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Config {
    /// [`Builder::drain_timeout`](crate::Builder::drain_timeout).
    pub drain_timeout: Duration,
    /// [`Builder::ready_timeout`](crate::Builder::ready_timeout).
    pub ready_timeout: Duration,
    /// [`Builder::probation`](crate::Builder::probation) (zero: none).
    pub probation: Duration,
    /// [`Builder::fd_store`](crate::Builder::fd_store).
    pub fd_store: bool,
    /// The sockets taken or bound in this process.
    pub taken: Vec<String>,
    /// The sockets inherited and never taken (passed on all the same).
    pub unclaimed: Vec<String>,
    /// [`Builder::take_over`](crate::Builder::take_over): whether the process was built to take the service
    /// over from another instance (`false` when an older service does not say).
    pub take_over: bool,
}

impl Config {
    /// Reads a `config` reply's text. Keys it does not know are skipped (a newer service may say more).
    ///
    /// # Errors
    /// [`ErrorKind::Protocol`] when a key it needs is missing or its value is malformed.
    pub fn parse(text: &str) -> Result<Config> {
        let fields: std::collections::HashMap<&str, &str> = text
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let get = |key: &str| {
            fields.get(key).copied().ok_or_else(|| {
                Error::protocol(format!(
                    "the service's config answer has no {key}: {text:?}"
                ))
            })
        };
        let ms = |key: &str| -> Result<Duration> {
            get(key)?.parse().map(Duration::from_millis).map_err(|_| {
                Error::protocol(format!("config: {key} is not a number of milliseconds"))
            })
        };
        let names = |key: &str| -> Result<Vec<String>> {
            Ok(get(key)?
                .split(':')
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect())
        };
        Ok(Config {
            drain_timeout: ms("drain_ms")?,
            ready_timeout: ms("ready_ms")?,
            probation: ms("probation_ms")?,
            fd_store: get("fd_store")? == "true",
            taken: names("taken")?,
            unclaimed: names("unclaimed")?,
            take_over: fields.get("take_over") == Some(&"true"),
        })
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "drain_ms={} ready_ms={} probation_ms={} fd_store={} taken={} unclaimed={} take_over={}",
            self.drain_timeout.as_millis(),
            self.ready_timeout.as_millis(),
            self.probation.as_millis(),
            self.fd_store,
            self.taken.join(":"),
            self.unclaimed.join(":"),
            self.take_over
        )
    }
}

/// Sends one request to the control socket at `path` and reads the reply. For `stop`, also waits (up to
/// `timeout`) until the service has exited.
///
/// ```no_run
/// let path = exuvia::control::default_socket_path().expect("run under systemd with RuntimeDirectory=");
/// let reply = exuvia::control::request(&path, exuvia::control::Command::Upgrade, std::time::Duration::from_secs(60))?;
/// match reply {
///     exuvia::control::Reply::Ok(text) => println!("{text}"),
///     other => eprintln!("upgrade failed: {}", other.text()),
/// }
/// # Ok::<(), exuvia::Error>(())
/// ```
///
/// # Errors
/// [`ErrorKind::ControlSocket`] when the socket cannot be reached, or the service does not answer within
/// `timeout`; [`ErrorKind::Protocol`] when the reply is not one.
pub fn request(path: &Path, command: Command, timeout: Duration) -> Result<Reply> {
    let unreachable = |e: io::Error| {
        Error::with_io(
            ErrorKind::ControlSocket,
            format!(
                "cannot reach the control socket {} (is the service running?)",
                path.display()
            ),
            e,
        )
    };
    let mut conn = UnixStream::connect(path).map_err(unreachable)?;
    conn.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    // A service that refuses us may answer and close before our request is through: read what it said
    // before reporting the write error.
    let sent = conn.write_all(format!("{PROTOCOL} {command}\n").as_bytes());
    // A reply is one line; a service (or something else at that path) that sends more is cut off.
    let mut reader = BufReader::new(conn.take(MAX_REPLY));
    let mut line = String::new();
    match (sent, reader.read_line(&mut line)) {
        (_, Ok(n)) if n > 0 => {}
        (Err(e), _) => return Err(unreachable(e)),
        (Ok(()), Err(e)) => {
            return Err(Error::with_io(
                ErrorKind::ControlSocket,
                format!("no answer from the service within {timeout:?}"),
                e,
            ))
        }
        (Ok(()), Ok(_)) => {
            return Err(Error::new(
                ErrorKind::ControlSocket,
                "the service closed the connection without answering (it ended, or is not an exuvia service)",
            ))
        }
    }
    if !line.ends_with('\n') {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!(
                "the reply was cut off after {} bytes (no end of line): a reply is one line of at most {} KiB; \
                 is something other than an exuvia service listening at {}?",
                line.len(),
                MAX_REPLY / 1024,
                path.display()
            ),
        ));
    }
    let reply = Reply::parse(&line)?;
    if reply.is_ok() && command == Command::Stop {
        // The service holds the connection until it exits; then every process the reply named must be gone.
        let deadline = Instant::now() + timeout;
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).map_err(|e| {
            Error::with_io(
                ErrorKind::ControlSocket,
                format!("the service did not exit within {timeout:?}"),
                e,
            )
        })?;
        let answer = StopAnswer::parse(reply.text()).ok_or_else(|| {
            Error::protocol(format!(
                "the service's stop answer names no process: {:?}",
                reply.text()
            ))
        })?;
        for pid in answer.pids() {
            if !wait_exited(pid, deadline.saturating_duration_since(Instant::now())) {
                return Err(Error::new(
                    ErrorKind::ControlSocket,
                    format!("pid {pid} of the service did not exit within {timeout:?}"),
                ));
            }
        }
    }
    Ok(reply)
}

/// Waits up to `timeout` until process `pid` has exited; whether it has. A zombie counts (it serves nothing
/// and holds no socket), and so does a pid that names no process. What `exuvia-ctl` waits on: every process a
/// stop answer names, and the main process a reload may have lost.
pub fn wait_exited(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    match sys::pidfd_open(pid) {
        Ok(fd) => {
            let mut set = PollSet::new();
            set.readable(fd.as_fd());
            set.wait(Some(deadline)).unwrap_or(false)
        }
        // No such process: gone (and reaped) already.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => true,
        Err(_) => loop {
            // No pidfd here (an old kernel, a seccomp filter): look at /proc.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next());
            if !matches!(state, Some(Some(c)) if c != 'Z' && c != 'X') {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_bad_requests_are_explained() {
        for c in [
            Command::Status,
            Command::Upgrade,
            Command::Verdict { since_usec: 42 },
            Command::Stop,
        ] {
            assert_eq!(Command::parse(&format!("{PROTOCOL} {c}\n")), Ok(c));
        }
        for (line, why) in [
            ("", "unsupported protocol"),
            ("exuvia-ctl/2 status", "unsupported protocol"),
            ("exuvia-ctl/1", "unknown command"),
            ("exuvia-ctl/1 frobnicate", "unknown command"),
            ("exuvia-ctl/1 verdict", "needs the helper's start time"),
            ("exuvia-ctl/1 verdict -1", "needs the helper's start time"),
            ("exuvia-ctl/1 status now", "too many words"),
        ] {
            let e = Command::parse(line).unwrap_err();
            assert!(e.contains(why), "{line:?}: {e}");
        }
    }

    #[test]
    fn config_stop_answers_and_cli_words_round_trip() {
        let c = Config {
            drain_timeout: Duration::from_secs(30),
            ready_timeout: Duration::from_millis(1500),
            probation: Duration::ZERO,
            fd_store: true,
            taken: vec!["http".into(), "exuvia-control".into()],
            unclaimed: vec![],
            take_over: true,
        };
        assert_eq!(
            c.to_string(),
            "drain_ms=30000 ready_ms=1500 probation_ms=0 fd_store=true taken=http:exuvia-control unclaimed= \
             take_over=true"
        );
        // An older service does not say take_over=.
        let older = "drain_ms=30000 ready_ms=1500 probation_ms=0 fd_store=true taken=http:exuvia-control unclaimed=";
        assert!(!Config::parse(older).unwrap().take_over);
        assert_eq!(Config::parse(&c.to_string()).unwrap(), c);
        // A newer service may say more; an older one that says less is an error that names the key.
        assert_eq!(Config::parse(&format!("{c} extra=1")).unwrap(), c);
        let e = Config::parse("drain_ms=1 ready_ms=2").unwrap_err();
        assert!(e.to_string().contains("no probation_ms"), "{e}");
        for a in [
            StopAnswer {
                pid: 7,
                standby: None,
            },
            StopAnswer {
                pid: 7,
                standby: Some(5),
            },
        ] {
            assert_eq!(StopAnswer::parse(&a.to_string()), Some(a));
        }
        assert_eq!(StopAnswer::parse("stopped"), None);
        for w in Command::CLI_WORDS {
            let c = Command::from_cli_word(w, 9).unwrap();
            assert_eq!(c.cli_word(), *w);
            assert_eq!(Command::parse(&format!("{PROTOCOL} {c}")), Ok(c));
        }
        assert_eq!(Command::from_cli_word("verdict", 9), None);
    }

    #[test]
    fn retry_and_stopping_replies_are_told_apart() {
        let r = Reply::parse(&format!(
            "error {STOPPING} upgrade abandoned: this process is stopping\n"
        ))
        .unwrap();
        assert!(r.is_stopping() && !r.is_retry() && !r.is_ok());
        let r = Reply::parse(&format!("error {RETRY} pid 7 has handed over\n")).unwrap();
        assert!(r.is_retry() && !r.is_stopping());
        let r = Reply::parse("ok stopping: is only a marker on errors\n").unwrap();
        assert!(!r.is_stopping());
        let r = Reply::parse("error child exited with status 3\n").unwrap();
        assert!(!r.is_stopping() && !r.is_retry());
    }

    #[test]
    fn the_reload_signal_is_the_one_received_around_the_helper_start_and_after_any_handover() {
        use crate::lifecycle::{Attempts, Sighup};
        let at = |id: u64, at_usec: u64| Sighup {
            id,
            at_usec,
            caught: id,
            verdict: None,
        };
        let mut a = Attempts::default();
        a.sighups.push_back(at(1, 10_000_000));
        // The helper started 3 ms after the signal; or 0.5 s before it reached the signal thread.
        assert_eq!(reload_sighup(&a, 10_003_000), Some(1));
        assert_eq!(reload_sighup(&a, 9_500_000), Some(1));
        // A signal 2.5 s before the helper is someone else's; one 3 s after it too.
        assert_eq!(reload_sighup(&a, 12_500_000), None);
        assert_eq!(reload_sighup(&a, 7_000_000), None);
        // Two signals: the later one is the reload's.
        a.sighups.push_back(at(2, 11_000_000));
        assert_eq!(reload_sighup(&a, 11_002_000), Some(2));
        // An upgrade by kill -HUP (signal 1) handed over at 11.5 s; the reload queued behind it was signalled
        // to the new process: this one must not answer with signal 1 or 2.
        a.handed_over_usec = Some(11_500_000);
        assert_eq!(reload_sighup(&a, 11_510_000), None);
        // A handover after the helper started changes nothing for it.
        a.handed_over_usec = Some(12_000_000);
        assert_eq!(reload_sighup(&a, 11_002_000), Some(2));
    }

    #[test]
    fn random_requests_and_replies_never_panic() {
        let mut rng = crate::fuzz::Rng::new(0xC0);
        for _ in 0..crate::fuzz::iterations(20_000) {
            let line = rng.text(
                &[
                    "exuvia-ctl/1",
                    "status",
                    "verdict",
                    "stop",
                    "upgrade",
                    " ",
                    "\n",
                    "ok",
                    "error",
                ],
                80,
            );
            if let Err(e) = Command::parse(&line) {
                assert!(e.len() < 200, "{e}");
            }
            if let Ok(r) = Reply::parse(&line) {
                assert!(line
                    .trim_end()
                    .starts_with(if r.is_ok() { "ok" } else { "error" }));
                // One encoding: what is written reads back as itself (a newline in a text is sent as a space).
                let wire = r.to_string();
                assert_eq!(Reply::parse(&wire).unwrap().to_string(), wire, "{line:?}");
            }
        }
    }
}

//! [`Builder`]: configures the [`Upgrader`], reads the inherited descriptors from the environment (once per
//! process) and, in a process started by an upgrade, greets the old process.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Inner, StateFn, Upgrader};
use crate::activation;
use crate::drain::Tracker;
use crate::error::{Error, ErrorKind, Result};
use crate::handover;
use crate::handover::child::ParentLink;
use crate::handover::env::Handover;
use crate::lifecycle::{Attempts, Lifecycle};
use crate::registry::{Registry, Sockets};
use crate::sys;
use crate::systemd::Manager;

/// The default of [`Builder::stream_grace`].
const DEFAULT_STREAM_GRACE: Duration = Duration::from_secs(5);

/// The default of [`Builder::probation_stall`].
const DEFAULT_PROBATION_STALL: Duration = Duration::from_secs(3);

/// Configures and creates the process's [`Upgrader`]. Call [`build`](Builder::build) first thing in `main`,
/// before threads start: it reads and removes the variables that carry inherited sockets.
#[must_use]
pub struct Builder {
    ready_timeout: Duration,
    drain_timeout: Duration,
    stream_grace: Duration,
    program: Option<PathBuf>,
    args: Option<Vec<OsString>>,
    envs: Vec<(OsString, OsString)>,
    state: Option<StateFn>,
    notify: bool,
    control_socket: Option<PathBuf>,
    background_init: bool,
    probation: Duration,
    probation_stall: Duration,
    fd_store: bool,
    move_connections: bool,
    take_over: bool,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("ready_timeout", &self.ready_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("stream_grace", &self.stream_grace)
            .field("program", &self.program)
            .field("args", &self.args)
            .field("envs", &self.envs)
            .field("state", &self.state.as_ref().map(|_| ".."))
            .field("notify", &self.notify)
            .field("control_socket", &self.control_socket)
            .field("background_init", &self.background_init)
            .field("probation", &self.probation)
            .field("probation_stall", &self.probation_stall)
            .field("fd_store", &self.fd_store)
            .field("move_connections", &self.move_connections)
            .field("take_over", &self.take_over)
            .finish()
    }
}

impl Builder {
    pub(super) fn new() -> Builder {
        Builder {
            ready_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            stream_grace: DEFAULT_STREAM_GRACE,
            program: None,
            args: None,
            envs: Vec::new(),
            state: None,
            notify: true,
            control_socket: None,
            background_init: false,
            probation: Duration::ZERO,
            probation_stall: DEFAULT_PROBATION_STALL,
            fd_store: false,
            move_connections: true,
            take_over: false,
        }
    }

    /// Takeover mode: this process, started by someone else (a second systemd unit, a supervisor, another
    /// container), asks the process serving the control socket ([`control_socket`](Self::control_socket),
    /// or `$RUNTIME_DIRECTORY`'s) for the service, instead of binding its own sockets. `build()` then receives
    /// the sockets by name and the state, and from there it is an upgrade: the old process serves until
    /// [`Upgrader::ready`], rolls back or serves on if this one fails, hangs or dies, and lets go of (or
    /// moves) its connections once this one is committed. See the README's "Takeover".
    ///
    /// When nothing serves the control socket (no socket file, or nobody listening), this process starts
    /// fresh, binding as usual: the first instance of a blue/green pair. When something serves it and refuses
    /// (another user, an upgrade or takeover in flight), `build()` fails with
    /// [`ErrorKind::TakeoverRefused`]: exit with [`EXIT_TAKEOVER_FAILED`](crate::EXIT_TAKEOVER_FAILED) then. A process started by an upgrade of its own ignores this (its
    /// predecessor already handed over to it): a takeover happens once, at the start.
    ///
    /// Under systemd the new unit reports `READY=1` once it is committed (after its probation window, with
    /// one), so `systemctl start` of it fails if the takeover does; the old unit ends `inactive`.
    pub fn take_over(mut self, on: bool) -> Builder {
        self.take_over = on;
        self
    }

    /// Whether established connections move to the new process at an upgrade (default: yes; see
    /// [`crate::moving`]). With `false` this process asks for none ([`Upgrader::arrivals`] yields nothing) and
    /// moves none ([`Upgrader::departures`] is `None`): the HTTP layer then closes HTTP/1 connections after
    /// their next response and drains, as before connections could move.
    pub fn move_connections(mut self, on: bool) -> Builder {
        self.move_connections = on;
        self
    }

    /// Keeps every socket this process binds itself (and the control socket) in systemd's file-descriptor
    /// store (default off): a crash, an OOM kill or a `systemctl restart` then loses no listening socket, and
    /// clients wait in the kernel's queue until the restarted service takes them (it gets the sockets back by
    /// name in `LISTEN_FDS`). For services without a `.socket` unit (which remains the simplest way) or with
    /// listeners they create at run time. The unit needs `FileDescriptorStoreMax=` (at least the number of
    /// sockets) and, to survive `systemctl restart`, `FileDescriptorStorePreserve=yes` (systemd 254+).
    ///
    /// ```no_run
    /// let upgrader = exuvia::Upgrader::builder().fd_store(true).build()?;
    /// let http = upgrader.listen_tcp("http", "0.0.0.0:8080")?; // stored once bound; adopted after a restart
    /// # let _ = http;
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    pub fn fd_store(mut self, on: bool) -> Builder {
        self.fd_store = on;
        self
    }

    /// Whether to speak sd_notify when `NOTIFY_SOCKET` is set (default true). Turn it off only if the
    /// application notifies systemd itself and knows the handover sequence.
    pub fn notify(mut self, on: bool) -> Builder {
        self.notify = on;
        self
    }

    /// Where to serve the control socket (see [`control`](crate::control)). Default:
    /// `$RUNTIME_DIRECTORY/exuvia-control.sock` when systemd set `RUNTIME_DIRECTORY`, otherwise none.
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Builder {
        self.control_socket = Some(path.into());
        self
    }

    /// Background initialisation (default off): the new process starts at `SCHED_IDLE`, so that its start-up
    /// and initialisation use only CPU time the serving process leaves idle, and returns every one of its
    /// threads to this process's policy and nice value just before it reports ready (the old process checks
    /// that it did, and kills it otherwise). The new process must use exuvia with this feature.
    ///
    /// Returning from `SCHED_IDLE` needs `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows this process's nice
    /// value (under systemd: `LimitNICE=` with that value). Without either, or when this process does not
    /// run at `SCHED_OTHER`, an upgrade logs a warning and starts the new process at normal priority. A busy
    /// machine gives an idle-priority process little CPU: allow for that in
    /// [`ready_timeout`](Self::ready_timeout).
    pub fn background_initialisation(mut self, on: bool) -> Builder {
        self.background_init = on;
        self
    }

    /// A probation window after each handover (default none). For `window` after the commit this process
    /// stops accepting and lets its connections go as usual, but keeps the listening sockets and watches the
    /// new process; if the new process dies within the window (a crash, an exit, a signal, the OOM killer),
    /// this process takes the service back: it accepts again on the same kernel sockets (connections queued
    /// meanwhile are served), becomes systemd's main process again, and [`Upgrader::upgrade`] returns
    /// [`ErrorKind::RolledBack`](crate::ErrorKind::RolledBack). Only when the window has passed does this
    /// process finish ([`Finish::Upgraded`](crate::Finish::Upgraded)) and exit.
    ///
    /// Off by default because it changes what an upgrade costs and when it ends: the old process and its
    /// memory stay for the window, a second upgrade waits for it, and `upgrade()` (with it the reload verdict)
    /// returns only at its end. A few seconds cover the crashes that come with the first real requests; the
    /// connections the new process had accepted when it died are lost either way.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// let upgrader = exuvia::Upgrader::builder()
    ///     .probation(Duration::from_secs(5))
    ///     .build()?;
    /// # let _ = upgrader;
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    ///
    /// Under systemd the unit needs `NotifyAccess=all` (the templates in `units/` say so): the old process,
    /// no longer the main one, must be able to tell systemd `MAINPID=<itself>` when it takes the service back.
    ///
    /// What ends a window early, and how each end is told apart (docs/DESIGN.md has why none can be mistaken):
    /// - the new process ends for any reason it did not announce as a stop (exit status 0 included, and an
    ///   exit status this process cannot read because the application ignores `SIGCHLD` or reaps children
    ///   itself): rolled back;
    /// - it stops accepting: see [`probation_stall`](Self::probation_stall); killed and rolled back;
    /// - a stop reaches the new process (`exuvia-ctl stop`, a SIGTERM): it tells this process before it can
    ///   exit, and both stop; a stop that reaches this process stops both too.
    ///
    /// During the window the new process refuses to start an upgrade of its own (SIGHUP, the control socket,
    /// [`Upgrader::upgrade`]): at once, with [`ErrorKind::UpgradeInProgress`](crate::ErrorKind::UpgradeInProgress)
    /// and a reason that says how long the window still runs, so that one upgrade at a time holds across
    /// generations (a reload during the window fails; reload again after it).
    pub fn probation(mut self, window: Duration) -> Builder {
        self.probation = window;
        self
    }

    /// During a [`probation`](Self::probation) window, how long connections may wait in a listening socket's
    /// accept queue with none accepted before the new process counts as not serving (default 3 s; zero: only
    /// whether it lives is watched). The old process reads the kernel's figures for the sockets it still
    /// holds: a TCP listener's queue length (`TCP_INFO`), a Unix stream listener's "any waiting" (`poll`).
    /// The time runs from the first waiting connection and starts again whenever the queue shrinks: only an
    /// `accept` shrinks it, so a process that accepts at all, however busy, is never taken for a stalled one.
    /// A stalled new process is killed and the old one serves the waiting connections. The control socket is
    /// not watched; an idle service gives no evidence either way.
    ///
    /// Keep it well above the longest time a healthy process may go without CPU on the machine: with both
    /// cores of a 2-core machine oversubscribed, a healthy, busy process was once seen 305 ms without an
    /// `accept` (and a 300 ms stall time rolled it back); the default has ten times that margin.
    pub fn probation_stall(mut self, after: Duration) -> Builder {
        self.probation_stall = after;
        self
    }

    /// How long a new process has to report ready before it is killed (default 30 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Builder {
        self.ready_timeout = timeout;
        self
    }

    /// How long [`Upgrader::drain`] waits for in-flight connections (default 30 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Builder {
        self.drain_timeout = timeout;
        self
    }

    /// How long streams may go on once this process is finishing (default 5 s): long-lived responses
    /// (gRPC server-streaming and bidirectional calls, a watch, a feed) that have not ended by then are ended,
    /// so that their clients re-open them on the new process instead of waiting for the
    /// [drain deadline](Builder::drain_timeout) (which cuts them with an error). The HTTP layer ends gRPC
    /// responses itself, with the status `UNAVAILABLE` (see [`crate::hyper`]); anything else ends its
    /// streams when [`Upgrader::grace_ended`] resolves. A grace at or beyond the drain timeout leaves them to
    /// the drain deadline.
    pub fn stream_grace(mut self, grace: Duration) -> Builder {
        self.stream_grace = grace;
        self
    }

    /// The program to execute on upgrade. Default: the path this process was started from
    /// (`AT_EXECFN`, made absolute against the working directory at [`build`](Builder::build)), so that a
    /// binary replaced on disk is the one that runs. Symlinks are not resolved, for the same reason.
    pub fn program(mut self, path: impl Into<PathBuf>) -> Builder {
        self.program = Some(path.into());
        self
    }

    /// The arguments for the new process, after `argv[0]`. Default: this process's own.
    pub fn args<I, S>(mut self, args: I) -> Builder
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// An extra environment variable for the new process (it inherits this process's environment otherwise).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Builder {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// A function producing application state (at most [`MAX_STATE_LEN`](crate::MAX_STATE_LEN) bytes) to
    /// hand to the new process at each upgrade; it reads it with [`Upgrader::inherited_state`].
    pub fn state(mut self, f: impl Fn() -> Vec<u8> + Send + Sync + 'static) -> Builder {
        self.state = Some(Box::new(f));
        self
    }

    /// Reads the inherited sockets and, in a process started by an upgrade, greets the old process.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// let upgrader = exuvia::Upgrader::builder()
    ///     .ready_timeout(Duration::from_secs(60))
    ///     .drain_timeout(Duration::from_secs(20))
    ///     .state(|| b"session-ticket-keys".to_vec())
    ///     .build()?;
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Environment`] when `LISTEN_*` or the handover variables are malformed or name fds that are
    /// not open; [`ErrorKind::Protocol`]/[`ErrorKind::Channel`] when the old process cannot be understood.
    /// [`ErrorKind::AlreadyTaken`] when an earlier `build()` in this process already adopted the inherited
    /// descriptors (they are adopted once per process; build one `Upgrader` and clone it).
    /// A process that fails here should exit: its parent notices and keeps serving.
    pub fn build(self) -> Result<Upgrader> {
        let (program, argv) = program_and_argv(self.program, self.args)?;
        let found = Inheritance::read(std::process::id())?;
        // Read before the variables go: logging set up later still learns this process's generation.
        let _ = crate::logging::generation();
        scrub_environment();
        let mut origin = found.adopt()?;
        let manager = Manager::from_env(self.notify);
        let control_path = self
            .control_socket
            .or_else(crate::control::default_socket_path);
        if self.take_over && origin.parent.is_none() {
            let Some(path) = control_path.as_deref() else {
                return Err(Error::new(
                    ErrorKind::ControlSocket,
                    "takeover needs the running process's control socket: set Builder::control_socket, or run \
                     under systemd with the same RuntimeDirectory= as the running unit",
                ));
            };
            if let Some(received) = handover::takeover::request(path)? {
                origin = origin.taking_over(received)?;
            }
        }
        if manager.enabled() && control_path.is_none() {
            tracing::warn!(
                "running under systemd without RuntimeDirectory= (and no control socket set): the \
                 ExecReload=/ExecStop= helpers cannot reach this service, so a reload cannot report its verdict \
                 and a stop does not wait for the drain; add RuntimeDirectory=%N (exuvia-ctl check UNIT lists \
                 what else to fix)"
            );
        }
        let lifecycle = Lifecycle::new(Attempts {
            born_of: origin.born_of,
            ..Attempts::default()
        })
        .map_err(|e| Error::io("cannot create the finishing signal (pipe)", e))?;
        let how = origin.how();
        let upgrader = Upgrader {
            inner: Arc::new(Inner {
                program,
                argv,
                envs: self.envs,
                ready_timeout: self.ready_timeout,
                drain_timeout: self.drain_timeout,
                stream_grace: self.stream_grace,
                background_init: self.background_init,
                successor_probation: self.probation,
                probation_stall: self.probation_stall,
                predecessor: Mutex::new(None),
                fd_store: self.fd_store,
                own_probation: origin.probation,
                own_probation_ends: std::sync::OnceLock::new(),
                app_state: self.state,
                registry: Sockets::new(Registry::with_inherited(origin.sockets)),
                origin: how,
                take_over: self.take_over,
                parent: Mutex::new(origin.parent),
                // Apart from the link, which ready() consumes: the HTTP layer asks for connections after it.
                moves: Mutex::new(origin.moves),
                inherited_state: origin.state,
                generation: origin.generation,
                lifecycle,
                tracker: Tracker::default(),
                signals: AtomicBool::new(false),
                manager,
                control: Mutex::new(None),
                arrivals_taken: AtomicBool::new(false),
                #[cfg(feature = "hyper")]
                websockets: Default::default(),
                move_connections: self.move_connections,
                successor: Mutex::new(None),
            }),
        };
        if let Some(path) = control_path {
            match upgrader.control_listener(&path) {
                Ok(l) => super::control::keep(&upgrader, l),
                Err(e) => {
                    // The old process waits for this one: tell it why, rather than let it see an exit status.
                    let _ = upgrader.fail(&format!("the new process cannot start: {e}"));
                    return Err(e);
                }
            }
        }
        Ok(upgrader)
    }
}

/// The program an upgrade executes, and its full argv (argv[0] as this process was started, then `args` or
/// this process's own arguments).
fn program_and_argv(
    program: Option<PathBuf>,
    args: Option<Vec<OsString>>,
) -> Result<(PathBuf, Vec<OsString>)> {
    let program = match program {
        Some(p) => p,
        None => startup_program()?,
    };
    let mut argv: Vec<OsString> = std::env::args_os().take(1).collect();
    if argv.is_empty() {
        argv.push(program.clone().into_os_string());
    }
    match args {
        Some(a) => argv.extend(a),
        None => argv.extend(std::env::args_os().skip(1)),
    }
    Ok((program, argv))
}

/// What the environment says this process inherited: sockets (`LISTEN_*`, from systemd or an old process)
/// and, when an upgrade started it, the handover.
struct Inheritance {
    listen_names: Option<Vec<String>>,
    handover: Option<Handover>,
    /// The process's one right to adopt them (claimed when there is anything to adopt).
    right: Option<sys::Inherited>,
}

/// Where this process comes from, once its inheritance is adopted.
struct Adopted {
    sockets: Vec<(String, std::os::fd::OwnedFd)>,
    parent: Option<ParentLink>,
    state: Option<Vec<u8>>,
    generation: u32,
    /// Start of the upgrade that created this process.
    born_of: Option<u64>,
    /// The window the old process watches this one through.
    probation: Option<Duration>,
    /// The connection channel from the old process (`crate::moving`).
    moves: Option<std::os::fd::OwnedFd>,
}

impl Adopted {
    /// How this process came to serve.
    fn how(&self) -> super::Origin {
        match &self.parent {
            None => super::Origin::Fresh,
            Some(link) if link.came == handover::Came::TookOver => super::Origin::Takeover,
            Some(_) => super::Origin::Upgrade,
        }
    }

    /// Adds what the running process sent to take over from it: its sockets (replacing any of the same name
    /// the service manager passed), the channel (whose `Hello` is read here) and the connection channel.
    fn taking_over(mut self, received: handover::takeover::Received) -> Result<Adopted> {
        let (link, state) = handover::child::greet(
            received.channel,
            "the handover channel the running process sent",
            handover::Came::TookOver,
        )?;
        let moves = handover::child::check_moves(
            received.moves,
            "the connection channel the running process sent",
        )?;
        let names: Vec<&str> = received.sockets.iter().map(|(n, _)| n.as_str()).collect();
        self.sockets.retain(|(name, _)| {
            let replaced = names.contains(&name.as_str());
            if replaced {
                tracing::info!(name, "takeover: the running process's socket replaces the one passed by the service manager");
            }
            !replaced
        });
        tracing::info!(
            parent_pid = link.parent_pid,
            generation = link.generation,
            sockets = received.sockets.len(),
            state_bytes = state.len(),
            "taking over; received the sockets"
        );
        self.sockets.extend(received.sockets);
        self.generation = link.generation;
        crate::logging::set_generation(link.generation);
        self.born_of = Some(link.started_usec);
        self.parent = Some(link);
        self.state = Some(state);
        self.moves = Some(moves);
        self.probation = received.probation;
        Ok(self)
    }
}

impl Inheritance {
    /// Reads (does not adopt) the variables, and claims the process's one adoption.
    fn read(my_pid: u32) -> Result<Inheritance> {
        let listen_names = activation::parse(
            std::env::var_os(activation::VAR_PID).as_deref(),
            std::env::var_os(activation::VAR_FDS).as_deref(),
            std::env::var_os(activation::VAR_NAMES).as_deref(),
            my_pid,
        )?;
        let handover = Handover::read(my_pid)?;
        let sockets = listen_names.as_deref().map_or(0, |n| n.len());
        for (var, fd) in [
            (handover::env::VAR_FD, handover.map(|h| h.channel_fd)),
            (
                handover::env::VAR_MOVES_FD,
                handover.and_then(|h| h.moves_fd),
            ),
        ] {
            check_no_overlap(sockets, var, fd)?;
        }
        let mut right = None;
        if listen_names.is_some() || handover.is_some() {
            // The variables stay in the environment when threads already run (removing them then is unsound):
            // a second build() must not adopt the same descriptors again, two owners of one fd.
            right = Some(sys::Inherited::claim().ok_or_else(|| {
                Error::new(
                    ErrorKind::AlreadyTaken,
                    "the descriptors this process inherited (LISTEN_FDS, the handover channel) were already \
                     adopted by an earlier Upgrader::build(); build one Upgrader per process and clone it",
                )
            })?);
        }
        Ok(Inheritance {
            listen_names,
            handover,
            right,
        })
    }

    /// Adopts the inherited sockets and, after an upgrade, connects to the old process and reads its greeting.
    fn adopt(self) -> Result<Adopted> {
        let Some(mut right) = self.right else {
            return Ok(Adopted {
                sockets: Vec::new(),
                parent: None,
                state: None,
                generation: 0,
                born_of: None,
                probation: None,
                moves: None,
            });
        };
        let sockets = match self.listen_names {
            Some(names) => activation::adopt(names, &mut right)?,
            None => Vec::new(),
        };
        let Some(handover) = self.handover else {
            if !sockets.is_empty() {
                tracing::info!(
                    sockets = sockets.len(),
                    "adopted sockets passed by the service manager"
                );
            }
            return Ok(Adopted {
                sockets,
                parent: None,
                state: None,
                generation: 0,
                born_of: None,
                probation: None,
                moves: None,
            });
        };
        let (mut link, state) = handover::child::connect(handover.channel_fd, &mut right)?;
        link.restore_nice = handover.nice;
        let moves = match handover.moves_fd {
            Some(raw) => Some(handover::child::adopt_moves(raw, &mut right)?),
            None => None,
        };
        tracing::info!(
            parent_pid = link.parent_pid,
            generation = link.generation,
            sockets = sockets.len(),
            state_bytes = state.len(),
            "started by an upgrade; inherited sockets"
        );
        Ok(Adopted {
            sockets,
            generation: link.generation,
            born_of: Some(link.started_usec),
            parent: Some(link),
            state: Some(state),
            probation: handover.probation,
            moves,
        })
    }
}

/// Resolves the program path now, at start-up, as `execve` was given it.
fn startup_program() -> Result<PathBuf> {
    if let Some(p) = sys::exec_filename() {
        if p.is_absolute() {
            return Ok(p);
        }
        let cwd = std::env::current_dir().map_err(|e| {
            Error::io(
                "cannot read the working directory to resolve this program's path",
                e,
            )
        })?;
        return Ok(cwd.join(p));
    }
    std::env::current_exe().map_err(|e| {
        Error::io(
            "cannot tell which program this is (no AT_EXECFN, no /proc/self/exe); set Builder::program",
            e,
        )
    })
}

/// Removes the fd-passing variables so no code in this process (or a program it runs) mistakes the fds for
/// its own. Environment mutation is only sound while the process has a single thread; otherwise the
/// variables stay (they name this pid only, and are never passed to our own children) and we say so.
fn scrub_environment() {
    let vars = handover::env::ALL;
    if !vars.iter().any(|v| std::env::var_os(v).is_some()) {
        return;
    }
    match sys::thread_count() {
        Some(1) => {
            for v in vars {
                // Sound: this process has one thread (checked just above), so nothing can read the environment
                // concurrently.
                std::env::remove_var(v);
            }
        }
        threads => tracing::warn!(
            threads = threads.unwrap_or(0),
            "other threads already run: LISTEN_*/EXUVIA_HANDOVER_* stay in this process's environment \
             (removing them now is unsound), and programs this process starts inherit them; build the Upgrader \
             first thing in main, before any thread, or env_remove each of exuvia::HANDOVER_VARIABLES from the \
             commands it starts"
        ),
    }
}

/// The environment names each descriptor once: the sockets at 3.. (`LISTEN_FDS`) and the handover channel
/// after them. A channel number among the sockets would make two owners of one descriptor.
fn check_no_overlap(
    sockets: usize,
    var: &str,
    channel_fd: Option<std::os::fd::RawFd>,
) -> Result<()> {
    let first = activation::LISTEN_FDS_START;
    match channel_fd {
        Some(fd) if fd >= first && ((fd - first) as usize) < sockets => Err(Error::env(format!(
            "{var}={fd} names one of the {sockets} sockets of {} (descriptors {first} to {}): the environment \
             was not made by exuvia; start the program without these variables",
            activation::VAR_FDS,
            first as usize + sockets - 1
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_among_the_sockets_is_refused() {
        assert!(check_no_overlap(0, handover::env::VAR_FD, None).is_ok());
        assert!(check_no_overlap(2, handover::env::VAR_FD, None).is_ok());
        assert!(check_no_overlap(2, handover::env::VAR_FD, Some(5)).is_ok());
        assert!(check_no_overlap(0, handover::env::VAR_FD, Some(3)).is_ok());
        for fd in [3, 4] {
            let e = check_no_overlap(2, handover::env::VAR_FD, Some(fd)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Environment);
            assert!(e.to_string().contains("names one of the 2 sockets"), "{e}");
        }
    }
}

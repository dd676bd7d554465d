//! The [`Upgrader`]: one per process. It owns the named sockets, runs at most one upgrade at a time, and tells
//! the application when this process is finishing (handed over, or stopping) and how the drain went.

use std::ffi::OsString;
use std::fmt;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::accept::{Accept, Incoming};
use crate::activation;
use crate::drain::{ConnectionGuard, DrainReport, Tracker};
use crate::error::{Error, ErrorKind, Result};
use crate::handover::{self, child::ParentLink, parent};
use crate::listen::{self, BindOptions, SocketKind};
use crate::registry::Registry;
use crate::sys;
use crate::systemd::Manager;

/// How long a new process waits for the old one to confirm the handover after reporting ready.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

type StateFn = Box<dyn Fn() -> Vec<u8> + Send + Sync>;

/// Why this process is finishing.
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

/// Who asked this process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopCause {
    /// A signal (SIGTERM or SIGINT) through [`Upgrader::handle_signals`] or `handle_signals_tokio`.
    Signal(i32),
    /// `stop` on the control socket (`exuvia-ctl stop`, systemd's `ExecStop=`).
    ControlSocket,
    /// The application called [`Upgrader::shutdown`].
    Api,
}

/// What a successful upgrade did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpgradeReport {
    /// The new main process.
    pub child_pid: u32,
    /// From the upgrade request to the commit.
    pub took: Duration,
    /// From the upgrade request to the new process's ready report.
    pub ready_after: Duration,
    /// The new process's own initialisation, as it reported it: from reading the old process's greeting
    /// (inside its [`Builder::build`]) to its [`Upgrader::ready`] call.
    pub child_init: Duration,
    /// Sockets passed on.
    pub sockets: usize,
}

impl UpgradeReport {
    /// What the handover itself cost: [`ready_after`](Self::ready_after) minus the new process's own
    /// [`child_init`](Self::child_init). It covers fork and exec, the new program's start-up until its
    /// `build()`, and the messages both ways; the benchmark reports it per upgrade.
    pub fn overhead(&self) -> Duration {
        self.ready_after.saturating_sub(self.child_init)
    }
}

/// Configures and creates the process's [`Upgrader`]. Call [`build`](Builder::build) first thing in `main`,
/// before threads start: it reads and removes the variables that carry inherited sockets.
#[must_use]
pub struct Builder {
    ready_timeout: Duration,
    drain_timeout: Duration,
    program: Option<PathBuf>,
    args: Option<Vec<OsString>>,
    envs: Vec<(OsString, OsString)>,
    state: Option<StateFn>,
    notify: bool,
    control_socket: Option<PathBuf>,
    background_init: bool,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("ready_timeout", &self.ready_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("program", &self.program)
            .field("args", &self.args)
            .field("envs", &self.envs)
            .field("state", &self.state.as_ref().map(|_| ".."))
            .field("notify", &self.notify)
            .field("control_socket", &self.control_socket)
            .field("background_init", &self.background_init)
            .finish()
    }
}

impl Builder {
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
        let my_pid = std::process::id();
        let program = match self.program {
            Some(p) => p,
            None => startup_program()?,
        };
        let mut argv: Vec<OsString> = std::env::args_os().take(1).collect();
        if argv.is_empty() {
            argv.push(program.clone().into_os_string());
        }
        match self.args {
            Some(a) => argv.extend(a),
            None => argv.extend(std::env::args_os().skip(1)),
        }

        let listen_names = activation::parse(
            std::env::var_os(activation::VAR_PID).as_deref(),
            std::env::var_os(activation::VAR_FDS).as_deref(),
            std::env::var_os(activation::VAR_NAMES).as_deref(),
            my_pid,
        )?;
        let channel_fd = handover::child::parse_vars(
            std::env::var_os(handover::VAR_FD).as_deref(),
            std::env::var_os(handover::VAR_PID).as_deref(),
            my_pid,
        )?;
        check_no_overlap(listen_names.as_deref().map_or(0, |n| n.len()), channel_fd)?;
        if listen_names.is_some() || channel_fd.is_some() {
            // The variables stay in the environment when threads already run (removing them then is unsound):
            // a second build() would adopt the same descriptors again, two owners of one fd.
            static ADOPTED: AtomicBool = AtomicBool::new(false);
            if ADOPTED.swap(true, Ordering::SeqCst) {
                return Err(Error::new(
                    ErrorKind::AlreadyTaken,
                    "the descriptors this process inherited (LISTEN_FDS, the handover channel) were already \
                     adopted by an earlier Upgrader::build(); build one Upgrader per process and clone it",
                ));
            }
        }
        let restore_nice = match channel_fd {
            Some(_) => {
                handover::child::parse_nice(std::env::var_os(handover::VAR_NICE).as_deref())?
            }
            None => None,
        };
        scrub_environment();

        let inherited = match listen_names {
            Some(names) => activation::adopt(names)?,
            None => Vec::new(),
        };
        let (parent, state, generation, born_of) = match channel_fd {
            Some(fd) => {
                let (mut link, state) = handover::child::connect(fd)?;
                link.restore_nice = restore_nice;
                let generation = link.generation;
                let born_of = Some(link.started_usec);
                tracing::info!(
                    parent_pid = link.parent_pid,
                    generation,
                    sockets = inherited.len(),
                    state_bytes = state.len(),
                    "started by an upgrade; inherited sockets"
                );
                (Some(link), Some(state), generation, born_of)
            }
            None => {
                if !inherited.is_empty() {
                    tracing::info!(
                        sockets = inherited.len(),
                        "adopted sockets passed by the service manager"
                    );
                }
                (None, None, 0, None)
            }
        };
        let manager = Manager::from_env(self.notify);
        let control_path = self
            .control_socket
            .or_else(crate::control::default_socket_path);
        let (stop_read, stop_write) =
            sys::pipe().map_err(|e| Error::io("cannot create the finishing signal (pipe)", e))?;
        let upgrader = Upgrader {
            inner: Arc::new(Inner {
                program,
                argv,
                envs: self.envs,
                ready_timeout: self.ready_timeout,
                drain_timeout: self.drain_timeout,
                background_init: self.background_init,
                state: self.state,
                registry: Mutex::new(Registry::with_inherited(inherited)),
                parent: Mutex::new(parent),
                inherited_state: state,
                generation,
                ready: AtomicBool::new(false),
                upgrading: AtomicBool::new(false),
                finish: Mutex::new(FinishState::default()),
                finished: Condvar::new(),
                stop_read,
                stop_write: Mutex::new(Some(stop_write)),
                finishing_flag: Arc::new(AtomicBool::new(false)),
                published: std::sync::OnceLock::new(),
                tracker: Tracker::default(),
                signals: AtomicBool::new(false),
                manager,
                attempts: Mutex::new(Attempts {
                    born_of,
                    ..Attempts::default()
                }),
                attempts_changed: Condvar::new(),
                #[cfg(feature = "tokio")]
                events: ::tokio::sync::Notify::new(),
                control: Mutex::new(None),
            }),
        };
        if let Some(path) = control_path {
            match crate::control::listener(&upgrader, &path) {
                Ok(l) => *lock(&upgrader.inner.control) = l,
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
    let vars = [
        activation::VAR_PID,
        activation::VAR_FDS,
        activation::VAR_NAMES,
        activation::VAR_PIDFDID,
        handover::VAR_FD,
        handover::VAR_PID,
        handover::VAR_NICE,
    ];
    if !vars.iter().any(|v| std::env::var_os(v).is_some()) {
        return;
    }
    if sys::thread_count() == Some(1) {
        for v in vars {
            // Sound: this process has one thread (checked just above), so nothing can read the environment
            // concurrently.
            std::env::remove_var(v);
        }
    } else {
        tracing::debug!(
            "threads already running: leaving LISTEN_*/EXUVIA_* in the environment (build the Upgrader before \
             starting threads to have them removed)"
        );
    }
}

/// The environment names each descriptor once: the sockets at 3.. (`LISTEN_FDS`) and the handover channel
/// after them. A channel number among the sockets would make two owners of one descriptor.
fn check_no_overlap(sockets: usize, channel_fd: Option<std::os::fd::RawFd>) -> Result<()> {
    let first = activation::LISTEN_FDS_START;
    match channel_fd {
        Some(fd) if fd >= first && ((fd - first) as usize) < sockets => Err(Error::env(format!(
            "{}={fd} names one of the {sockets} sockets of {} (descriptors {first} to {}): the environment \
             was not made by exuvia; start the program without these variables",
            handover::VAR_FD,
            activation::VAR_FDS,
            first as usize + sockets - 1
        ))),
        _ => Ok(()),
    }
}

/// Claimed at the decision (so that an upgrade and a stop cannot both happen), published once the deciding
/// thread has done its bookkeeping (so that nobody acts on it half-way: the application may exit as soon as it
/// sees it).
#[derive(Debug, Default)]
struct FinishState {
    claimed: Option<Finish>,
    published: bool,
    /// An upgrade is committing (telling systemd and the new process) with the lock released.
    committing: bool,
    /// A stop that arrived while committing: applied if the commit fails (if it succeeds, this process is
    /// finishing anyway).
    stop_while_committing: Option<StopCause>,
}

impl FinishState {
    fn visible(&self) -> Option<Finish> {
        self.claimed.filter(|_| self.published)
    }
}

struct Inner {
    program: PathBuf,
    argv: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    ready_timeout: Duration,
    drain_timeout: Duration,
    background_init: bool,
    state: Option<StateFn>,
    registry: Mutex<Registry>,
    /// The link to the old process, until this one has reported ready.
    parent: Mutex<Option<ParentLink>>,
    inherited_state: Option<Vec<u8>>,
    generation: u32,
    ready: AtomicBool,
    upgrading: AtomicBool,
    finish: Mutex<FinishState>,
    finished: Condvar,
    /// Readable (end of file) once the process is finishing: every accept loop polls it.
    stop_read: OwnedFd,
    stop_write: Mutex<Option<OwnedFd>>,
    /// True once the finish is published: read without a lock on hot paths (each HTTP response).
    finishing_flag: Arc<AtomicBool>,
    /// The published finish, read without a lock by [`Upgrader::finishing`].
    published: std::sync::OnceLock<Finish>,
    tracker: Tracker,
    signals: AtomicBool,
    manager: Manager,
    attempts: Mutex<Attempts>,
    attempts_changed: Condvar,
    /// The same wake-ups as `attempts_changed`, for async waiters (`next_event`), so that none of them needs a
    /// thread of its own.
    #[cfg(feature = "tokio")]
    events: ::tokio::sync::Notify,
    /// The control socket, served from [`Upgrader::ready`] on.
    control: Mutex<Option<UnixListener>>,
}

/// What the reload helper asks about: the upgrade in flight, the last one and its verdict, and the upgrade
/// that created this process.
#[derive(Debug, Default)]
pub(crate) struct Attempts {
    /// Start (`CLOCK_MONOTONIC` µs) of the upgrade in flight.
    pub(crate) current: Option<u64>,
    /// Start and verdict of the last finished upgrade: the new pid, or why it failed.
    pub(crate) last: Option<(u64, std::result::Result<u32, String>)>,
    /// Start of the upgrade that created this process (from the old process's `Hello`).
    pub(crate) born_of: Option<u64>,
    /// SIGHUPs received and SIGHUPs acted upon (an upgrade started or refused).
    pub(crate) sighup_received: u64,
    pub(crate) sighup_handled: u64,
    /// The last SIGHUPs, each with its own verdict: what a reload helper asks about.
    pub(crate) sighups: std::collections::VecDeque<Sighup>,
    /// A SIGHUP that arrived before this process was ready, applied once it is (its index in `sighups` is
    /// found by `id`).
    pub(crate) deferred: Option<u64>,
    /// When this process last told systemd that the main process is now another one (`MAINPID=`): signals
    /// systemd sends after that go there, so no SIGHUP received here before it answers a later reload.
    pub(crate) handed_over_usec: Option<u64>,
    /// Failed upgrades so far, for [`Upgrader::wait_event`].
    pub(crate) failures: u64,
}

/// One SIGHUP and what came of it.
#[derive(Debug, Clone)]
pub(crate) struct Sighup {
    pub(crate) id: u64,
    /// When it was received (`CLOCK_MONOTONIC`, µs).
    pub(crate) at_usec: u64,
    /// `None` while its upgrade runs (or waits for this process to be ready).
    pub(crate) verdict: Option<std::result::Result<String, String>>,
}

/// How many SIGHUP records are kept.
const SIGHUP_RECORDS: usize = 16;

/// Something the application may want to act on, from [`Upgrader::wait_event`] (or `next_event` with Tokio).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// This process is finishing: drain and exit.
    Finishing(Finish),
    /// An upgrade failed; this process keeps serving. The text says why (as the error did).
    UpgradeFailed(String),
}

/// The process's handle on its sockets and upgrades. Cheap to clone; every clone is the same upgrader.
///
/// See the [crate documentation](crate) for the whole picture.
#[derive(Clone)]
pub struct Upgrader {
    inner: Arc<Inner>,
}

impl fmt::Debug for Upgrader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upgrader")
            .field("program", &self.inner.program)
            .field("generation", &self.inner.generation)
            .field("finish", &self.finishing())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Clears the in-flight flag however the upgrade ends.
struct InFlight<'a>(&'a AtomicBool);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Upgrader {
    /// Starts configuring the upgrader.
    pub fn builder() -> Builder {
        Builder {
            ready_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            program: None,
            args: None,
            envs: Vec::new(),
            state: None,
            notify: true,
            control_socket: None,
            background_init: false,
        }
    }

    /// Whether this process was started by an upgrade (as opposed to fresh, or by systemd).
    pub fn is_upgraded(&self) -> bool {
        self.inner.generation > 0
    }

    /// How many upgrades led to this process: 0 for a fresh start.
    pub fn generation(&self) -> u32 {
        self.inner.generation
    }

    /// The application state the old process handed over, if this process was started by an upgrade.
    pub fn inherited_state(&self) -> Option<&[u8]> {
        self.inner.inherited_state.as_deref()
    }

    /// The program an upgrade will execute.
    pub fn program(&self) -> &Path {
        &self.inner.program
    }

    fn take_or_bind(
        &self,
        name: &str,
        kind: SocketKind,
        bind: impl FnOnce() -> std::io::Result<OwnedFd>,
        what: impl fmt::Display,
    ) -> Result<OwnedFd> {
        check_name(name)?;
        let mut reg = lock(&self.inner.registry);
        if let Some(fd) = reg.take(name, kind)? {
            tracing::info!(name, "using inherited socket");
            return Ok(fd);
        }
        if reg.contains(name) {
            return Err(Error::new(
                ErrorKind::AlreadyTaken,
                format!("socket {name:?} was already taken in this process; take each name once"),
            ));
        }
        let fd = bind().map_err(|e| {
            Error::with_io(
                ErrorKind::Bind,
                format!("cannot bind {name:?} on {what}"),
                e,
            )
        })?;
        let keep = fd
            .try_clone()
            .map_err(|e| Error::io(format!("cannot duplicate socket {name:?}"), e))?;
        reg.add_bound(name, keep);
        tracing::info!(name, on = %what, "bound new socket");
        Ok(fd)
    }

    /// A TCP listener named `name`: the inherited one if this process was handed one under that name,
    /// otherwise a fresh bind on `addr` with [`BindOptions::new`].
    ///
    /// An inherited socket is used as it is, whatever `addr` says (its address is the one the old process or
    /// systemd bound: with port 0, or a socket unit, it differs from `addr`).
    ///
    /// ```no_run
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// let http = upgrader.listen_tcp("http", "0.0.0.0:8080")?;
    /// let admin = upgrader.listen_tcp_with(
    ///     "admin",
    ///     "127.0.0.1:9090",
    ///     &exuvia::BindOptions::new().backlog(128),
    /// )?;
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::WrongSocketKind`] if the inherited socket of that name is not a TCP listener,
    /// [`ErrorKind::AlreadyTaken`] on a second call with the same name, [`ErrorKind::Bind`] if the bind fails.
    pub fn listen_tcp(&self, name: &str, addr: impl ToSocketAddrs) -> Result<TcpListener> {
        self.listen_tcp_with(name, addr, &BindOptions::new())
    }

    /// [`listen_tcp`](Self::listen_tcp) with options (backlog, `SO_REUSEADDR`, a hook) for a fresh bind.
    pub fn listen_tcp_with(
        &self,
        name: &str,
        addr: impl ToSocketAddrs,
        opts: &BindOptions,
    ) -> Result<TcpListener> {
        let addr = resolve(name, addr)?;
        self.take_or_bind(
            name,
            SocketKind::TcpListener,
            || listen::bind_tcp(&addr, opts),
            addr,
        )
        .map(TcpListener::from)
    }

    /// ```no_run
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// let dns = upgrader.bind_udp("dns", "127.0.0.1:5353")?;
    /// let control = upgrader.listen_unix("api", "/run/app/api.sock")?;
    /// let logs = upgrader.bind_unix_datagram("logs", "/run/app/log.sock")?;
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    /// A UDP socket named `name`, inherited or freshly bound on `addr`.
    pub fn bind_udp(&self, name: &str, addr: impl ToSocketAddrs) -> Result<UdpSocket> {
        self.bind_udp_with(name, addr, &BindOptions::new())
    }

    /// [`bind_udp`](Self::bind_udp) with options for a fresh bind.
    pub fn bind_udp_with(
        &self,
        name: &str,
        addr: impl ToSocketAddrs,
        opts: &BindOptions,
    ) -> Result<UdpSocket> {
        let addr = resolve(name, addr)?;
        self.take_or_bind(
            name,
            SocketKind::Udp,
            || listen::bind_udp(&addr, opts),
            addr,
        )
        .map(UdpSocket::from)
    }

    /// A Unix stream listener named `name`, inherited or freshly bound at `path`. A fresh bind replaces a
    /// stale socket file left by a dead process; an inherited socket's path is never touched.
    pub fn listen_unix(&self, name: &str, path: impl AsRef<Path>) -> Result<UnixListener> {
        self.listen_unix_with(name, path, &BindOptions::new())
    }

    /// [`listen_unix`](Self::listen_unix) with options for a fresh bind.
    pub fn listen_unix_with(
        &self,
        name: &str,
        path: impl AsRef<Path>,
        opts: &BindOptions,
    ) -> Result<UnixListener> {
        let path = path.as_ref();
        self.take_or_bind(
            name,
            SocketKind::UnixListener,
            || listen::bind_unix(path, libc::SOCK_STREAM, true, opts),
            path.display(),
        )
        .map(UnixListener::from)
    }

    /// A Unix datagram socket named `name`, inherited or freshly bound at `path`.
    pub fn bind_unix_datagram(&self, name: &str, path: impl AsRef<Path>) -> Result<UnixDatagram> {
        let path = path.as_ref();
        self.take_or_bind(
            name,
            SocketKind::UnixDatagram,
            || listen::bind_unix(path, libc::SOCK_DGRAM, false, &BindOptions::new()),
            path.display(),
        )
        .map(UnixDatagram::from)
    }

    /// A Unix seqpacket listener named `name`, inherited or freshly bound at `path`. std has no type for it:
    /// accept with [`accept_seqpacket`](crate::accept_seqpacket) or wrap the fd in your own.
    pub fn listen_unix_seqpacket(&self, name: &str, path: impl AsRef<Path>) -> Result<OwnedFd> {
        let path = path.as_ref();
        self.take_or_bind(
            name,
            SocketKind::UnixSeqpacketListener,
            || listen::bind_unix(path, libc::SOCK_SEQPACKET, true, &BindOptions::new()),
            path.display(),
        )
    }

    /// ```no_run
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// // Socket-activated only: no fallback bind.
    /// match upgrader.take_tcp("http")? {
    ///     Some(l) => println!("serving on {:?}", l.local_addr()),
    ///     None => eprintln!("no socket named http was passed; check FileDescriptorName="),
    /// }
    /// // Sockets passed without distinct names, by position.
    /// let second = upgrader.take_index(1, exuvia::SocketKind::TcpListener)?;
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    /// Takes the inherited TCP listener named `name`, if any: no bind. `Ok(None)` when there is none or it
    /// was already taken.
    pub fn take_tcp(&self, name: &str) -> Result<Option<TcpListener>> {
        Ok(lock(&self.inner.registry)
            .take(name, SocketKind::TcpListener)?
            .map(TcpListener::from))
    }

    /// Takes the inherited socket named `name` as `kind`, if any, as an owned fd.
    pub fn take(&self, name: &str, kind: SocketKind) -> Result<Option<OwnedFd>> {
        lock(&self.inner.registry).take(name, kind)
    }

    /// Binds a fresh socket with `bind` and keeps it under `name` in place of whatever was there.
    pub(crate) fn rebind(
        &self,
        name: &str,
        bind: impl FnOnce() -> std::io::Result<OwnedFd>,
    ) -> std::io::Result<OwnedFd> {
        let fd = bind()?;
        let keep = fd.try_clone()?;
        lock(&self.inner.registry).replace(name, keep);
        Ok(fd)
    }

    /// Takes the `index`th inherited socket (0 is fd 3) as `kind`: for sockets passed without distinct names.
    pub fn take_index(&self, index: usize, kind: SocketKind) -> Result<Option<OwnedFd>> {
        lock(&self.inner.registry).take_index(index, kind)
    }

    /// ```no_run
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// # let listener = upgrader.listen_tcp("http", "127.0.0.1:8080")?;
    /// for conn in upgrader.incoming(listener) {
    ///     let Ok(stream) = conn else { continue };
    ///     let guard = upgrader.track();
    ///     std::thread::spawn(move || { /* serve stream */ drop((stream, guard)); });
    /// }
    /// // Here this process has handed over (or is stopping) and no longer accepts.
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    /// Accepted connections from `listener` until this process finishes; then the iterator ends and closes
    /// the listener. See [`Incoming`].
    pub fn incoming<L: Accept>(&self, listener: L) -> Incoming<L> {
        Incoming::new(listener, self.clone())
    }

    /// Reports that this process has initialised and can serve. In a process started by an upgrade this tells
    /// the old process, then waits until it confirms (it hands over and starts draining). Elsewhere it does
    /// nothing but record the fact. Calling it again does nothing.
    ///
    /// Start accepting *after* this returns. Until then the old process accepts, and connections that arrive
    /// meanwhile wait in the shared kernel queue, so none is refused; a process that accepted before its
    /// handover was confirmed would take those connections down with it if it then failed.
    ///
    /// # Errors
    /// [`ErrorKind::Channel`] when the old process cannot be reached or does not confirm in time: it has given
    /// up on this upgrade (and will kill this process); exit.
    pub fn ready(&self) -> Result<()> {
        if self.inner.ready.load(Ordering::SeqCst) {
            return Ok(());
        }
        let link = lock(&self.inner.parent).take();
        if let Some(link) = link {
            tracing::info!(
                parent_pid = link.parent_pid,
                "reporting ready to the old process"
            );
            // The old process tells systemd (MAINPID, READY) before it confirms: nothing to send here.
            let parent_pid = link.parent_pid;
            link.ready(COMMIT_TIMEOUT)?;
            tracing::info!(
                generation = self.inner.generation,
                "handover confirmed; this process is now the main one"
            );
            self.status_once_gone(parent_pid);
        } else {
            self.inner.manager.ready(&format!(
                "serving (pid {}, generation {})",
                std::process::id(),
                self.inner.generation
            ));
        }
        self.inner.ready.store(true, Ordering::SeqCst);
        self.start_watchdog();
        if let Some(l) = lock(&self.inner.control).take() {
            crate::control::serve(self.clone(), l);
        }
        self.run_deferred_sighup();
        Ok(())
    }

    /// The old process said "pid P draining" in `STATUS=` at the handover: say what is true once it has exited.
    fn status_once_gone(&self, old_pid: u32) {
        if !self.inner.manager.enabled() {
            return;
        }
        let Ok(pidfd) = sys::pidfd_open(old_pid as libc::pid_t) else {
            return; // gone already, or not ours to watch: the status names only this process then
        };
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("exuvia-old-watch".into())
            .spawn(move || {
                let mut set = sys::PollSet::new();
                set.add(pidfd.as_fd(), libc::POLLIN);
                if set.wait(None).unwrap_or(false) && me.finishing().is_none() {
                    me.inner.manager.status(&format!(
                        "serving (pid {}, generation {})",
                        std::process::id(),
                        me.inner.generation
                    ));
                }
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "cannot watch the old process for the status line");
        }
    }

    /// Feeds the systemd watchdog every half interval while this process is the main one.
    fn start_watchdog(&self) {
        let Some(interval) = self.inner.manager.watchdog() else {
            return;
        };
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("exuvia-watchdog".into())
            .spawn(move || {
                me.inner.manager.ping();
                loop {
                    let finish = lock(&me.inner.finish);
                    let (finish, _) = me
                        .inner
                        .finished
                        .wait_timeout(finish, interval / 2)
                        .unwrap_or_else(PoisonError::into_inner);
                    // After a handover the new process feeds it; a stopping process feeds it until it exits.
                    if matches!(finish.claimed, Some(Finish::Upgraded { .. })) {
                        return;
                    }
                    drop(finish);
                    me.inner.manager.ping();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the watchdog thread; systemd may kill this service");
        }
    }

    /// ```no_run
    /// # fn load_config() -> Result<(), String> { Ok(()) }
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// if let Err(reason) = load_config() {
    ///     upgrader.fail(&format!("bad configuration: {reason}"))?;
    ///     std::process::exit(1);
    /// }
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    /// Reports that initialisation failed, with a reason the old process logs and returns from its
    /// [`upgrade`](Self::upgrade). The old process keeps serving; this one should exit.
    pub fn fail(&self, reason: &str) -> Result<()> {
        if let Some(link) = lock(&self.inner.parent).take() {
            link.fail(reason)?;
        }
        Ok(())
    }

    /// Replaces this process: starts the program on disk with every socket, waits for it to report ready, then
    /// marks this process as finishing ([`Finish::Upgraded`]): accept loops end, and the application should
    /// [`drain`](Self::drain) and exit.
    ///
    /// ```no_run
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// match upgrader.upgrade() {
    ///     Ok(report) => eprintln!("pid {} serves now ({:?})", report.child_pid, report.took),
    ///     Err(e) if e.kind() == exuvia::ErrorKind::UpgradeInProgress => eprintln!("one at a time"),
    ///     Err(e) => eprintln!("upgrade failed, still serving: {e}"),
    /// }
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    ///
    /// Blocks until the new process is ready or has failed. On failure the new process is killed and reaped,
    /// and this process keeps serving as if nothing happened.
    ///
    /// # Errors
    /// [`ErrorKind::UpgradeInProgress`] if another upgrade is running; [`ErrorKind::Finishing`] if this process
    /// already handed over, is stopping, or has not reported ready itself; [`ErrorKind::Spawn`],
    /// [`ErrorKind::ChildExited`], [`ErrorKind::ChildFailed`], [`ErrorKind::ReadyTimeout`],
    /// [`ErrorKind::Protocol`], [`ErrorKind::Channel`] when the new process does not come up.
    pub fn upgrade(&self) -> Result<UpgradeReport> {
        self.upgrade_then(|| {})
    }

    /// The nice value a background-initialised child returns to, or `None` (with a warning) when this process
    /// cannot offer it one.
    fn background_nice(&self) -> Option<i32> {
        if !self.inner.background_init {
            return None;
        }
        let why = match sys::scheduling() {
            Ok((libc::SCHED_OTHER, nice)) if sys::may_return_to(nice) => return Some(nice),
            Ok((libc::SCHED_OTHER, nice)) => format!(
                "the new process could not return from idle priority to nice {nice} (needs CAP_SYS_NICE, or \
                 RLIMIT_NICE of at least {}: systemd's LimitNICE={nice})",
                20 - nice
            ),
            Ok((policy, _)) => format!("this process runs at scheduling policy {policy}, not SCHED_OTHER"),
            Err(e) => format!("cannot read this process's scheduling: {e}"),
        };
        tracing::warn!(
            "background initialisation skipped: {why}; the new process starts at normal priority"
        );
        None
    }

    /// [`upgrade`](Self::upgrade), calling `started` once the attempt has begun or been refused.
    fn upgrade_then(&self, started: impl FnOnce()) -> Result<UpgradeReport> {
        let mut started = Some(started);
        let mut mark = || {
            if let Some(f) = started.take() {
                f()
            }
        };
        let result = self.upgrade_inner(&mut mark);
        mark();
        result
    }

    fn upgrade_inner(&self, mark_started: &mut dyn FnMut()) -> Result<UpgradeReport> {
        let inner = &self.inner;
        if let Some(f) = lock(&inner.finish).claimed {
            return Err(finishing_error(f));
        }
        if inner
            .upgrading
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            tracing::info!("upgrade requested while one is in flight; refused");
            return Err(Error::new(
                ErrorKind::UpgradeInProgress,
                "an upgrade is already in progress; wait for its verdict",
            ));
        }
        let in_flight = InFlight(&inner.upgrading);
        if !inner.ready.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Finishing,
                "this process has not reported ready yet; it cannot upgrade before it serves",
            ));
        }
        let started = Instant::now();
        let started_usec = sys::monotonic_usec();
        self.record_attempt_start(started_usec);
        mark_started();
        tracing::info!(program = %inner.program.display(), generation = inner.generation, "upgrade requested");
        // Room for the new process's initialisation, the handover and the barrier.
        let extend = inner.ready_timeout + Duration::from_secs(15);
        inner.manager.reloading(
            &format!(
                "upgrading: starting {} (generation {})",
                inner.program.display(),
                inner.generation + 1
            ),
            extend,
        );
        let state = inner.state.as_ref().map(|f| f()).unwrap_or_default();
        let launch = parent::Launch {
            program: &inner.program,
            argv: &inner.argv,
            extra_env: &inner.envs,
            generation: inner.generation + 1,
            watchdog: inner.manager.watchdog().is_some(),
            started_usec,
            background: self.background_nice(),
        };
        let result = (|| {
            let (child, sockets) = {
                let reg = lock(&inner.registry);
                let set = reg.handover_set();
                let unclaimed = reg.unclaimed();
                if !unclaimed.is_empty() {
                    tracing::debug!(
                        ?unclaimed,
                        "passing on inherited sockets this version did not take"
                    );
                }
                let child = parent::start(&launch, &set, state, started + inner.ready_timeout)?;
                (child, set.len())
            };
            let mut child = child;
            let pid = child.pid();
            let child_init = child.await_ready(
                inner.ready_timeout,
                Duration::from_secs(1),
                // A stop while the new process initialises abandons the upgrade at once.
                Some(inner.stop_read.as_fd()),
                &mut || inner.manager.extend(extend),
            )?;
            if launch.background.is_some() {
                child.check_normal_priority()?;
            }
            let ready_after = started.elapsed();
            tracing::info!(
                child_pid = pid,
                ready_after_us = micros(ready_after),
                child_init_us = micros(child_init),
                overhead_us = micros(ready_after.saturating_sub(child_init)),
                "upgrade: child ready; handing over"
            );
            // Nobody may finish this process between the child's ready and the commit: mark the commit under
            // the lock, then tell systemd and the child without it (the barrier can take seconds, and every
            // reader of the lifecycle must not wait for it), then record the outcome under it again.
            {
                let mut finish = lock(&inner.finish);
                if let Some(f) = finish.claimed {
                    child.abort();
                    return Err(finishing_error(f));
                }
                finish.committing = true;
            }
            let committed = (|| {
                // systemd first (the main pid moves while this process still accepts), then the child.
                if child.has_exited() {
                    drop(child);
                    return Err(Error::new(
                        ErrorKind::ChildExited,
                        "child exited right after reporting ready",
                    ));
                }
                lock(&inner.attempts).handed_over_usec = Some(sys::monotonic_usec());
                inner.manager.hand_over(
                    pid,
                    &format!(
                        "serving (pid {pid}, generation {}); pid {} draining",
                        inner.generation + 1,
                        std::process::id()
                    ),
                );
                child.commit()
            })();
            let stop_meanwhile = {
                let mut finish = lock(&inner.finish);
                finish.committing = false;
                let stop = finish.stop_while_committing.take();
                if let Ok(child_pid) = committed {
                    finish.claimed = Some(Finish::Upgraded { child_pid });
                    if stop.is_some() {
                        tracing::info!("stop requested during the handover; this process hands over and drains");
                    }
                }
                stop
            };
            if let Err(e) = committed {
                if let Some(by) = stop_meanwhile {
                    // The stop that arrived during the commit applies now that there is no handover.
                    self.shutdown_by(by);
                }
                return Err(e);
            }
            Ok((pid, sockets, ready_after, child_init))
        })();
        self.record_attempt_end(
            started_usec,
            result
                .as_ref()
                .map(|(pid, ..)| *pid)
                .map_err(|e| e.to_string()),
        );
        if let Err(e) = &result {
            // Before the in-flight flag clears: a stop's drain waits for that, then may end this process.
            tracing::info!(error = %e, "upgrade failed; this process keeps serving");
        }
        drop(in_flight);
        // Wakes a drain waiting for the upgrade to end (under the lock its check holds, so it is not missed).
        drop(lock(&inner.attempts));
        self.announce();
        match result {
            Ok((child_pid, sockets, ready_after, child_init)) => {
                // Everything this thread has to do happens before the wake-up: once woken, the application
                // drains and may exit at any moment.
                let closed = lock(&inner.registry).close_all();
                tracing::info!(
                    child_pid,
                    closed,
                    took_us = micros(started.elapsed()),
                    "upgrade: handed over; stopped accepting, draining"
                );
                self.after_finish();
                Ok(UpgradeReport {
                    child_pid,
                    took: started.elapsed(),
                    ready_after,
                    child_init,
                    sockets,
                })
            }
            Err(e) => {
                inner.manager.failed(&format!(
                    "upgrade failed: {e}; still serving (pid {}, generation {})",
                    std::process::id(),
                    inner.generation
                ));
                Err(e)
            }
        }
    }

    /// Marks this process as stopping ([`Finish::Stopped`]): accept loops end; then [`drain`](Self::drain)
    /// and exit. Does nothing if it is already finishing.
    pub fn shutdown(&self) {
        self.shutdown_by(StopCause::Api)
    }

    pub(crate) fn shutdown_by(&self, by: StopCause) {
        let first = {
            let mut finish = lock(&self.inner.finish);
            if finish.claimed.is_some() {
                false
            } else if finish.committing {
                finish.stop_while_committing.get_or_insert(by);
                false
            } else {
                finish.claimed = Some(Finish::Stopped { by });
                true
            }
        };
        if first {
            tracing::info!("stop requested; no longer accepting");
            self.inner
                .manager
                .stopping("stopping: no longer accepting, draining");
            self.after_finish();
        }
    }

    /// Publishes the claimed finish and wakes everyone waiting for it.
    fn after_finish(&self) {
        {
            let mut finish = lock(&self.inner.finish);
            if let Some(f) = finish.claimed {
                let _ = self.inner.published.set(f);
            }
            finish.published = true;
        }
        self.inner.finishing_flag.store(true, Ordering::Release);
        // Closing the write end makes the read end readable forever: every accept loop wakes and ends.
        lock(&self.inner.stop_write).take();
        self.inner.finished.notify_all();
        // wait_event checks for a finish while it holds the attempts lock, then waits on attempts_changed.
        // Taking that lock here puts this publication wholly before its check or after it has begun waiting,
        // so the wake-up below cannot fall in between and be lost.
        drop(lock(&self.inner.attempts));
        self.announce();
    }

    /// ```no_run
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// loop {
    ///     match upgrader.wait_event() {
    ///         exuvia::Event::UpgradeFailed(why) => eprintln!("alert: upgrade failed: {why}"),
    ///         exuvia::Event::Finishing(f) => break eprintln!("finishing: {f:?}"),
    ///         _ => {}
    ///     }
    /// }
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    /// Blocks until the next event: an upgrade that fails after this call (this process serves on), or this
    /// process finishing. Lets a service log or alert on failed upgrades, and learn why it is finishing, in one
    /// loop.
    pub fn wait_event(&self) -> Event {
        self.wait_event_after(self.failures_so_far())
    }

    /// How many upgrades have failed so far (the starting point of [`wait_event_after`](Self::wait_event_after)).
    pub(crate) fn failures_so_far(&self) -> u64 {
        lock(&self.inner.attempts).failures
    }

    /// [`wait_event`](Self::wait_event) counting failed upgrades from `seen` on (the async layer's `next_event`
    /// takes `seen` when it is called and waits on [`events`](Self::events) instead).
    pub(crate) fn wait_event_after(&self, seen: u64) -> Event {
        let mut a = lock(&self.inner.attempts);
        loop {
            if let Some(e) = self.event_after(&a, seen) {
                return e;
            }
            a = self
                .inner
                .attempts_changed
                .wait(a)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The event [`wait_event_after`](Self::wait_event_after) would return now, if any. `a` is the locked
    /// attempt history.
    pub(crate) fn event_after(&self, a: &Attempts, seen: u64) -> Option<Event> {
        if let Some(f) = self.finishing() {
            return Some(Event::Finishing(f));
        }
        (a.failures > seen).then(|| {
            Event::UpgradeFailed(match &a.last {
                Some((_, Err(e))) => e.clone(),
                _ => "upgrade failed".to_string(),
            })
        })
    }

    /// [`event_after`](Self::event_after) taking the lock itself.
    #[cfg(feature = "tokio")]
    pub(crate) fn current_event_after(&self, seen: u64) -> Option<Event> {
        self.event_after(&lock(&self.inner.attempts), seen)
    }

    /// What async event waiters wait on (woken with every change of the attempt history or the finish).
    #[cfg(feature = "tokio")]
    pub(crate) fn events(&self) -> &::tokio::sync::Notify {
        &self.inner.events
    }

    /// Wakes everyone waiting on the attempt history or for an event, blocking and async.
    fn announce(&self) {
        self.inner.attempts_changed.notify_all();
        #[cfg(feature = "tokio")]
        self.inner.events.notify_waiters();
    }

    /// A flag that turns true once this process is finishing, for code that checks it on every request and
    /// must not take a lock there.
    #[cfg(feature = "hyper")]
    pub(crate) fn finishing_flag(&self) -> Arc<AtomicBool> {
        self.inner.finishing_flag.clone()
    }

    /// Whether this process is finishing, and why. Never blocks (it is meant for every request).
    pub fn finishing(&self) -> Option<Finish> {
        self.inner.published.get().copied()
    }

    /// ```no_run
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// match upgrader.wait() {
    ///     exuvia::Finish::Upgraded { child_pid } => eprintln!("handed over to {child_pid}"),
    ///     other => eprintln!("{other:?}"),
    /// }
    /// let report = upgrader.drain();
    /// eprintln!("drained {}, left {}", report.drained, report.left);
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    /// Blocks until this process is finishing, and says why.
    pub fn wait(&self) -> Finish {
        let mut finish = lock(&self.inner.finish);
        loop {
            if let Some(f) = finish.visible() {
                return f;
            }
            finish = self
                .inner
                .finished
                .wait(finish)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// ```no_run
    /// use std::os::fd::AsRawFd;
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// # let udp = upgrader.bind_udp("dns", "127.0.0.1:5353")?;
    /// let mut fds = [
    ///     libc::pollfd { fd: udp.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ///     libc::pollfd { fd: upgrader.finishing_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
    /// ];
    /// // poll(2) both; stop receiving once fds[1] is readable.
    /// # let _ = &mut fds;
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    /// A descriptor that turns readable (end of file) once this process is finishing, for custom loops that
    /// `poll` (a UDP receive loop, say) and should end like [`Incoming`] does.
    pub fn finishing_fd(&self) -> BorrowedFd<'_> {
        self.inner.stop_read.as_fd()
    }

    /// Counts a connection as in flight until the guard drops. [`drain`](Self::drain) waits for all guards.
    pub fn track(&self) -> ConnectionGuard {
        self.inner.tracker.guard()
    }

    /// Connections currently tracked.
    pub fn in_flight(&self) -> usize {
        self.inner.tracker.open()
    }

    /// Waits up to the drain timeout for tracked connections to finish, logs and returns the outcome.
    /// Call it once this process is finishing, then exit.
    pub fn drain(&self) -> DrainReport {
        // Stopped while an upgrade was in flight: its thread is killing the new process (and everything that
        // started); let it finish, so that no process outlives this one.
        self.wait_for_upgrade_to_end(Duration::from_secs(10));
        let open = self.inner.tracker.open();
        tracing::info!(connections = open, timeout = ?self.inner.drain_timeout, "draining");
        // Once handed over, this process is no longer the main one and its status would be dropped (or, with
        // NotifyAccess=all, overwrite the new process's): report only when stopping.
        if matches!(self.finishing(), Some(Finish::Stopped { .. })) {
            self.inner
                .manager
                .status(&format!("stopping: draining {open} connections"));
        }
        let report = self.inner.tracker.drain(self.inner.drain_timeout);
        if report.left > 0 {
            tracing::warn!(
                drained = report.drained,
                left = report.left,
                took_ms = report.took.as_millis() as u64,
                "drain finished at its deadline with connections still open; they end with this process \
                 (raise the drain timeout if they were busy)"
            );
        } else {
            tracing::info!(
                drained = report.drained,
                left = report.left,
                took_ms = report.took.as_millis() as u64,
                "drain finished; exiting"
            );
        }
        report
    }

    /// ```no_run
    /// # let upgrader = exuvia::Upgrader::builder().build()?;
    /// upgrader.handle_signals()?; // before ready(): a SIGHUP must never find the process without it
    /// upgrader.ready()?;
    /// # Ok::<(), exuvia::Error>(())
    /// ```
    /// Handles the conventional signals on a thread of its own: SIGHUP upgrades (a SIGHUP during an upgrade is
    /// refused and logged, never queued), SIGTERM and SIGINT [`shutdown`](Self::shutdown). Works whenever it is
    /// called, whatever threads exist.
    ///
    /// # Errors
    /// If signal handling was already installed in this process, or the handler cannot be installed.
    pub fn handle_signals(&self) -> Result<JoinHandle<()>> {
        if self.inner.signals.swap(true, Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Io,
                "signal handling is already installed for this upgrader",
            ));
        }
        let pipe = sys::signal_pipe(&[libc::SIGHUP, libc::SIGTERM, libc::SIGINT])
            .map_err(|e| Error::io("cannot install signal handlers", e))?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("exuvia-signals".into())
            .spawn(move || me.signal_loop(pipe))
            .map_err(|e| Error::io("cannot start the signal thread", e))
    }

    fn signal_loop(self, pipe: OwnedFd) {
        let mut buf = [0u8; 64];
        loop {
            let n = match sys::read(pipe.as_fd(), &mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "signal pipe failed; signals are no longer handled");
                    return;
                }
            };
            for &sig in &buf[..n] {
                match sig as libc::c_int {
                    libc::SIGHUP => self.upgrade_on_a_thread(),
                    libc::SIGTERM | libc::SIGINT => self.stop_signal_received(sig as i32),
                    _ => {}
                }
            }
        }
    }
}

impl Upgrader {
    fn record_attempt_start(&self, started_usec: u64) {
        lock(&self.inner.attempts).current = Some(started_usec);
        self.announce();
    }

    /// Waits (at most `timeout`) until no upgrade is in flight.
    fn wait_for_upgrade_to_end(&self, timeout: Duration) {
        let ended = self.with_attempts(timeout, |_| {
            (!self.inner.upgrading.load(Ordering::SeqCst)).then_some(())
        });
        if ended.is_none() {
            tracing::warn!("an upgrade is still in flight after {timeout:?}; draining anyway");
        }
    }

    fn record_attempt_end(&self, started_usec: u64, verdict: std::result::Result<u32, String>) {
        let mut a = lock(&self.inner.attempts);
        a.current = None;
        if verdict.is_err() {
            a.failures += 1;
        }
        a.last = Some((started_usec, verdict));
        drop(a);
        self.announce();
    }

    /// Handles a SIGHUP: the upgrade runs on a thread of its own, so that signals arriving meanwhile are seen
    /// (and refused) at once rather than queued behind it. If the OS refuses the thread (a process or thread
    /// limit, `TasksMax=`), that is a failed upgrade like any other: logged, reported to systemd and to the
    /// reload helper, and this process keeps serving and handling signals.
    pub(crate) fn upgrade_on_a_thread(&self) {
        let id = self.sighup_received();
        let me = self.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("exuvia-upgrade".into())
            .spawn(move || me.upgrade_for_sighup(id))
        {
            let why = self.upgrade_could_not_start(&e);
            self.settle_sighup(id, Err(why));
        }
    }

    /// Records an upgrade that could not even start a thread; returns why.
    fn upgrade_could_not_start(&self, e: &std::io::Error) -> String {
        let why = format!(
            "cannot start a thread for the upgrade (process or thread limit reached, e.g. TasksMax=): {e}"
        );
        tracing::error!("{why}; this process keeps serving");
        self.inner.manager.failed(&format!(
            "upgrade failed: {why}; still serving (pid {}, generation {})",
            std::process::id(),
            self.inner.generation
        ));
        self.record_attempt_end(sys::monotonic_usec(), Err(why.clone()));
        self.sighup_handled();
        why
    }

    /// Records a SIGHUP; returns its id for [`upgrade_for_sighup`](Self::upgrade_for_sighup), whose upgrade
    /// counts it as handled once it has started or been refused (the reload helper waits for that). A SIGHUP that
    /// arrives before this process is ready (a new process not yet committed, say: with `systemctl reload`
    /// the signal goes to whatever systemd has as the main process) is not refused but applied once it is.
    fn sighup_received(&self) -> u64 {
        tracing::info!("SIGHUP received");
        let id = {
            let mut a = lock(&self.inner.attempts);
            a.sighup_received += 1;
            let id = a.sighup_received;
            a.sighups.push_back(Sighup {
                id,
                at_usec: sys::monotonic_usec(),
                verdict: None,
            });
            while a.sighups.len() > SIGHUP_RECORDS {
                a.sighups.pop_front();
            }
            id
        };
        self.announce();
        id
    }

    /// Runs the upgrade SIGHUP `id` asked for and records its verdict (or defers it until ready).
    fn upgrade_for_sighup(&self, id: u64) {
        if !self.inner.ready.load(Ordering::SeqCst) && lock(&self.inner.finish).claimed.is_none() {
            let mut a = lock(&self.inner.attempts);
            if a.deferred.is_none() {
                a.deferred = Some(id);
                a.sighup_handled += 1;
                drop(a);
                tracing::info!("SIGHUP before this process is ready: the upgrade runs once it is");
                self.announce();
                return;
            }
        }
        let me = self.clone();
        let result = self.upgrade_then(move || me.sighup_handled());
        let verdict = match &result {
            Ok(r) => Ok(format!("upgraded to pid {}", r.child_pid)),
            Err(e) => Err(e.to_string()),
        };
        self.settle_sighup(id, verdict);
        if let Err(e) = result {
            tracing::warn!(error = %e, "upgrade on SIGHUP did not happen");
        }
    }

    /// Records the verdict of SIGHUP `id`.
    fn settle_sighup(&self, id: u64, verdict: std::result::Result<String, String>) {
        let mut a = lock(&self.inner.attempts);
        if let Some(s) = a.sighups.iter_mut().find(|s| s.id == id) {
            s.verdict = Some(verdict);
        }
        drop(a);
        self.announce();
    }

    /// After `ready`: runs the upgrade a SIGHUP asked for while this process was not ready yet.
    fn run_deferred_sighup(&self) {
        let Some(id) = lock(&self.inner.attempts).deferred.take() else {
            return;
        };
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("exuvia-upgrade".into())
            .spawn(move || me.upgrade_for_sighup(id));
        if let Err(e) = spawned {
            self.settle_sighup(
                id,
                Err(format!("cannot start a thread for the upgrade: {e}")),
            );
        }
    }

    pub(crate) fn stop_signal_received(&self, sig: i32) {
        tracing::info!(signal = %crate::error::signal_name(sig), "stop signal received");
        self.shutdown_by(StopCause::Signal(sig));
    }

    /// Counts a SIGHUP as acted upon (its upgrade started, was refused or deferred).
    fn sighup_handled(&self) {
        lock(&self.inner.attempts).sighup_handled += 1;
        self.announce();
    }

    /// Waits until `f` says it is done with the attempt history, up to `timeout`; the result of the last call.
    pub(crate) fn with_attempts<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&Attempts) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut a = lock(&self.inner.attempts);
        loop {
            if let Some(t) = f(&a) {
                return Some(t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            a = self
                .inner
                .attempts_changed
                .wait_timeout(a, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    pub(crate) fn ready_timeout(&self) -> Duration {
        self.inner.ready_timeout
    }
}

fn finishing_error(f: Finish) -> Error {
    Error::new(
        ErrorKind::Finishing,
        match f {
            Finish::Upgraded { child_pid } => {
                format!("this process already handed over to pid {child_pid}; signal that process instead")
            }
            Finish::Stopped { .. } => "this process is stopping; it will not upgrade".to_string(),
        },
    )
}

fn check_name(name: &str) -> Result<()> {
    if activation::name_is_valid(name) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidName,
            format!(
                "socket name {name:?} is invalid: use 1 to 255 printable ASCII characters without ':' (names \
                 travel in LISTEN_FDNAMES)"
            ),
        ))
    }
}

fn resolve(name: &str, addr: impl ToSocketAddrs) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| {
            Error::with_io(
                ErrorKind::Bind,
                format!("cannot resolve the address for {name:?}"),
                e,
            )
        })?
        .next()
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Bind,
                format!("the address for {name:?} resolves to nothing"),
            )
        })
}

/// Accepts one connection on a seqpacket listener (from [`Upgrader::listen_unix_seqpacket`]).
pub fn accept_seqpacket(listener: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    sys::accept(listener)
}

/// A duration in whole microseconds, for log fields.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod overlap_tests {
    use super::*;

    #[test]
    fn a_channel_among_the_sockets_is_refused() {
        assert!(check_no_overlap(0, None).is_ok());
        assert!(check_no_overlap(2, None).is_ok());
        assert!(check_no_overlap(2, Some(5)).is_ok());
        assert!(check_no_overlap(0, Some(3)).is_ok());
        for fd in [3, 4] {
            let e = check_no_overlap(2, Some(fd)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Environment);
            assert!(e.to_string().contains("names one of the 2 sockets"), "{e}");
        }
    }
}

//! The [`Upgrader`]: one per process. It owns the named sockets, runs at most one upgrade at a time, and tells
//! the application when this process is finishing (handed over, or stopping) and how the drain went.
//!
//! By role, one file each:
//!
//! | file | what it holds |
//! |---|---|
//! | `builder.rs` | [`Builder`]: reading the environment, adopting inherited descriptors (once per process) |
//! | `sockets.rs` | the named sockets: `listen_*`, `bind_*`, `take*` |
//! | `ready.rs` | reporting ready (to the old process or to systemd), the watchdog, `fail` |
//! | `upgrade.rs` | one upgrade, as named steps: begin, start, await ready, commit, conclude |
//! | `finish.rs` | stopping, publishing the finish, waiting for it and for events, the drain |
//! | `signals.rs` | SIGHUP/SIGTERM/SIGINT, and the record of each SIGHUP's verdict |
//! | `control.rs` | the control server's side: what the control socket may ask of this process |
//!
//! The lifecycle itself (states, steps, the one lock) is [`crate::lifecycle`].

mod builder;
mod control;
mod finish;
mod moving;
mod ready;
mod signals;
mod sockets;
mod upgrade;

use std::ffi::OsString;
use std::fmt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub use builder::Builder;

pub use sockets::accept_seqpacket;
pub use upgrade::UpgradeReport;

use crate::drain::Tracker;
use crate::handover::channel::Channel;
use crate::handover::child::ParentLink;
use crate::lifecycle::{Finish, Finishing, Lifecycle};
use crate::registry::Sockets;
use crate::systemd::Manager;

type StateFn = Box<dyn Fn() -> Vec<u8> + Send + Sync>;

/// Something the application may want to act on, from [`Upgrader::wait_event`] (or `next_event` with Tokio).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// This process is finishing: drain and exit.
    Finishing(Finish),
    /// An upgrade failed; this process keeps serving. The text says why (as the error did).
    UpgradeFailed(String),
    /// The new process died within its probation window and this process took the service back: it serves
    /// again. The text says how the new process ended.
    RolledBack(String),
}

/// What every clone of an [`Upgrader`] shares: configuration (fixed at `build`), the sockets, the lifecycle.
struct Inner {
    /// How this process came to serve.
    origin: Origin,
    /// Built with `Builder::take_over` (said in the `config` answer).
    take_over: bool,
    program: PathBuf,
    argv: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    ready_timeout: Duration,
    drain_timeout: Duration,
    /// [`Builder::stream_grace`] (only the async layers wait on it).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    stream_grace: Duration,
    background_init: bool,
    /// The probation window this process gives each new process after a commit (zero: none).
    successor_probation: Duration,
    /// How long an accept queue may be held during that window before the new process counts as stalled.
    probation_stall: Duration,
    /// While the old process watches this one through its probation window: the channel to tell it that a
    /// stop reached this process (taken, then written outside the lock, by the stop's bookkeeping).
    predecessor: Mutex<Option<Channel>>,
    /// Whether fresh binds go to systemd's file-descriptor store.
    fd_store: bool,
    /// The window the old process watches this one through, when it started this one with a probation.
    own_probation: Option<Duration>,
    /// When that window ends (set once the handover is confirmed).
    own_probation_ends: std::sync::OnceLock<std::time::Instant>,
    /// The application's state for the next process ([`Builder::state`]).
    app_state: Option<StateFn>,
    registry: Sockets,
    /// The link to the old process, until this one has reported ready.
    parent: Mutex<Option<ParentLink>>,
    inherited_state: Option<Vec<u8>>,
    generation: u32,
    /// States, steps and the attempt record, under one lock; the finish readable without it.
    lifecycle: Lifecycle,
    tracker: Tracker,
    signals: AtomicBool,
    manager: Manager,
    /// The control socket, served from [`Upgrader::ready`] on.
    control: Mutex<Option<UnixListener>>,
    /// The connection channel from the old process, until the application takes [`Upgrader::arrivals`].
    moves: Mutex<Option<std::os::fd::OwnedFd>>,
    /// [`Builder::move_connections`].
    move_connections: bool,
    /// Whether the application took [`Upgrader::arrivals`] (once).
    arrivals_taken: AtomicBool,
    /// The new process of the last commit, as far as moving connections goes (a rollback clears it).
    successor: Mutex<Option<crate::moving::Successor>>,
    /// The WebSocket connections that moved here, on their way to the application (HTTP layer).
    #[cfg(feature = "hyper")]
    websockets: crate::hyper::WebSocketQueue,
}

/// How a process came to serve: what [`Upgrader::origin`] says, and `exuvia-ctl status` as `origin=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Origin {
    /// Started afresh (by the service manager, a shell): it bound or was passed its sockets.
    Fresh,
    /// Started by the previous process's upgrade (`systemctl reload`, SIGHUP, `exuvia-ctl upgrade`).
    Upgrade,
    /// Started by someone else, it took the service over from the process that served before
    /// ([`Builder::take_over`]).
    Takeover,
}

impl Origin {
    /// `fresh`, `upgrade` or `takeover`.
    pub fn name(&self) -> &'static str {
        match self {
            Origin::Fresh => "fresh",
            Origin::Upgrade => "upgrade",
            Origin::Takeover => "takeover",
        }
    }
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

impl Upgrader {
    /// Starts configuring the upgrader.
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// How this process came to serve: fresh, by an upgrade, or by a takeover.
    pub fn origin(&self) -> Origin {
        self.inner.origin
    }

    /// Whether this process was started by an upgrade or a takeover (as opposed to fresh, or by systemd).
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

    /// [`Builder::stream_grace`].
    #[cfg(feature = "tokio")]
    pub(crate) fn stream_grace(&self) -> Duration {
        self.inner.stream_grace
    }

    /// The read-only view of the lifecycle that accept loops and the async layers hold.
    pub(crate) fn finishing_handle(&self) -> Finishing {
        self.inner.lifecycle.handle()
    }
}

/// A duration in whole microseconds, for log fields.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

//! Replace a running network service's binary with no connection refused and none dropped.
//!
//! # From the top
//!
//! On an upgrade signal the running process (the *exuvia*, the skin left behind) forks (a vfork-style `clone`) and executes the binary
//! on disk. The new process inherits the very same listening sockets, initialises while the old one keeps
//! accepting, and reports ready; only then does the old process stop accepting, hand its established
//! connections over ([`moving`]) or drain them within a deadline, and exit. If the new process crashes, hangs or fails, the old one kills it and serves on.
//! One upgrade runs at a time.
//!
//! A handful of types do it:
//!
//! - [`Upgrader`], built once per process by [`Upgrader::builder`]: hands out named sockets (inherited or
//!   freshly bound), runs upgrades, says when the process is [`Finish`]ing, tracks connections for the drain.
//! - [`Incoming`]: a blocking accept loop that ends by itself once the process hands over.
//! - [`ConnectionGuard`] and [`DrainReport`]: what the drain waits for, and how it went.
//! - [`moving`]: established connections handed to the new process with their state
//!   ([`Upgrader::departures`] in the old process, [`Upgrader::arrivals`] in the new one).
//! - [`Error`] with an [`ErrorKind`]: every failure, with a message for an operator.
//!
//! For HTTP services, `exuvia::axum::serve` (feature `axum`) and `exuvia::hyper::serve` (feature `hyper`)
//! serve the connections and hand them over right: each HTTP/1 keep-alive connection moves to the new process
//! after its current response (or, where it cannot, its next response closes it; idle connections are served
//! rather than cut), HTTP/2 gets GOAWAY (see the `hyper` module).
//!
//! # A service, without any async runtime
//!
//! ```no_run
//! use std::io::Write;
//!
//! fn main() -> Result<(), exuvia::Error> {
//!     // First thing in main, before threads: adopts inherited sockets, greets the old process if any.
//!     let upgrader = exuvia::Upgrader::builder().build()?;
//!     // Inherited from the old process when upgraded, bound fresh otherwise.
//!     let listener = upgrader.listen_tcp("http", "127.0.0.1:8080")?;
//!     upgrader.handle_signals()?; // SIGHUP upgrades, SIGTERM/SIGINT stop
//!
//!     // ... load configuration, warm caches: the old process serves meanwhile ...
//!     upgrader.ready()?; // the old process (if any) now stops accepting and drains
//!
//!     let u = upgrader.clone();
//!     std::thread::spawn(move || {
//!         for conn in u.incoming(listener) {
//!             let Ok(mut conn) = conn else { continue };
//!             let guard = u.track(); // counted until dropped
//!             std::thread::spawn(move || {
//!                 let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nhi\n");
//!                 drop(guard);
//!             });
//!         }
//!     });
//!
//!     let why = upgrader.wait(); // until upgraded or stopped
//!     let report = upgrader.drain(); // in-flight connections, up to the drain timeout
//!     eprintln!("{why:?}: drained {}, left {}", report.drained, report.left);
//!     Ok(())
//! }
//! ```
//!
//! # Under systemd
//!
//! With `NOTIFY_SOCKET` set, the [`Upgrader`] speaks sd_notify through the handover (`RELOADING=1` with
//! `MONOTONIC_USEC`, `EXTEND_TIMEOUT_USEC`, one datagram `MAINPID=<new>` + `READY=1`, the barrier, `STOPPING=1`),
//! feeds the watchdog from whichever process is main, and adopts sockets passed by name (`FileDescriptorName=`).
//! The unit templates in the repository's `units/` directory, the [`control`] socket and the `exuvia-ctl`
//! helper make `systemctl reload` return the upgrade's verdict and `systemctl stop` drain. [`notify`] is the
//! sd_notify client on its own.
//!
//! # Takeover: a new process started by someone else
//!
//! An upgrade runs the same path with the same settings. To change what runs (another install path, other
//! unit settings, another container), start the new version yourself with [`Builder::take_over`]: its
//! `build()` asks the process serving the [`control`] socket for the service (only the same user or root may),
//! receives the sockets by name and the state, and from there it is an upgrade:
//! the old process serves until [`Upgrader::ready`], serves on if the new one fails, hangs or dies (rolls back
//! inside a probation window), and moves or drains its connections once the new one is committed. With nothing
//! serving the socket, `build()` starts fresh. Exit with [`EXIT_TAKEOVER_FAILED`] when a takeover is refused.
//! [`Upgrader::origin`] says how a process came to serve. The repository's `units/exuvia-app@.service` runs
//! blue/green instances that take over from each other.
//!
//! # What the new process receives
//!
//! The sockets sit at fds 3, 4, ... with `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` set to the new
//! process's own pid, so any `sd_listen_fds`-compatible code works in it. The private handover channel comes
//! right after them; it and its `EXUVIA_HANDOVER_*` variables are the only additions. Every other
//! descriptor is closed on exec, whatever flags it was opened with.
//!
//! The program executed is, by default, the path this process was started from (as `execve` saw it, made
//! absolute), not `/proc/self/exe`: after a package upgrade that link points at the old, deleted file.
//!
//! # Caveats
//!
//! - Build the [`Upgrader`] before starting threads. It removes the fd-passing variables from the
//!   environment, which is only sound while the process has one thread; later, it leaves them in place.
//!   Either way the inherited descriptors are adopted once per process: a second `build()` that would adopt
//!   them again fails with [`ErrorKind::AlreadyTaken`] (build one `Upgrader` and clone it).
//! - Do not set SIGCHLD to `SIG_IGN`: the upgrader reaps the processes it starts.
//! - `O_NONBLOCK` belongs to the kernel socket, shared by the old and new process. [`Incoming`] and the
//!   Tokio layer put it in non-blocking mode (a blocking `accept` that lost a connection to the other
//!   process would wait, deaf to the handover, for the next one); a hand-written accept loop must treat
//!   `EAGAIN` as "someone else took it".
//! - Linux 5.3 or newer (pidfd).
//!
//! See `docs/DESIGN.md` in the repository for the architecture and the handover sequence.

#![deny(unsafe_op_in_unsafe_fn)]
// Every unsafe block lives in src/sys/ and says why it is sound; the rest of the crate cannot have one.
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod accept;
mod activation;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod axum;
pub mod control;
mod drain;
mod error;
#[cfg(test)]
mod fuzz;
mod handover;
#[cfg(feature = "hyper")]
#[cfg_attr(docsrs, doc(cfg(feature = "hyper")))]
pub mod hyper;
mod lifecycle;
mod listen;
pub mod logging;
pub mod moving;
pub mod notify;
mod registry;
#[allow(unsafe_code)]
mod sys;
mod systemd;
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub mod tokio;
mod upgrader;

pub use accept::{Accept, Incoming};
pub use drain::{ConnectionGuard, DrainReport};
pub use error::{Error, ErrorKind, Result};
pub use handover::protocol::MAX_STATE_LEN;
pub use lifecycle::{Finish, StopCause};
pub use listen::{BindOptions, SocketKind};
pub use notify::{Notifier, State};
pub use upgrader::{accept_seqpacket, Builder, Event, Origin, UpgradeReport, Upgrader};

/// The exit status of a process whose takeover failed ([`Builder::take_over`]): 75 (`EX_TEMPFAIL`). The
/// library exits with it when the running process gives up on the taker while it initialises; an application
/// should exit with it too when [`Builder::build`] or [`Upgrader::ready`] fails with
/// [`ErrorKind::TakeoverRefused`]. The blue/green template (`units/exuvia-app@.service`) names it in
/// `RestartPreventExitStatus=`: the other instance still serves, so restarting would only fail again.
pub const EXIT_TAKEOVER_FAILED: u8 = 75;

/// Every environment variable that carries descriptors or the handover to a process: `LISTEN_*` and
/// `EXUVIA_HANDOVER_*`. [`Builder::build`] removes them from the environment when it runs before any other
/// thread exists (as it should: first thing in `main`). Once other threads run, removing them is unsound (a
/// thread may read the environment meanwhile), so they stay, and every program this process starts inherits
/// them; they name this process's pid, so a well-behaved reader ignores them, but remove them from the
/// commands you start:
///
/// ```
/// let mut helper = std::process::Command::new("true");
/// for name in exuvia::HANDOVER_VARIABLES {
///     helper.env_remove(name);
/// }
/// assert!(helper.status()?.success());
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// (The new process of an upgrade never inherits them: exuvia sets its own.)
pub const HANDOVER_VARIABLES: &[&str] = handover::env::ALL;

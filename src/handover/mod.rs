//! The versioned parent → child handover: starting the new binary with the sockets ([`parent`]), adopting
//! them and reporting readiness in the new process ([`child`]), and the channel between the two
//! ([`protocol`], [`channel`]).
//!
//! The sequence, seen from the old process (parent):
//!
//! 1. `fork`, then in the child place the sockets at fds 3.. and the channel right after them, set
//!    `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID` (the child's own pid, written after `fork`) and the
//!    `EXUVIA_HANDOVER_*` variables, mark every other fd close-on-exec, `execve` the program on disk;
//! 2. send `Hello` (parent pid, generation, application state);
//! 3. wait for `Ready` or `Failed`, the child's exit (a pidfd), or the deadline; on anything but `Ready`,
//!    SIGKILL and reap the child and keep serving;
//! 4. send `Commit`: from here the child is the main process; the parent stops accepting and drains.

pub(crate) mod channel;
pub(crate) mod child;
pub(crate) mod parent;
pub(crate) mod probation;
pub(crate) mod protocol;

/// The variable that names the channel's fd in the child.
pub(crate) const VAR_FD: &str = "EXUVIA_HANDOVER_FD";
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

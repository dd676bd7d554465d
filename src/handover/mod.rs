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
pub(crate) mod env;
pub(crate) mod parent;
pub(crate) mod probation;
pub(crate) mod protocol;
pub(crate) mod takeover;

/// How the new process came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Came {
    /// This process started it (clone + exec): its child, in a process group of its own until the commit.
    Spawned,
    /// Someone else started it and it asked for the service over the control socket (see
    /// [`takeover`]): not this process's child, watched through its pidfd only.
    TookOver,
}

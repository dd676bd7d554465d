//! The system layer: the only module allowed `unsafe` (the crate denies it everywhere else), grouped by topic.
//!
//! | file | what it holds |
//! |---|---|
//! | `fd.rs` | descriptors: adopting inherited ones, flags, pipes, reads, `poll` |
//! | `net.rs` | sockets: what a descriptor is, peer credentials, datagrams with descriptors attached, shutdown |
//! | `process.rs` | processes: pidfds, waiting, killing, process groups, the program path, the clock |
//! | `signal.rs` | the signal self-pipe (chained handlers through signal-hook-registry) |
//! | `scheduling.rs` | CPU scheduling for background initialisation |
//! | `spawn.rs` | `clone(CLONE_VM | CLONE_VFORK)` + `execve`, hand-written (see docs/DESIGN.md) |
//!
//! Everything returns owned or borrowed file descriptors, never bare integers, except where the kernel's own
//! interface is an integer (a pid, a signal number). Most calls go through rustix (system calls with owned
//! descriptors, no `unsafe` at the call site) and socket2 (in `listen.rs`); what is left here by hand is what
//! no crate does right, and every `unsafe` block says why it is sound (`clippy::undocumented_unsafe_blocks`).

mod fd;
mod net;
mod process;
mod scheduling;
mod signal;
mod spawn;

#[cfg(feature = "tokio")]
pub(crate) use fd::async_readable;
pub(crate) use fd::{
    file_identity, pipe, read, set_cloexec, set_nonblocking, Inherited, PollFlags, PollSet,
};
pub(crate) use net::{
    accept, accept_queue, packet_pair, peer, peer_pidfd, peer_uid, recv_packet, send_packet,
    send_stream_with_fds, send_unix_datagram, set_socket_mode, socket_info, AddressFamily, Peer,
    SocketInfo, SocketType, UnixTarget,
};
#[cfg(feature = "hyper")]
pub(crate) use net::{Cut, Cuttable};
pub(crate) use process::{
    descriptors_left, euid, exec_filename, getpgid, join_process_group, kill_own_process_group,
    kill_pidfd, kill_process, kill_process_group, monotonic_usec, pidfd_open, terminate_pidfd,
    thread_count, waitpid,
};
pub(crate) use scheduling::{
    may_return_to, return_to_normal_scheduling, scheduling, thread_policies, Policy, Scheduling,
};
pub(crate) use signal::{sighup_pending, sighups_caught, signal_pipe, watch_sighup};
pub(crate) use spawn::{spawn, SpawnError, SpawnPlan, SpawnStep};

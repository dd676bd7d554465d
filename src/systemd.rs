//! What the service manager is told at each step of the handover, and the watchdog.
//!
//! The sequence follows what systemd accepts (253+ for `Type=notify-reload`; see `docs/DESIGN.md`):
//!
//! - fresh start: `READY=1` + `STATUS=`;
//! - upgrade requested: `RELOADING=1` + `MONOTONIC_USEC=` (read after the signal arrived) + `STATUS=`, and
//!   `EXTEND_TIMEOUT_USEC=` while the new process initialises, so that a ready timeout longer than systemd's
//!   `TimeoutStartSec=` is honoured;
//! - new process ready: ONE datagram `MAINPID=<new>` + `READY=1` + `STATUS=`, then the barrier, and only then
//!   the old process stops accepting (with `NotifyAccess=main` only the main pid may notify, and `MAINPID=`
//!   is authorised against the old one);
//! - upgrade failed: `READY=1` (ends the reload; systemd has no "reload failed") + `STATUS=` with the reason;
//! - stop: `STOPPING=1`.
//!
//! A process whose environment says nothing (no `NOTIFY_SOCKET`) skips all of it. A broken `NOTIFY_SOCKET`
//! is logged and ignored: the service keeps serving rather than failing on a variable it cannot use.

use std::ffi::OsStr;
use std::time::Duration;

use crate::notify::{monotonic_usec, Notifier, State};

/// How long the old process waits for systemd to process `MAINPID=` before it stops accepting.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);
/// systemd shows STATUS in one line of `systemctl status`; keep it readable.
const MAX_STATUS: usize = 512;

pub(crate) const VAR_WATCHDOG_USEC: &str = "WATCHDOG_USEC";
pub(crate) const VAR_WATCHDOG_PID: &str = "WATCHDOG_PID";

/// This process's link to the service manager (possibly none).
#[derive(Debug, Default)]
pub(crate) struct Manager {
    notifier: Option<Notifier>,
    watchdog: Option<Duration>,
}

/// The watchdog interval the environment asks this process to honour, per sd_watchdog_enabled(3): set only
/// when `WATCHDOG_USEC` is a positive number and `WATCHDOG_PID`, if present, is this pid.
pub(crate) fn parse_watchdog(
    usec: Option<&OsStr>,
    pid: Option<&OsStr>,
    my_pid: u32,
) -> Option<Duration> {
    let usec: u64 = usec?.to_str()?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        let pid: u32 = pid.to_str()?.trim().parse().ok()?;
        if pid != my_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

pub(crate) fn one_line(s: &str) -> String {
    let mut line: String = s
        .chars()
        .map(|c| {
            if c == '\n' || c == '\r' || c == '\0' {
                ' '
            } else {
                c
            }
        })
        .collect();
    if line.len() > MAX_STATUS {
        let mut end = MAX_STATUS;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line
}

impl Manager {
    pub(crate) fn from_env(enabled: bool) -> Manager {
        if !enabled {
            return Manager::default();
        }
        let notifier = match Notifier::from_env() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring NOTIFY_SOCKET: the service manager will not be told about upgrades");
                None
            }
        };
        let watchdog = parse_watchdog(
            std::env::var_os(VAR_WATCHDOG_USEC).as_deref(),
            std::env::var_os(VAR_WATCHDOG_PID).as_deref(),
            std::process::id(),
        );
        if let Some(w) = watchdog {
            tracing::debug!(interval = ?w, "systemd watchdog enabled");
        }
        Manager { notifier, watchdog }
    }

    /// The watchdog interval, if this process must feed one.
    /// Whether there is a service manager to tell anything.
    pub(crate) fn enabled(&self) -> bool {
        self.notifier.is_some()
    }

    pub(crate) fn watchdog(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.notifier.is_some())
    }

    fn send(&self, states: &[State<'_>]) {
        if let Some(n) = &self.notifier {
            if let Err(e) = n.notify(states) {
                tracing::warn!(error = %e, "sd_notify failed");
            }
        }
    }

    pub(crate) fn ready(&self, status: &str) {
        self.send(&[State::Ready, State::Status(&one_line(status))]);
    }

    pub(crate) fn reloading(&self, status: &str, extend: Duration) {
        let now = monotonic_usec();
        self.send(&[
            State::Reloading,
            State::MonotonicUsec(now),
            State::Status(&one_line(status)),
            State::ExtendTimeoutUsec(extend.as_micros() as u64),
        ]);
    }

    pub(crate) fn extend(&self, by: Duration) {
        self.send(&[State::ExtendTimeoutUsec(by.as_micros() as u64)]);
    }

    pub(crate) fn ping(&self) {
        if self.watchdog().is_some() {
            self.send(&[State::Watchdog]);
        }
    }

    /// Moves the main pid to `child` and completes the reload: one datagram. Anything the new process sends
    /// afterwards queues behind it on the same socket, so systemd reads it as the main process's.
    pub(crate) fn announce_main(&self, child: u32, status: &str) {
        let Some(n) = &self.notifier else { return };
        let status = one_line(status);
        if let Err(e) = n.notify(&[State::MainPid(child), State::Ready, State::Status(&status)]) {
            tracing::warn!(error = %e, "sd_notify MAINPID failed; systemd may still consider this process the main one");
        }
    }

    /// Waits until systemd has processed everything sent so far (the barrier): before this process stops
    /// accepting and may exit, systemd must already know the new main process, or it would take this
    /// process's exit for the service's.
    pub(crate) fn confirm_main(&self) {
        let Some(n) = &self.notifier else { return };
        if let Err(e) = n.barrier(BARRIER_TIMEOUT) {
            tracing::warn!(error = %e, "systemd did not confirm the MAINPID change; handing over anyway");
        }
    }

    /// Keeps `fd` in systemd's file-descriptor store under `name` (`FDSTORE=1`, `FDNAME=`, `FDPOLL=0`): it
    /// outlives a crash or a restart of the service and comes back in `LISTEN_FDS` under that name.
    pub(crate) fn store_fd(&self, name: &str, fd: std::os::fd::BorrowedFd<'_>) {
        let Some(n) = &self.notifier else { return };
        match n.notify_with_fds(
            &[State::FdStore, State::FdName(name), State::FdPollDisabled],
            &[fd],
        ) {
            Ok(()) => tracing::info!(name, "socket kept in systemd's file-descriptor store"),
            Err(e) => tracing::warn!(
                name,
                error = %e,
                "cannot keep the socket in systemd's file-descriptor store (FileDescriptorStoreMax= in the unit?)"
            ),
        }
    }

    /// Drops whatever systemd's file-descriptor store holds under `name` (`FDSTOREREMOVE=1`), before a socket
    /// of that name is stored anew: two stored sockets of one name would make the next start refuse both.
    pub(crate) fn unstore_fd(&self, name: &str) {
        self.send(&[State::FdStoreRemove, State::FdName(name)]);
    }

    /// Takes the service back after a rollback: this process is the main one again.
    pub(crate) fn take_back(&self, status: &str) {
        self.send(&[
            State::MainPid(std::process::id()),
            State::Ready,
            State::Status(&one_line(status)),
        ]);
    }

    pub(crate) fn failed(&self, status: &str) {
        self.send(&[State::Ready, State::Status(&one_line(status))]);
    }

    pub(crate) fn stopping(&self, status: &str) {
        self.send(&[State::Stopping, State::Status(&one_line(status))]);
    }

    pub(crate) fn status(&self, status: &str) {
        self.send(&[State::Status(&one_line(status))]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(usec: Option<&str>, pid: Option<&str>) -> Option<Duration> {
        parse_watchdog(usec.map(OsStr::new), pid.map(OsStr::new), 10)
    }

    #[test]
    fn watchdog_rules_follow_sd_watchdog_enabled() {
        assert_eq!(w(Some("2000000"), None), Some(Duration::from_secs(2)));
        assert_eq!(w(Some("2000000"), Some("10")), Some(Duration::from_secs(2)));
        assert_eq!(w(Some("2000000"), Some("11")), None);
        for (u, p) in [
            (None, None),
            (Some("0"), None),
            (Some("x"), None),
            (Some("-5"), None),
            (Some("5"), Some("x")),
        ] {
            assert_eq!(w(u, p), None, "{u:?} {p:?}");
        }
    }

    #[test]
    fn status_is_one_bounded_line() {
        assert_eq!(one_line("a\nb\rc"), "a b c");
        assert!(one_line(&"é".repeat(1000)).len() <= MAX_STATUS);
    }
}

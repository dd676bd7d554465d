//! Processes: pidfds, waiting, killing, process groups, this program's path, thread count, and the clock
//! systemd compares against.

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;

use rustix::process::{Pid, Signal, WaitOptions};

fn pid(raw: i32) -> io::Result<Pid> {
    Pid::from_raw(raw).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))
}

/// `pidfd_open(2)`: a descriptor that becomes readable when the process exits (Linux 5.3+).
pub(crate) fn pidfd_open(raw: libc::pid_t) -> io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_open(
        pid(raw)?,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// `waitpid(2)` for one pid. With `nohang`, `Ok(None)` means it is still running.
pub(crate) fn waitpid(raw: libc::pid_t, nohang: bool) -> io::Result<Option<ExitStatus>> {
    let flags = if nohang {
        WaitOptions::NOHANG
    } else {
        WaitOptions::empty()
    };
    let pid = pid(raw)?;
    let r = rustix::io::retry_on_intr(|| rustix::process::waitpid(Some(pid), flags))?;
    Ok(r.map(|(_, status)| ExitStatus::from_raw(status.as_raw())))
}

/// SIGKILL to one process.
pub(crate) fn kill_process(raw: libc::pid_t) -> io::Result<()> {
    Ok(rustix::process::kill_process(pid(raw)?, Signal::KILL)?)
}

/// SIGTERM to one process.
pub(crate) fn terminate_process(raw: libc::pid_t) -> io::Result<()> {
    Ok(rustix::process::kill_process(pid(raw)?, Signal::TERM)?)
}

/// SIGKILL to every process of a process group.
pub(crate) fn kill_process_group(pgid: libc::pid_t) -> io::Result<()> {
    Ok(rustix::process::kill_process_group(
        pid(pgid)?,
        Signal::KILL,
    )?)
}

/// SIGKILL to this process's own group (this process included).
pub(crate) fn kill_own_process_group() -> io::Result<()> {
    Ok(rustix::process::kill_current_process_group(Signal::KILL)?)
}

/// The process group of `pid` (0: this process).
pub(crate) fn getpgid(raw: libc::pid_t) -> io::Result<libc::pid_t> {
    let of = if raw == 0 { None } else { Some(pid(raw)?) };
    Ok(rustix::process::getpgid(of)?.as_raw_nonzero().get())
}

/// Moves this process into process group `pgid` (of the same session).
pub(crate) fn join_process_group(pgid: libc::pid_t) -> io::Result<()> {
    Ok(rustix::process::setpgid(None, Some(pid(pgid)?))?)
}

/// This process's effective uid.
pub(crate) fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The pathname this program was executed by (`AT_EXECFN`), as given to `execve`: it may be relative, and it
/// names the file on disk, not the running inode.
pub(crate) fn exec_filename() -> Option<PathBuf> {
    let name = rustix::param::linux_execfn().to_bytes();
    (!name.is_empty()).then(|| PathBuf::from(OsString::from_vec(name.to_vec())))
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd's `MONOTONIC_USEC=` is compared against.
pub(crate) fn monotonic_usec() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The number of threads in this process, from `/proc/self/status` (`None` if it cannot be read).
pub(crate) fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_visible() {
        let me = std::process::id() as i32;
        assert!(getpgid(0).unwrap() > 0);
        assert_eq!(getpgid(me).unwrap(), getpgid(0).unwrap());
        drop(pidfd_open(me).unwrap());
        assert!(exec_filename().is_some());
        assert!(thread_count().unwrap() >= 1);
        let a = monotonic_usec();
        assert!(monotonic_usec() >= a);
        assert_eq!(
            pidfd_open(0).unwrap_err().raw_os_error(),
            Some(libc::ESRCH),
            "pid 0 is nobody's"
        );
    }

    #[test]
    fn a_killed_child_is_reaped_with_its_signal() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Reaped below by pid, through our own waitpid (std's `wait` would find it gone).
        std::mem::forget(child);
        assert_eq!(waitpid(pid, true).unwrap(), None);
        kill_process(pid).unwrap();
        let status = waitpid(pid, false).unwrap().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}

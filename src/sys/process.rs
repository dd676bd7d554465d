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

/// The crate's pid type is `u32` (std's `process::id()`, the public API's, the handover protocol's); the
/// kernel's is a positive `pid_t`, which rustix's `Pid` carries. Converted here only: 0 and numbers past
/// `i32::MAX` name no process.
fn pid(p: u32) -> io::Result<Pid> {
    i32::try_from(p)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))
}

/// A kernel pid as the crate's `u32`.
pub(crate) fn pid_u32(p: Pid) -> u32 {
    p.as_raw_nonzero().get().unsigned_abs()
}

/// `pidfd_open(2)`: a descriptor that becomes readable when the process exits (Linux 5.3+).
pub(crate) fn pidfd_open(raw: u32) -> io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_open(
        pid(raw)?,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// `waitpid(2)` for one pid. With `nohang`, `Ok(None)` means it is still running.
pub(crate) fn waitpid(raw: u32, nohang: bool) -> io::Result<Option<ExitStatus>> {
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
pub(crate) fn kill_process(raw: u32) -> io::Result<()> {
    Ok(rustix::process::kill_process(pid(raw)?, Signal::KILL)?)
}

/// SIGKILL to the process a pidfd names: never another one that reused its pid.
pub(crate) fn kill_pidfd(pidfd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::process::pidfd_send_signal(pidfd, Signal::KILL)?)
}

/// SIGTERM to the process a pidfd names.
pub(crate) fn terminate_pidfd(pidfd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::process::pidfd_send_signal(pidfd, Signal::TERM)?)
}

/// SIGKILL to every process of a process group.
pub(crate) fn kill_process_group(pgid: u32) -> io::Result<()> {
    Ok(rustix::process::kill_process_group(
        pid(pgid)?,
        Signal::KILL,
    )?)
}

/// SIGKILL to this process's own group (this process included).
pub(crate) fn kill_own_process_group() -> io::Result<()> {
    Ok(rustix::process::kill_current_process_group(Signal::KILL)?)
}

/// The process group of `pid` (`None`: this process).
pub(crate) fn getpgid(of: Option<u32>) -> io::Result<u32> {
    let of = of.map(pid).transpose()?;
    Ok(pid_u32(rustix::process::getpgid(of)?))
}

/// Moves this process into process group `pgid` (of the same session).
pub(crate) fn join_process_group(pgid: u32) -> io::Result<()> {
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

/// How many more descriptors this process may open: its soft `RLIMIT_NOFILE` less those open now (counted in
/// `/proc/self/fd`). `None` when either cannot be read, or there is no limit.
pub(crate) fn descriptors_left() -> Option<usize> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current?;
    // The count includes the directory's own descriptor while it is read: one more than is open after.
    let open = std::fs::read_dir("/proc/self/fd")
        .ok()?
        .count()
        .saturating_sub(1);
    Some((limit as usize).saturating_sub(open))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_left_falls_as_descriptors_open() {
        let before = descriptors_left().expect("a limit and /proc");
        let held: Vec<_> = (0..10)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let after = descriptors_left().unwrap();
        // Other test threads open and close descriptors meanwhile: roughly ten fewer.
        assert!(after + 5 <= before, "{before} -> {after}");
        drop(held);
    }

    #[test]
    fn this_process_is_visible() {
        let me = std::process::id();
        assert!(getpgid(None).unwrap() > 0);
        assert_eq!(getpgid(Some(me)).unwrap(), getpgid(None).unwrap());
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
        let pid = child.id();
        // Reaped below by pid, through our own waitpid (std's `wait` would find it gone).
        std::mem::forget(child);
        assert_eq!(waitpid(pid, true).unwrap(), None);
        kill_process(pid).unwrap();
        let status = waitpid(pid, false).unwrap().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}

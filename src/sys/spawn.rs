//! Starting the new program: `clone(CLONE_VM | CLONE_VFORK)` + `execve`, hand-written because no crate does it
//! right for this use (see docs/DESIGN.md, "The system layer").
//!
//! The spawn path prepares every byte it needs beforehand and runs only async-signal-safe calls in the child,
//! so that it is sound in a process with threads. It uses `clone(CLONE_VM | CLONE_VFORK)`, as `posix_spawn`
//! does, not `fork`: a fork copies the page tables of the whole (possibly large) process while holding its
//! memory-map lock, and leaves every page copy-on-write, so a serving process would stall on page faults
//! right when it must keep serving. `posix_spawn` itself (std's `Command` uses it) cannot place descriptors
//! at 3.. from arbitrary sources safely, write the child's own pid into its environment, join a new process
//! group and lower the child to `SCHED_IDLE`, all before exec, and report which step failed.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::{kill_process, pipe, read, waitpid};

/// Everything the child needs, prepared before the child exists so that the child allocates nothing.
#[derive(Debug)]
pub(crate) struct SpawnPlan {
    path: CString,
    argv: Vec<CString>,
    /// Each entry `NAME=VALUE\0`; pid slots are `NAME=` followed by [`PID_SLOT`] NUL bytes.
    env: Vec<Vec<u8>>,
    pid_slots: Vec<usize>,
    /// Start the program at `SCHED_IDLE` (background initialisation).
    pub(crate) idle: bool,
}

/// Room for a decimal pid (pid_t is 32-bit: at most 10 digits) plus the terminating NUL.
const PID_SLOT: usize = 12;

/// Where [`spawn`] failed: the step and the OS error.
#[derive(Debug)]
pub(crate) struct SpawnError {
    pub(crate) step: SpawnStep,
    pub(crate) error: io::Error,
}

/// The steps of [`spawn`] that can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpawnStep {
    /// Preparing in this process (a pipe, the child's stack) or `clone` itself.
    Start,
    /// Placing the sockets at their descriptor numbers in the child.
    PlaceFds,
    /// Lowering the child to `SCHED_IDLE` (background initialisation).
    Priority,
    /// `execve` of the program.
    Exec,
}

impl SpawnStep {
    fn code(self) -> u32 {
        match self {
            SpawnStep::Start => 0,
            SpawnStep::PlaceFds => 1,
            SpawnStep::Priority => 2,
            SpawnStep::Exec => 3,
        }
    }

    fn from_code(c: u32) -> SpawnStep {
        match c {
            1 => SpawnStep::PlaceFds,
            2 => SpawnStep::Priority,
            3 => SpawnStep::Exec,
            _ => SpawnStep::Start,
        }
    }
}

impl SpawnPlan {
    pub(crate) fn new(path: &Path, argv: &[OsString]) -> io::Result<SpawnPlan> {
        let nul = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{what} contains a NUL byte"),
            )
        };
        let path = CString::new(path.as_os_str().as_bytes()).map_err(|_| nul("program path"))?;
        let argv = argv
            .iter()
            .map(|a| CString::new(a.as_bytes()).map_err(|_| nul("an argument")))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(SpawnPlan {
            path,
            argv,
            env: Vec::new(),
            pid_slots: Vec::new(),
            idle: false,
        })
    }

    /// Adds `name=value`. Entries with a NUL byte cannot be passed by `execve` and are refused.
    pub(crate) fn env(&mut self, name: &[u8], value: &[u8]) -> io::Result<()> {
        if name.is_empty() || name.contains(&b'=') || name.contains(&0) || value.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "environment variable {:?} cannot be passed to a new program",
                    String::from_utf8_lossy(name)
                ),
            ));
        }
        let mut e = Vec::with_capacity(name.len() + value.len() + 2);
        e.extend_from_slice(name);
        e.push(b'=');
        e.extend_from_slice(value);
        e.push(0);
        self.env.push(e);
        Ok(())
    }

    /// Adds `name=<the child's own pid>`, filled in by the child.
    pub(crate) fn env_child_pid(&mut self, name: &[u8]) {
        let mut e = Vec::with_capacity(name.len() + 1 + PID_SLOT);
        e.extend_from_slice(name);
        e.push(b'=');
        e.extend_from_slice(&[0; PID_SLOT]);
        self.pid_slots.push(self.env.len());
        self.env.push(e);
    }
}

/// Starts `plan` as a new process with `fds[i]` at descriptor `3 + i` (close-on-exec cleared), every other
/// descriptor above 2 closed on exec, an empty signal mask, and handled signals and SIGPIPE at their default.
/// Returns the child's pid once `execve` has succeeded; an exec failure comes back as the `execve` error, with
/// the child reaped.
///
/// The child runs in a process group of its own (its pgid is its pid), so that killing the group reaches
/// everything it started (a wrapper script's background job, a double fork), unless something left the group
/// on purpose (`setsid`).
pub(crate) fn spawn(
    plan: &mut SpawnPlan,
    fds: &[BorrowedFd<'_>],
) -> std::result::Result<u32, SpawnError> {
    let start = |error| SpawnError {
        step: SpawnStep::Start,
        error,
    };
    // Everything below is prepared here, in the parent, because the child may only make async-signal-safe
    // calls: no allocation, no locks, no panics.
    let srcs: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let n = srcs.len() as libc::c_int;
    let mut high: Vec<RawFd> = vec![-1; srcs.len()];
    let mut env_bases: Vec<*mut u8> = plan.env.iter_mut().map(|e| e.as_mut_ptr()).collect();
    let slots: Vec<*mut u8> = plan
        .pid_slots
        .iter()
        .map(|&i| {
            let eq = plan.env[i].iter().position(|&b| b == b'=').unwrap_or(0);
            // SAFETY: eq + 1 is within the entry, which has PID_SLOT bytes after '='.
            unsafe { env_bases[i].add(eq + 1) }
        })
        .collect();
    let mut envp: Vec<*const libc::c_char> = env_bases
        .iter_mut()
        .map(|p| *p as *const libc::c_char)
        .collect();
    envp.push(std::ptr::null());
    let mut argv: Vec<*const libc::c_char> = plan.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let path = plan.path.as_ptr();
    let (err_read, err_write) = pipe().map_err(start)?;
    let err_write_raw = err_write.as_raw_fd();
    let args = ChildArgs {
        path,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        slots: slots.as_ptr(),
        nslots: slots.len(),
        srcs: srcs.as_ptr(),
        high: high.as_mut_ptr(),
        nsrcs: srcs.len(),
        n,
        err_write: err_write_raw,
        idle: plan.idle,
    };
    // SAFETY: every pointer in `args` points into `plan`, `srcs`, `high`, `slots`, `envp` and `argv`, all
    // owned or borrowed by this frame and neither moved nor dropped before the call returns.
    let pid = unsafe { clone_vfork(&args) }.map_err(start)?;
    drop(err_write);
    exec_report(pid, err_read)
}

/// Starts the child on a stack of its own in this address space (`CLONE_VM | CLONE_VFORK`), every signal
/// blocked in this thread meanwhile; returns once the child has called `execve` or exited.
///
/// # Safety
///
/// Every pointer in `args` points to memory that is valid (and, for `high` and the pid slots, writable) for
/// this whole call: the child reads and writes it while this thread is suspended.
unsafe fn clone_vfork(args: &ChildArgs) -> io::Result<u32> {
    let stack = ChildStack::new()?;
    // No signal handler may run in the child while it shares this address space: block every signal in this
    // thread (the child inherits the mask), the child resets handlers to default before unblocking.
    // SAFETY: sigset_t is plain data for which all-zero bytes are a valid (empty) value.
    let (mut all, mut old): (libc::sigset_t, libc::sigset_t) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: both sets are live; sigfillset and pthread_sigmask only write them.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: CLONE_VM | CLONE_VFORK: the child runs `child_entry` on its own stack in this address space,
    // and this thread is suspended until the child has called execve or exited, so nothing the child touches
    // (`args` and what it points to, valid for this call by this function's contract) changes under it or is
    // freed before it is done. The child makes only async-signal-safe calls.
    let pid = unsafe {
        libc::clone(
            child_entry,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (args as *const ChildArgs).cast_mut().cast(),
        )
    };
    let clone_err = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if pid < 0 {
        return Err(clone_err);
    }
    // Positive from here: the crate's pid type.
    Ok(pid.unsigned_abs())
}

/// What the child reported on `err_read`: nothing if its exec succeeded (then `Ok(pid)`), else the step that
/// failed and its errno (the child is reaped).
fn exec_report(pid: u32, err_read: OwnedFd) -> std::result::Result<u32, SpawnError> {
    let start = |error| SpawnError {
        step: SpawnStep::Start,
        error,
    };
    // The child writes the failed step and errno (4 bytes each), or nothing if its exec succeeded.
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match read(err_read.as_fd(), &mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) => {
                let _ = kill_process(pid);
                let _ = waitpid(pid, false);
                return Err(start(e));
            }
        }
    }
    if got == 0 {
        return Ok(pid);
    }
    // The child failed before or at exec and is exiting; reap it so no zombie is left.
    let _ = waitpid(pid, false);
    let word = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    Err(if got == 8 {
        SpawnError {
            step: SpawnStep::from_code(word(0)),
            error: io::Error::from_raw_os_error(word(4) as i32),
        }
    } else {
        start(io::Error::other(
            "the new process failed before exec and reported a truncated error",
        ))
    })
}

/// What the child needs, by pointer into memory the parent prepared and keeps alive until the child is done.
struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    slots: *const *mut u8,
    nslots: usize,
    srcs: *const RawFd,
    high: *mut RawFd,
    nsrcs: usize,
    n: libc::c_int,
    err_write: RawFd,
    idle: bool,
}

/// The child's stack: its own mapping (the parent's stack is in use by the suspended parent thread), with a
/// guard page at the bottom.
struct ChildStack {
    base: *mut libc::c_void,
}

/// Enough for the child's few calls (glibc's posix_spawn uses less); a guard page below it.
const CHILD_STACK: usize = 256 * 1024;
const GUARD: usize = 64 * 1024;

impl ChildStack {
    fn new() -> io::Result<ChildStack> {
        // SAFETY: a fresh anonymous mapping; the pointer is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CHILD_STACK + GUARD,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = ChildStack { base };
        // SAFETY: the lowest GUARD bytes of the mapping just made.
        if unsafe { libc::mprotect(base, GUARD, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The initial stack pointer (stacks grow down on every Linux architecture Rust supports but hppa).
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping, 16-byte aligned (the mapping is page aligned).
        unsafe { self.base.cast::<u8>().add(CHILD_STACK + GUARD).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; the child no longer runs on it (CLONE_VFORK returns only after its
        // execve or exit).
        unsafe { libc::munmap(self.base, CHILD_STACK + GUARD) };
    }
}

extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's ChildArgs, alive until this child execs or exits (CLONE_VFORK).
    unsafe {
        let a = &*(arg as *const ChildArgs);
        child_before_exec(a)
    }
}

/// The child's half of [`spawn`].
///
/// # Safety
/// Must be called only in the child made by `spawn`'s `clone(CLONE_VM | CLONE_VFORK)`, with pointers into memory
/// the suspended parent prepared. Makes only async-signal-safe calls, writes only to `high` and the pid slots,
/// and never returns.
unsafe fn child_before_exec(a: &ChildArgs) -> ! {
    // SAFETY: (the whole body) every call is async-signal-safe per signal-safety(7) or a raw syscall; every
    // pointer was prepared by the parent, which is suspended until this child execs or exits.
    unsafe {
        let fail = |fd: RawFd, step: u32| -> ! {
            let errno = *libc::__errno_location() as u32;
            let mut bytes = [0u8; 8];
            bytes[..4].copy_from_slice(&step.to_ne_bytes());
            bytes[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(fd, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127)
        };
        let (place, priority, exec) = (
            SpawnStep::PlaceFds.code(),
            SpawnStep::Priority.code(),
            SpawnStep::Exec.code(),
        );
        // A process group of its own: the old process kills the whole group if this upgrade fails. Failure
        // (not expected: we are a fresh child, not a session leader) only weakens that, so it is not fatal.
        libc::setpgid(0, 0);
        // Every signal is blocked (the parent blocked them before clone). The application's handlers must not
        // run here, in its address space: back to the default for every handled signal, then unblock all (a
        // new program starts with none blocked). Rust's runtime ignores SIGPIPE: default it too, as std does.
        for sig in 1..=libc::SIGRTMAX() {
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut current) == 0
                && (current.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
                && current.sa_sigaction != libc::SIG_DFL
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());

        // Move everything we still need above the target range 3..3+n first, so that placing fd i at 3+i
        // can never overwrite a source that is still to be placed.
        let base = 3 + a.n;
        let err_fd = libc::fcntl(a.err_write, libc::F_DUPFD_CLOEXEC, base);
        if err_fd < 0 {
            fail(a.err_write, place);
        }
        for i in 0..a.nsrcs {
            let h = libc::fcntl(*a.srcs.add(i), libc::F_DUPFD_CLOEXEC, base);
            if h < 0 {
                fail(err_fd, place);
            }
            *a.high.add(i) = h;
        }
        for i in 0..a.nsrcs {
            // dup2 onto a different number always clears close-on-exec on the new descriptor.
            if libc::dup2(*a.high.add(i), 3 + i as libc::c_int) < 0 {
                fail(err_fd, place);
            }
        }
        let pid = libc::getpid();
        for k in 0..a.nslots {
            write_decimal(*a.slots.add(k), pid as u32);
        }
        // Nothing else may leak into the new program, not even an fd some library opened without
        // O_CLOEXEC: mark everything from 3+n up close-on-exec.
        let r = libc::syscall(
            libc::SYS_close_range,
            base as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        if r < 0 {
            // Kernels before 5.11: walk the table up to the soft limit (bounded so this stays fast).
            let mut lim: libc::rlimit = std::mem::zeroed();
            let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur.min(1 << 16) as libc::c_int
            } else {
                1024
            };
            let mut fd = base;
            while fd < max {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                fd += 1;
            }
        }
        // Until it is committed, the new process is the one the OOM killer takes under memory pressure, not
        // the serving one: raised here, before it runs a line of its own (the old process's write after the
        // spawn came too late when the new program allocated first: the killer then took the old one). Raising
        // one's own score needs no privilege; without /proc it stays as it was.
        let adj = libc::open(
            OOM_SCORE_ADJ.as_ptr().cast(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if adj >= 0 {
            libc::write(adj, b"1000".as_ptr().cast(), 4);
            libc::close(adj);
        }
        if a.idle {
            // Background initialisation: the new program starts at the lowest CPU priority and returns to
            // normal before it reports ready. Lowering one's own priority needs no privilege.
            let param = libc::sched_param { sched_priority: 0 };
            if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
                fail(err_fd, priority);
            }
        }
        libc::execve(a.path, a.argv, a.envp);
        fail(err_fd, exec)
    }
}

/// The new process's own OOM score file, NUL-terminated for `open` in the child.
const OOM_SCORE_ADJ: &[u8] = b"/proc/self/oom_score_adj\0";

/// Writes `v` in decimal followed by NUL at `dst`, which has room for [`PID_SLOT`] bytes.
///
/// # Safety
/// `dst` must be valid for PID_SLOT writes.
unsafe fn write_decimal(dst: *mut u8, mut v: u32) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 || len == digits.len() {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: len <= 10 < PID_SLOT, within the caller's buffer.
        unsafe { *dst.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: as above.
    unsafe { *dst.add(len) = 0 };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_fits_any_pid() {
        let mut buf = [0xffu8; PID_SLOT];
        for v in [0u32, 7, 42, 4_194_304, u32::MAX] {
            // SAFETY: buf has PID_SLOT bytes.
            unsafe { write_decimal(buf.as_mut_ptr(), v) };
            let end = buf.iter().position(|&b| b == 0).unwrap();
            assert_eq!(std::str::from_utf8(&buf[..end]).unwrap(), v.to_string());
        }
    }

    #[test]
    fn spawn_reports_exec_errors_and_reaps() {
        let mut plan =
            SpawnPlan::new(Path::new("/nonexistent/exuvia-test"), &["x".into()]).unwrap();
        let e = spawn(&mut plan, &[]).unwrap_err();
        assert_eq!(e.error.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(e.step, SpawnStep::Exec);
    }

    #[test]
    fn spawn_places_fds_writes_the_pid_resets_signals_and_restores_the_callers_mask() {
        let dir = std::env::temp_dir().join(format!("exuvia-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let script = format!(
            "{{ echo pid=$MYPID; grep -E '^Sig(Blk|Ign)' /proc/self/status; readlink /proc/self/fd/3; }} > {}",
            out.display()
        );
        let mut plan = SpawnPlan::new(
            Path::new("/bin/sh"),
            &["sh".into(), "-c".into(), script.into()],
        )
        .unwrap();
        plan.env_child_pid(b"MYPID");
        let (r, _w) = pipe().unwrap();
        // The caller blocks SIGUSR2 (as a thread waiting in sigwait would): the child must not inherit that,
        // and the caller must get its own mask back.
        // SAFETY: sigset manipulation on live values; pthread_sigmask on this thread only.
        let before = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            old
        };
        let pid = spawn(&mut plan, &[r.as_fd()]).unwrap();
        // SAFETY: as above.
        let (usr2_blocked, usr1_blocked) = unsafe {
            let mut now: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_SETMASK, &before, &mut now);
            (
                libc::sigismember(&now, libc::SIGUSR2) == 1,
                libc::sigismember(&now, libc::SIGUSR1) == 1,
            )
        };
        assert!(
            usr2_blocked && !usr1_blocked,
            "the caller's mask was not restored"
        );
        let status = waitpid(pid, false).unwrap().unwrap();
        assert!(status.success(), "{status:?}");
        let text = std::fs::read_to_string(&out).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(text.contains(&format!("pid={pid}\n")), "{text}");
        assert!(text.contains("SigBlk:\t0000000000000000"), "{text}");
        // SIGPIPE (13) is ignored by Rust's runtime in this test process; the child has it at the default.
        let ign = text
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(ign & (1 << (libc::SIGPIPE - 1)), 0, "{text}");
        let inode = fstat_inode(r.as_fd());
        assert!(
            text.contains(&format!("pipe:[{inode}]")),
            "fd 3 is not the pipe {inode}: {text}"
        );
    }

    fn fstat_inode(fd: BorrowedFd<'_>) -> u64 {
        // SAFETY: fstat into a live struct.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstat(fd.as_raw_fd(), &mut st);
            st.st_ino
        }
    }
}

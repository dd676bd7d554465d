//! Logging across upgrades: which process wrote a line.
//!
//! # The problem
//!
//! Under systemd, a service's stdout and stderr are one stream socket to journald, which attributes every line
//! on it to the process that opened it: the first one. A new process started by an upgrade inherits that
//! stream, so its lines are stored with the old (gone) process's `_PID`, and `journalctl _PID=`, `systemctl
//! status` excerpts and any pid-based query mislead exactly when an operator investigates an upgrade
//! (systemd issue 13708). The same holds for a file or a pipe the processes share: nothing says which one
//! wrote a line.
//!
//! # The remedies
//!
//! - **Log to journald natively when stderr is the journal** ([`stderr_is_journal`], the check systemd
//!   documents for `JOURNAL_STREAM`). journald's native protocol is a datagram socket, and each datagram is
//!   attributed to the process that sent it: `_PID`, `_COMM`, `_SYSTEMD_UNIT` are right for every process.
//!   [`tracing-journald`](https://docs.rs/tracing-journald) does the logging; add this process's
//!   [`generation`] as a field of every entry.
//! - **Otherwise, put the pid and the generation in every line** (a terminal, a file, a pipe).
//!
//! Output that bypasses the logger (a panic message, `eprintln!`) still goes to the inherited stream.
//!
//! ```
//! use tracing_subscriber::layer::SubscriberExt;
//! use tracing_subscriber::util::SubscriberInitExt;
//!
//! fn init_logging() {
//!     let generation = exuvia::logging::generation().to_string();
//!     if exuvia::logging::stderr_is_journal() {
//!         match tracing_journald::layer() {
//!             Ok(journald) => {
//!                 // journalctl -u my.service EXUVIA_GENERATION=2
//!                 let journald = journald.with_custom_fields([("EXUVIA_GENERATION", generation)]);
//!                 tracing_subscriber::registry().with(journald).init();
//!                 return;
//!             }
//!             Err(e) => eprintln!("cannot log to journald ({e}); logging to stderr"),
//!         }
//!     }
//!     // Plain stderr: say who wrote each line.
//!     let pid = std::process::id();
//!     tracing_subscriber::fmt().init();
//!     tracing::info!(pid, generation, "logging to stderr");
//! }
//!
//! fn main() -> Result<(), exuvia::Error> {
//!     init_logging(); // before build(): what build() logs reaches the journal too
//!     let upgrader = exuvia::Upgrader::builder().build()?;
//!     assert_eq!(upgrader.generation(), exuvia::logging::generation());
//!     Ok(())
//! }
//! ```
//!
//! The repository's examples do the same (`examples/common/mod.rs`, `--log auto|journal|stderr`), and the
//! README shows `journalctl -u` across two upgrades.

use std::os::fd::AsFd;

use crate::handover;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

/// The variable systemd sets for a service whose stdout or stderr is connected to journald:
/// `<st_dev>:<st_ino>` of that stream (systemd.exec(5)).
pub const JOURNAL_STREAM: &str = "JOURNAL_STREAM";

/// How many upgrades led to this process: 0 for a fresh start. The same number as
/// [`Upgrader::generation`](crate::Upgrader::generation), but readable before the upgrader is built, so that
/// logging set up first can label every line (the old process passes it in the environment, and this reads
/// it once; a variable meant for another process, or not a number, counts as 0).
///
/// A process that takes over ([`Builder::take_over`](crate::Builder::take_over)) learns its generation only
/// inside `build()`, from the process it takes over from: until then this says 0, and from then on the
/// generation it received (a formatter that asks per line labels every later line right; a value read once
/// at start-up, such as a journald layer's custom field, stays 0).
pub fn generation() -> u32 {
    static FROM_ENV: Once = Once::new();
    FROM_ENV.call_once(|| {
        let g = parse_generation(
            std::env::var_os(handover::env::VAR_GENERATION).as_deref(),
            std::env::var_os(handover::env::VAR_PID).as_deref(),
            std::process::id(),
        );
        // A taker that set it already (build() before any log line asked) keeps its own.
        let _ = GENERATION.compare_exchange(0, g, Ordering::Relaxed, Ordering::Relaxed);
    });
    GENERATION.load(Ordering::Relaxed)
}

/// This process's generation, once known ([`generation`]).
static GENERATION: AtomicU32 = AtomicU32::new(0);

/// Sets the generation a takeover brought (see [`generation`]).
pub(crate) fn set_generation(g: u32) {
    GENERATION.store(g, Ordering::Relaxed);
}

fn parse_generation(
    generation: Option<&std::ffi::OsStr>,
    pid: Option<&std::ffi::OsStr>,
    my_pid: u32,
) -> u32 {
    let num = |v: Option<&std::ffi::OsStr>| v?.to_str()?.trim().parse::<u32>().ok();
    match num(pid) {
        Some(p) if p == my_pid => num(generation).unwrap_or(0),
        _ => 0,
    }
}

/// Whether this process's stderr is the stream systemd connected to journald (`JOURNAL_STREAM` names it,
/// and it is still fd 2), the sign to log natively instead: see the [module docs](self). False on a terminal,
/// a file, a pipe, or a stderr redirected after start.
pub fn stderr_is_journal() -> bool {
    is_stream(
        std::env::var_os(JOURNAL_STREAM).as_deref(),
        std::io::stderr().as_fd(),
    )
}

/// Whether `stream` (a `JOURNAL_STREAM` value) names the file `fd` is open on.
fn is_stream(stream: Option<&std::ffi::OsStr>, fd: std::os::fd::BorrowedFd<'_>) -> bool {
    let named = stream.and_then(|v| v.to_str()).and_then(|s| {
        let (dev, ino) = s.trim().split_once(':')?;
        Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?))
    });
    named.is_some() && named == crate::sys::file_identity(fd).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn the_generation_is_read_only_when_meant_for_this_process() {
        let g = |gen: Option<&str>, pid: Option<&str>| {
            parse_generation(gen.map(OsStr::new), pid.map(OsStr::new), 42)
        };
        assert_eq!(g(Some("3"), Some("42")), 3);
        assert_eq!(g(Some(" 7 "), Some("42")), 7);
        assert_eq!(g(Some("3"), Some("41")), 0, "another process's variables");
        assert_eq!(g(Some("3"), None), 0);
        assert_eq!(g(None, Some("42")), 0);
        assert_eq!(g(Some("x"), Some("42")), 0);
        assert_eq!(g(Some("-1"), Some("42")), 0);
    }

    #[test]
    fn a_stream_matches_only_the_file_it_names() {
        let a = tempfile::tempfile().unwrap();
        let b = tempfile::tempfile().unwrap();
        let (dev, ino) = crate::sys::file_identity(a.as_fd()).unwrap();
        let named = format!("{dev}:{ino}");
        let is = |v: Option<&str>, f: &std::fs::File| is_stream(v.map(OsStr::new), f.as_fd());
        assert!(is(Some(&named), &a));
        assert!(!is(Some(&named), &b), "another file");
        assert!(!is(Some(&format!("{dev}:{}", ino + 1)), &a));
        assert!(!is(Some("garbage"), &a));
        assert!(!is(Some(""), &a));
        assert!(!is(None, &a));
    }
}

//! Error kinds mean what they say: an upgrade before `ready()` is `NotReady`, signal handling installed twice is
//! `AlreadyInstalled` (per upgrader and per process), an unreachable control socket is `ControlSocket`, an
//! unreachable service manager is `Systemd`. And every error's cause is in its message, never again in
//! `source()` (chain reporters would print it twice).
//!
//! One test function: signal handling is installed once per process, and this binary is that process.

use std::error::Error as _;
use std::ffi::OsStr;
use std::time::Duration;

use exuvia::{control, ErrorKind, Notifier, State, Upgrader};

#[test]
fn error_kinds_mean_what_they_say() {
    let up = Upgrader::builder().notify(false).build().unwrap();
    let e = up.upgrade().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotReady, "{e}");
    assert!(e.to_string().contains("not reported ready"), "{e}");

    up.handle_signals().unwrap();
    let e = up.handle_signals().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyInstalled, "{e}");
    // Another upgrader in the same process: the handlers are the process's.
    let other = Upgrader::builder().notify(false).build().unwrap();
    let e = other.handle_signals().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyInstalled, "{e}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nobody.sock");
    let e =
        control::request(&missing, control::Command::Status, Duration::from_secs(1)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ControlSocket, "{e}");
    assert!(e.to_string().contains("No such file or directory"), "{e}");
    assert!(e.source().is_none(), "the cause is in the message: {e}");

    let n = Notifier::new(OsStr::new(&format!(
        "{}",
        dir.path().join("notify").display()
    )))
    .unwrap();
    let e = n.notify(&[State::Ready]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Systemd, "{e}");
    assert!(e.source().is_none(), "the cause is in the message: {e}");
    assert!(
        e.io_error().is_some(),
        "the OS error is still there for code: {e}"
    );
}

//! A SIGTERM handler the application installed before `handle_signals()` still runs (signals chain).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static EARLIER: AtomicBool = AtomicBool::new(false);

extern "C" fn earlier(_: libc::c_int) {
    EARLIER.store(true, Ordering::SeqCst);
}

#[test]
fn a_handler_installed_first_still_runs() {
    // SAFETY: a handler that only stores to an atomic; the struct is zeroed then filled in.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = earlier as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut()), 0);
    }
    let upgrader = exuvia::Upgrader::builder().build().unwrap();
    upgrader.handle_signals().unwrap();
    upgrader.ready().unwrap();
    // SAFETY: raise with a valid signal number.
    unsafe { libc::raise(libc::SIGTERM) };
    let (tx, rx) = std::sync::mpsc::channel();
    let u = upgrader.clone();
    std::thread::spawn(move || tx.send(u.wait()).unwrap());
    let finish = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("exuvia did not see the SIGTERM");
    assert_eq!(
        finish,
        exuvia::Finish::Stopped {
            by: exuvia::StopCause::Signal(libc::SIGTERM)
        }
    );
    assert!(
        EARLIER.load(Ordering::SeqCst),
        "the handler installed first no longer runs"
    );
}

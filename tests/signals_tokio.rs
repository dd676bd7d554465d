//! `tokio::signal` set up before `handle_signals()` keeps receiving (both go through the same registry).

use std::time::Duration;

#[test]
fn tokio_signal_installed_first_still_receives() {
    let upgrader = exuvia::Upgrader::builder().build().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        upgrader.handle_signals().unwrap();
        upgrader.ready().unwrap();
        // SAFETY: raise with a valid signal number.
        unsafe { libc::raise(libc::SIGTERM) };
        tokio::time::timeout(Duration::from_secs(10), term.recv())
            .await
            .expect("tokio::signal no longer receives SIGTERM")
            .unwrap();
        let finish = tokio::time::timeout(Duration::from_secs(10), upgrader.finished())
            .await
            .expect("exuvia did not see the SIGTERM");
        assert_eq!(
            finish,
            exuvia::Finish::Stopped {
                by: exuvia::StopCause::Signal(libc::SIGTERM)
            }
        );
    });
}

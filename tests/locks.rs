//! No lock of the library is held across a user callback: a bind hook (`BindOptions::configure`) may call
//! back into the upgrader. Were the socket registry's lock held across the bind (and its hook), the inner call
//! would wait for it for ever.

use std::sync::mpsc;
use std::time::Duration;

use exuvia::{BindOptions, Upgrader};

#[test]
fn a_bind_hook_may_call_back_into_the_upgrader() {
    let upgrader = Upgrader::builder().build().unwrap();
    let (tx, rx) = mpsc::channel();
    let u = upgrader.clone();
    // On a thread of its own: a deadlock must fail this test at its deadline, not hang the test binary.
    std::thread::spawn(move || {
        let inner = u.clone();
        let opts = BindOptions::new().configure(move |_fd| {
            // Another socket, a take and the registry's names, from inside this socket's bind.
            let l = inner.listen_tcp("inner", "127.0.0.1:0")?;
            assert!(inner.take_tcp("absent")?.is_none());
            drop(l);
            Ok(())
        });
        let outer = u.listen_tcp_with("outer", "127.0.0.1:0", &opts);
        let _ = tx.send(
            outer
                .map(|l| l.local_addr().is_ok())
                .map_err(|e| e.to_string()),
        );
    });
    let got = rx.recv_timeout(Duration::from_secs(20));
    assert_eq!(
        got,
        Ok(Ok(true)),
        "the bind hook could not call back into the upgrader (a lock held across it?)"
    );
    // Both names are taken now: a second bind of either is refused, not bound twice.
    for name in ["outer", "inner"] {
        let e = upgrader.listen_tcp(name, "127.0.0.1:0").unwrap_err();
        assert_eq!(e.kind(), exuvia::ErrorKind::AlreadyTaken, "{name}: {e}");
    }
}

#[test]
fn a_name_being_bound_is_taken_for_everyone_else() {
    // While one thread's bind of "slow" runs (its hook waits), another thread's bind of the same name is
    // refused at once: the name is reserved before the bind, outside the lock.
    let upgrader = Upgrader::builder().build().unwrap();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    let u = upgrader.clone();
    let binder = std::thread::spawn(move || {
        let opts = BindOptions::new().configure(move |_fd| {
            let _ = entered_tx.send(());
            let _ = release_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(20));
            Ok(())
        });
        u.listen_tcp_with("slow", "127.0.0.1:0", &opts).map(drop)
    });
    entered_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the bind hook never ran");
    let e = upgrader.listen_tcp("slow", "127.0.0.1:0").unwrap_err();
    assert_eq!(e.kind(), exuvia::ErrorKind::AlreadyTaken, "{e}");
    release_tx.send(()).unwrap();
    binder.join().unwrap().unwrap();
}

//! The lifecycle's readers never wait for I/O: while the old process waits for systemd to process the
//! handover (the sd_notify barrier), its responses, which ask `closing()` each time, are not held up, and
//! the new process, committed before the barrier, serves meanwhile.

#[macro_use]
mod support;

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

for_each_example!(responses_do_not_wait_for_a_slow_barrier);

/// A stand-in for systemd's notification socket that takes a second to answer each barrier (it holds the
/// barrier's pipe end that long). Returns the messages it received.
fn slow_notify_socket(path: &std::path::Path, hold: Duration) -> Arc<Mutex<Vec<String>>> {
    let sock = UnixDatagram::bind(path).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || loop {
        let mut buf = [0u8; 4096];
        let mut cmsg = [0u8; 64];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; every pointer in it points at live buffers of the lengths given.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = cmsg.len() as _;
        // SAFETY: recvmsg on our own socket with the buffers above.
        let n = unsafe { libc::recvmsg(std::os::fd::AsRawFd::as_raw_fd(&sock), &mut msg, 0) };
        if n < 0 {
            return;
        }
        let text = String::from_utf8_lossy(&buf[..n as usize]).to_string();
        let mut fds = Vec::new();
        // SAFETY: walking the control messages recvmsg filled in, with the kernel's macros.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let fd = *(libc::CMSG_DATA(c) as *const i32);
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        s.lock().unwrap().push(text.clone());
        if text.contains("BARRIER=1") {
            std::thread::spawn(move || {
                std::thread::sleep(hold); // the slow systemd this test stands for
                drop(fds);
            });
        }
    });
    seen
}

fn responses_do_not_wait_for_a_slow_barrier(server: &str) {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let seen = slow_notify_socket(&notify, Duration::from_secs(1));
    let app = dir.path().join("app");
    wrapper(
        &app,
        &format!("export NOTIFY_SOCKET='{}'", notify.display()),
        &example(server),
    );
    // Bare: the upgrade's end is the old process's, after its barrier, which only its log tells (a reload
    // helper may get its verdict from the new process before that).
    let mut server = Server::start_bare(&app, &[]);
    let old = server.current();
    // One keep-alive client asking as fast as it is answered (reconnecting when a response closes its
    // connection: the old process lets its connections go once the new one is committed), timing every answer
    // while the old process waits for the barrier.
    let addr = server.addr;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let (mut by_old, mut answered) = (0u32, 0u32);
            let mut conn = connect(addr).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let r = request(&mut conn, "/", true).unwrap();
                worst = worst.max(t.elapsed());
                answered += 1;
                if r.pid == old {
                    by_old += 1;
                }
                if answered == 1 {
                    let _ = first_tx.send(());
                }
                if r.close {
                    conn = connect(addr).unwrap();
                }
            }
            (worst, answered, by_old)
        })
    };
    // The client is served before the upgrade starts (by the old process).
    first_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the client got no answer");
    let t0 = Instant::now();
    let new = server.upgrade_started().unwrap();
    let handover = t0.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (worst, answered, by_old) = client.join().unwrap();
    eprintln!(
        "upgrade with a 1 s barrier took {handover:?}; {answered} requests answered meanwhile ({by_old} by the \
         old process), the slowest in {worst:?}"
    );
    assert!(
        seen.lock().unwrap().iter().any(|m| m.contains("BARRIER=1")),
        "the barrier was never sent: {:?}",
        seen.lock().unwrap()
    );
    assert!(
        handover >= Duration::from_secs(1),
        "the barrier was not waited for"
    );
    assert!(
        answered > 100,
        "too few answers during the handover: {answered}"
    );
    assert!(by_old > 0, "the old process answered nothing");
    assert!(
        worst < Duration::from_millis(100),
        "a response waited for the barrier: {worst:?}"
    );
    assert_ne!(new, old);
    server.stop();
}

//! Inherited descriptors are adopted once per process: a second `build()`, in a process whose environment
//! still names them (threads were running, so the variables stayed), is a typed error, not a second owner.

mod support;

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

const ROLE: &str = "ADOPT_ONCE_CHILD";
const TEST_NAME: &str = "a_second_build_does_not_adopt_the_same_descriptors_again";

#[test]
fn a_second_build_does_not_adopt_the_same_descriptors_again() {
    if std::env::var_os(ROLE).is_some() {
        // In the child: fd 3 is a listening socket named by LISTEN_FDS for this pid. The test harness runs
        // this on a thread, so the variables stay in the environment after the first build.
        let first = exuvia::Upgrader::builder().notify(false).build().unwrap();
        let taken = first.take_tcp("http").unwrap();
        assert!(taken.is_some(), "the first build did not adopt fd 3");
        let second = exuvia::Upgrader::builder().notify(false).build();
        let e = second.expect_err("a second build adopted the same descriptors again");
        assert_eq!(e.kind(), exuvia::ErrorKind::AlreadyTaken, "{e}");
        assert!(e.to_string().contains("already adopted"), "{e}");
        println!("child: ok");
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let raw = listener.as_raw_fd();
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!(
            "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=http exec '{}' --exact {TEST_NAME} --nocapture",
            exe.display()
        ))
        .env(ROLE, "1");
    // SAFETY: dup2 and fcntl are async-signal-safe; they put the listener at fd 3 without close-on-exec in
    // the child (dup2 onto itself would leave the flag, hence fcntl when it is already 3).
    unsafe {
        cmd.pre_exec(move || {
            let r = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("child: ok"), "{text}");
}

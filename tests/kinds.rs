//! Every socket kind, and application state of the maximum size, cross a real fork/exec upgrade.
//!
//! The test binary plays the server itself: started with `KINDS_TEST_DIR` set, the test function below binds
//! (generation 0) or inherits (generation 1) the sockets instead of driving the test.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use exuvia::{ErrorKind, SocketKind, Upgrader, MAX_STATE_LEN};
use support::*;

/// Not `EXUVIA_*`: the library never passes its own variables on.
const ROLE: &str = "KINDS_TEST_DIR";
const TEST_NAME: &str = "every_socket_kind_and_a_full_state_cross_an_upgrade";

fn state() -> Vec<u8> {
    (0..MAX_STATE_LEN).map(|i| (i * 7 % 251) as u8).collect()
}

/// `socket:[inode]`: the identity of the kernel socket behind a descriptor.
fn inode(fd: BorrowedFd<'_>) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn every_socket_kind_and_a_full_state_cross_an_upgrade() {
    if let Some(dir) = std::env::var_os(ROLE) {
        return serve(Path::new(&dir));
    }
    become_subreaper();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(ROLE, dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut gen0 = cmd.spawn().unwrap();
    let log = Log::collect(gen0.stderr.take().unwrap(), "kinds");
    let status = gen0.wait().unwrap();
    assert!(
        status.success(),
        "generation 0 failed ({status}):\n{}",
        log.dump()
    );
    let done = log.wait_for(0, Duration::from_secs(30), |l| {
        l.contains("kinds: generation 1 done")
    });
    assert!(
        done.is_some(),
        "generation 1 did not finish:\n{}",
        log.dump()
    );
    let report = std::fs::read_to_string(dir.path().join("gen1")).unwrap();
    for check in [
        "tcp",
        "udp",
        "unix",
        "dgram",
        "seq",
        "state",
        "take-once",
        "wrong-kind",
        "path-kept",
    ] {
        assert!(
            report.lines().any(|l| l == format!("{check} ok")),
            "{check} missing from the child's report:\n{report}\n{}",
            log.dump()
        );
    }
    let gen1: u32 = std::fs::read_to_string(dir.path().join("gen1.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(wait_gone(gen1, Duration::from_secs(30)));
}

struct Paths {
    unix: PathBuf,
    dgram: PathBuf,
    seq: PathBuf,
}

fn paths(dir: &Path) -> Paths {
    Paths {
        unix: dir.join("stream.sock"),
        dgram: dir.join("dgram.sock"),
        seq: dir.join("seq.sock"),
    }
}

fn serve(dir: &Path) {
    let up = Upgrader::builder()
        .state(state)
        .ready_timeout(Duration::from_secs(20))
        .drain_timeout(Duration::from_secs(1))
        .build()
        .expect("build");
    let p = paths(dir);
    if up.is_upgraded() {
        generation_1(&up, dir, &p);
    } else {
        generation_0(&up, dir, &p);
    }
}

fn generation_0(up: &Upgrader, dir: &Path, p: &Paths) {
    let tcp = up.listen_tcp("tcp", "127.0.0.1:0").unwrap();
    let udp = up.bind_udp("udp", "127.0.0.1:0").unwrap();
    let unix = up.listen_unix("unix", &p.unix).unwrap();
    let dgram = up.bind_unix_datagram("dgram", &p.dgram).unwrap();
    let seq = up.listen_unix_seqpacket("seq", &p.seq).unwrap();
    // Take-once for fresh binds too.
    assert_eq!(
        up.listen_tcp("tcp", "127.0.0.1:0").unwrap_err().kind(),
        ErrorKind::AlreadyTaken
    );
    assert!(up.take_tcp("tcp").unwrap().is_none());
    let ids = format!(
        "tcp {}\nudp {}\nunix {}\ndgram {}\nseq {}\ntcp-addr {}\nudp-addr {}\n",
        inode(tcp.as_fd()),
        inode(udp.as_fd()),
        inode(unix.as_fd()),
        inode(dgram.as_fd()),
        inode(seq.as_fd()),
        tcp.local_addr().unwrap(),
        udp.local_addr().unwrap()
    );
    std::fs::write(dir.join("gen0"), ids).unwrap();
    up.ready().unwrap();
    let report = up.upgrade().expect("upgrade to generation 1");
    assert_eq!(report.sockets, 5);
    eprintln!("kinds: generation 0 handed over to {}", report.child_pid);
    up.drain();
}

fn generation_1(up: &Upgrader, dir: &Path, p: &Paths) {
    std::fs::write(dir.join("gen1.pid"), std::process::id().to_string()).unwrap();
    let gen0 = std::fs::read_to_string(dir.join("gen0")).unwrap();
    let want = |k: &str| {
        gen0.lines()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .unwrap()
            .to_string()
    };
    let mut report = String::new();
    let mut ok = |what: &str| report.push_str(&format!("{what} ok\n"));

    assert_eq!(up.inherited_state().unwrap(), &state()[..]);
    ok("state");

    // A socket of the wrong kind is an error and stays in place for the right take.
    let e = up.take("udp", SocketKind::TcpListener).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongSocketKind);
    ok("wrong-kind");

    // The address asked for does not matter for an inherited socket: it is the same kernel socket.
    let tcp: TcpListener = up.listen_tcp("tcp", "127.0.0.1:1").unwrap();
    assert_eq!(inode(tcp.as_fd()), want("tcp"));
    assert!(up.take_tcp("tcp").unwrap().is_none());
    ok("take-once");
    let mut c = TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
    let (mut s, _) = tcp.accept().unwrap();
    c.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    ok("tcp");

    let udp: UdpSocket = up.bind_udp("udp", "127.0.0.1:1").unwrap();
    assert_eq!(inode(udp.as_fd()), want("udp"));
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.send_to(b"dgram", udp.local_addr().unwrap()).unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = udp.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"dgram");
    ok("udp");

    // The socket files were never unlinked (nor rebound) by the new process.
    assert!(p.unix.exists() && p.dgram.exists() && p.seq.exists());
    ok("path-kept");
    let unix: UnixListener = up.listen_unix("unix", &p.unix).unwrap();
    assert_eq!(inode(unix.as_fd()), want("unix"));
    let _c = UnixStream::connect(&p.unix).unwrap();
    unix.accept().unwrap();
    ok("unix");

    let dgram: UnixDatagram = up.bind_unix_datagram("dgram", &p.dgram).unwrap();
    assert_eq!(inode(dgram.as_fd()), want("dgram"));
    UnixDatagram::unbound()
        .unwrap()
        .send_to(b"hi", &p.dgram)
        .unwrap();
    let n = dgram.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hi");
    ok("dgram");

    let seq = up.listen_unix_seqpacket("seq", &p.seq).unwrap();
    assert_eq!(inode(seq.as_fd()), want("seq"));
    let client = seqpacket_connect(&p.seq);
    let conn = exuvia::accept_seqpacket(seq.as_fd()).unwrap();
    drop((client, conn));
    ok("seq");

    std::fs::write(dir.join("gen1"), report).unwrap();
    up.ready().unwrap();
    eprintln!("kinds: generation 1 done");
}

fn seqpacket_connect(path: &Path) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain socket/connect calls on a zeroed sockaddr_un filled within bounds; the fd is owned below.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let mut sun: libc::sockaddr_un = std::mem::zeroed();
        sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in sun.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        let r = libc::connect(
            fd,
            (&sun as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        std::os::fd::OwnedFd::from_raw_fd(fd)
    }
}

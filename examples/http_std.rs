//! An HTTP/1.1 server on plain threads (no async runtime) that upgrades itself on SIGHUP.
//!
//! Run it:
//!
//! ```text
//! cargo run --example http_std -- --listen 127.0.0.1:8080
//! curl -i http://127.0.0.1:8080/        # pid=<pid> version=<v>, header X-Pid
//! curl http://127.0.0.1:8080/env         # fd-passing variables still visible (none)
//! kill -HUP <pid>                       # a new process takes over; the old one drains and exits
//! kill -TERM <pid>                      # stop: no longer accept, drain, exit 0
//! ```
//!
//! Options (this interface is driven by the tests and the demo; keep it stable):
//!
//! - `--listen ADDR`: where to listen when not handed a socket (default `127.0.0.1:8080`);
//! - `--version-tag V`: reported in each response (default: the crate version, or `EXUVIA_EXAMPLE_VERSION`
//!   at build time);
//! - `--init-fault FILE`: read at start-up by every generation; `fail` in it makes the process exit with
//!   status 3 before reporting ready, `hang` makes it never report ready, `refuse` makes it report a failure
//!   to the old process (and exit 1), `fdlimit N` lowers its descriptor limit to N;
//! - `--init-delay-ms N`: simulated initialisation work before reporting ready;
//! - `--ready-timeout SECS`, `--drain-timeout SECS`: the upgrade and drain deadlines (default 30 each);
//! - `--control-socket PATH`: serve the control socket there (under systemd with `RuntimeDirectory=` it is
//!   `$RUNTIME_DIRECTORY/exuvia-control.sock` without this option); drive it with `exuvia-ctl`;
//! - `--extra-listeners N`: N more listeners on 127.0.0.1, never accepted on (for the benchmark's scaling
//!   figures: a handover of 1, 100 and 1,000 sockets);
//! - `--background-init`: start new processes at idle CPU priority until they report ready
//!   (`Builder::background_initialisation`);
//! - `--ballast-mib N`: hold N MiB of resident memory (for the benchmark's figure of a big process's upgrade);
//! - `--reuseport`: set `SO_REUSEPORT` on a fresh bind (for the benchmark's overlap baseline only);
//! - `--no-move`: connections drain instead of moving to the new process (`Builder::move_connections`);
//! - `--hold-open FILE`: opens FILE *without* close-on-exec and keeps it, so that a test can check that such a
//!   descriptor still does not reach the next generation.

#[path = "common/mod.rs"]
mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::Duration;

use common::Args;
use exuvia::moving::ArrivedStream;
use exuvia::Upgrader;

/// How long a keep-alive connection may sit idle between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// What a connection moves with: which server, in which version of its state (none: every request stands
/// alone).
const HTTP1_STATE: &[u8] = b"http_std/1";

fn main() -> ExitCode {
    common::main("http_std", run)
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let upgrader = common::builder(&args).build()?;
    let listener =
        upgrader.listen_tcp_with("http", args.listen.as_str(), &common::bind_options(&args))?;
    let addr = listener.local_addr()?;
    let _extra = common::extra_listeners(&upgrader, args.extra_listeners)?;
    let _ballast = common::ballast(args.ballast_mib);
    let _held = args
        .hold_open
        .as_deref()
        .map(common::hold_open)
        .transpose()?;
    // Before reporting ready: a SIGHUP must never find this process without its handler.
    upgrader.handle_signals()?;
    // Before ready: tells the old process, if an upgrade started this one, to move its connections here.
    let arrivals = upgrader.arrivals()?;
    common::initialise(&upgrader, &args)?;
    upgrader.ready()?;
    if common::crash_later(&args) == common::Fault::Deaf {
        drop(listener);
        tracing::info!(finish = ?upgrader.wait(), "finishing (deaf)");
        return Ok(());
    }
    tracing::info!(%addr, version = %args.version, generation = upgrader.generation(), "serving");

    // Connections moving here from the old process (this process asked for them above, before ready).
    {
        let u = upgrader.clone();
        let version = args.version.clone();
        std::thread::spawn(move || {
            for arrived in arrivals {
                match arrived.stream {
                    ArrivedStream::Tcp(stream) if arrived.state == HTTP1_STATE => {
                        spawn_connection(&u, stream, &version, arrived.unread);
                    }
                    _ => tracing::warn!("a connection moved here that is not ours; closed"),
                }
            }
        });
    }
    let acceptor = {
        let u = upgrader.clone();
        let version = args.version.clone();
        std::thread::spawn(move || {
            for conn in u.incoming(listener) {
                match conn {
                    Ok(stream) => spawn_connection(&u, stream, &version, Vec::new()),
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })
    };

    let finish = upgrader.wait();
    let _ = acceptor.join();
    tracing::info!(?finish, "finishing");
    upgrader.drain();
    Ok(())
}

/// Serves `stream` on a thread of its own, counted by the drain. If the OS refuses the thread (a process or
/// thread limit), the client is told to come back later.
fn spawn_connection(upgrader: &Upgrader, stream: TcpStream, version: &str, unread: Vec<u8>) {
    let guard = upgrader.track();
    let u = upgrader.clone();
    let version = version.to_string();
    // The stream comes back if the OS refuses the thread: then this client is told to come back later.
    let (tx, rx) = std::sync::mpsc::channel::<TcpStream>();
    let spawned = std::thread::Builder::new().spawn(move || {
        let _guard = guard;
        let Ok(stream) = rx.recv() else { return };
        if let Err(e) = serve(stream, &u, &version, unread) {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
    match spawned {
        Ok(_) => {
            let _ = tx.send(stream);
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a thread for a connection; answering 503");
            let _ = (&stream).write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\nretry-after: 1\r\n\r\n",
            );
        }
    }
}

/// What one connection reads from: the bytes the old process had read (when it moved here), then the socket.
type Reader = BufReader<io::Chain<io::Cursor<Vec<u8>>, TcpStream>>;

/// Every byte read from the connection and not used yet: what moves with it.
fn unread_bytes(reader: &Reader) -> Vec<u8> {
    let mut bytes = reader.buffer().to_vec();
    let (first, _) = reader.get_ref().get_ref();
    bytes.extend_from_slice(&first.get_ref()[first.position() as usize..]);
    bytes
}

/// Serves one connection: HTTP/1.1 keep-alive until the client closes, asks to close, or idles out. Once
/// this process is finishing, the connection moves to the new process between two requests if that one
/// takes connections; otherwise the next response says `Connection: close`. `unread`: what the old process
/// had read from a connection that moved here.
fn serve(stream: TcpStream, upgrader: &Upgrader, version: &str, unread: Vec<u8>) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let _ = stream.set_nodelay(true);
    let mut reader: Reader = BufReader::new(io::Cursor::new(unread).chain(stream.try_clone()?));
    let mut out = stream;
    let pid = std::process::id();
    // Once this process is finishing with nowhere to move to, its connections are served until they close.
    let mut finishing_seen = false;
    loop {
        // Between two requests: the connection may move, with what it has read of the next one.
        let pending = unread_bytes(&reader);
        let woken = if pending.is_empty() {
            common::wait_readable(upgrader, &out, finishing_seen, IDLE_TIMEOUT)?
        } else if !finishing_seen && upgrader.finishing().is_some() {
            common::Woken::Finishing
        } else {
            common::Woken::Readable
        };
        match woken {
            common::Woken::Idle => return Ok(()),
            common::Woken::Readable => {}
            common::Woken::Finishing => {
                finishing_seen = true;
                if let Some(departures) = upgrader.departures() {
                    let leaving = exuvia::moving::Departing {
                        stream: out,
                        state: HTTP1_STATE.to_vec(),
                        unread: pending,
                    };
                    match departures.hand_over(leaving) {
                        Ok(()) => return Ok(()),
                        Err(kept) => {
                            tracing::warn!(reason = %kept.reason, "a connection stays here");
                            out = kept.connection.stream;
                        }
                    }
                }
                continue;
            }
        }
        let mut head = Vec::new();
        loop {
            let start = head.len();
            let n = reader.read_until(b'\n', &mut head)?;
            if n == 0 {
                return Ok(()); // client closed
            }
            if head.len() > MAX_HEAD {
                out.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")?;
                return Ok(());
            }
            let line = &head[start..];
            if line == b"\r\n" || line == b"\n" {
                if start == 0 {
                    head.clear(); // tolerate blank lines between requests
                    continue;
                }
                break;
            }
        }
        let text = String::from_utf8_lossy(&head);
        let mut lines = text.lines();
        let request_line = lines.next().unwrap_or_default();
        let mut parts = request_line.split_whitespace();
        let (method, path, proto) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let (mut asked_close, mut asked_keep_alive) = (false, false);
        let mut body_len = 0usize;
        for h in lines {
            let Some((k, v)) = h.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
            match k.as_str() {
                // A list of tokens, possibly over several lines: `close` anywhere wins; HTTP/1.0 keeps the
                // connection only when asked to.
                "connection" => {
                    for token in v.split(',').map(str::trim) {
                        match token {
                            "close" => asked_close = true,
                            "keep-alive" => asked_keep_alive = true,
                            _ => {}
                        }
                    }
                }
                "content-length" => body_len = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        if body_len > 0 {
            io::copy(&mut (&mut reader).take(body_len as u64), &mut io::sink())?;
        }
        let http10 = proto != "HTTP/1.1";
        // Once this process is finishing, every response is its connection's last: keep-alive clients move
        // to the new process with their next request.
        let close = asked_close
            || (http10 && !asked_keep_alive)
            || (upgrader.closing() && !upgrader.moves_connections());
        let (status, body) = match (method, path) {
            ("GET", "/") | ("HEAD", "/") => ("200 OK", format!("pid={pid} version={version}\n")),
            ("GET", "/env") => ("200 OK", common::fd_passing_env()),
            ("GET", _) | ("HEAD", _) => ("404 Not Found", "not found\n".to_string()),
            _ => ("405 Method Not Allowed", "method not allowed\n".to_string()),
        };
        // Exactly one token: an HTTP/1.0 client that reads `keep-alive` anywhere keeps sending.
        let conn = if close { "close" } else { "keep-alive" };
        // Answered in the client's version: an HTTP/1.0 client must not be told about HTTP/1.1 semantics.
        let version = if http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        let mut resp = format!(
            "{version} {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-pid: {pid}\r\nconnection: {conn}\r\n\r\n",
            body.len()
        );
        if method != "HEAD" {
            resp.push_str(&body);
        }
        out.write_all(resp.as_bytes())?;
        if close {
            return Ok(());
        }
    }
}

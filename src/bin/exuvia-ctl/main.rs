//! `exuvia-ctl`: talks to an exuvia service's control socket. Meant for systemd's `ExecReload=` and
//! `ExecStop=` (see `units/`), and for operators.
//!
//! ```text
//! exuvia-ctl [--socket PATH] [--timeout SECS] status|upgrade|reload-verdict|stop|config
//! exuvia-ctl [--socket PATH] check [--] UNIT
//! ```
//!
//! - `upgrade`: start an upgrade now and exit with its verdict (0: the new process serves; 1: it failed and the
//!   old one serves on). For `Type=notify` units: `ExecReload=/usr/bin/exuvia-ctl upgrade`.
//! - `reload-verdict`: report on the upgrade the reload signal just started, without starting one. For
//!   `Type=notify-reload` units, where systemd sends the signal and also runs `ExecReload=`.
//! - `stop`: stop gracefully (no longer accept, drain) and wait until the service has exited (every process
//!   of it: on probation, the old process too), then say so (`stopping pid N: exited`). For `ExecStop=`.
//! - `status`: pid, generation, connections in flight, state (`serving`, `probation`, ...) and rollbacks.
//! - `config`: the service's own settings (timeouts, probation, fd store, socket names).
//! - `check UNIT`: the unit's settings as systemd has them, and the service's own, against what an upgrade
//!   needs; each finding with its fix. Exit 0 clean, 1 warnings, 2 errors: a deploy pipeline can gate on it.
//!
//! The socket defaults to `$RUNTIME_DIRECTORY/exuvia-control.sock`, which systemd sets for the service and its
//! helpers alike when the unit has `RuntimeDirectory=`. Exit status: 0 ok, 1 the service said no, 2 usage or
//! connection problems.
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod check;

use std::path::{Path, PathBuf};

use exuvia::control::{Command, Reply};
use std::process::ExitCode;
use std::time::Duration;

fn usage() -> ExitCode {
    eprintln!(
        "usage: exuvia-ctl [--socket PATH] [--timeout SECS] {}\n       \
         exuvia-ctl [--socket PATH] check [--] UNIT",
        Command::CLI_WORDS.join("|")
    );
    ExitCode::from(2)
}

/// What the command line asks for.
enum Cli {
    Check {
        unit: String,
        socket: Option<PathBuf>,
        timeout: Duration,
    },
    Request {
        command: Command,
        socket: Option<PathBuf>,
        timeout: Duration,
    },
}

fn main() -> ExitCode {
    // Taken first: the reload signal was sent before this helper started.
    let started = exuvia::notify::monotonic_usec();
    let (command, socket, timeout) = match parse_args(started) {
        Some(Cli::Check {
            unit,
            socket,
            timeout,
        }) => return check::run(&unit, socket, timeout.min(Duration::from_secs(10))),
        Some(Cli::Request {
            command,
            socket,
            timeout,
        }) => (command, socket, timeout),
        None => return usage(),
    };
    let reloading = matches!(command, Command::Verdict { .. } | Command::Upgrade);
    if reloading {
        end_quietly_on_sigterm();
    }
    let Some(path) = socket.or_else(exuvia::control::default_socket_path) else {
        eprintln!(
            "exuvia-ctl: no control socket: pass --socket PATH, or run under systemd with RuntimeDirectory= set"
        );
        return ExitCode::from(2);
    };
    if command == Command::Stop {
        if let Some(code) = stop_another_instance(&path, timeout) {
            return code;
        }
    }
    let reply = ask(&path, command, timeout);
    if reply.is_err() && reloading {
        main_process_died_during_reload();
    }
    report(command, reply)
}

/// Reads the command line; `None` for a usage error.
fn parse_args(started: u64) -> Option<Cli> {
    let mut socket: Option<PathBuf> = None;
    let mut timeout = Duration::from_secs(120);
    let mut word: Option<String> = None;
    let mut unit: Option<String> = None;
    let mut args = std::env::args().skip(1);
    let mut positional_only = false;
    while let Some(a) = args.next() {
        let checking = word.as_deref() == Some("check") && unit.is_none();
        match a.as_str() {
            _ if positional_only && checking => unit = Some(a),
            _ if positional_only => return None,
            "--" => positional_only = true,
            "--socket" => socket = Some(args.next()?.into()),
            "--timeout" => {
                let s = args.next()?.parse::<f64>().ok().filter(|s| *s > 0.0)?;
                timeout = Duration::from_secs_f64(s);
            }
            "-h" | "--help" => return None,
            c if word.is_none() => word = Some(c.to_string()),
            // An option-like word is refused by the unit name check, with the reason.
            c if checking => unit = Some(c.to_string()),
            _ => return None,
        }
    }
    match word?.as_str() {
        "check" => Some(Cli::Check {
            unit: unit?,
            socket,
            timeout,
        }),
        w => Some(Cli::Request {
            command: Command::from_cli_word(w, started)?,
            socket,
            timeout,
        }),
    }
}

/// Sends `command` and reads the reply, asking again (until `timeout`) while the service says so: `retry`
/// (the old process has handed over: the new one answers on the same socket), `busy` (too many control
/// requests at once; it frees up within seconds), and for a `verdict` (it starts nothing, so asking twice is
/// harmless) a connection that ended without an answer, up to 50 times: the process that had it may have
/// died on probation, and the old process, which took the service back, answers on the same socket.
fn ask(path: &Path, command: Command, timeout: Duration) -> exuvia::Result<Reply> {
    let deadline = std::time::Instant::now() + timeout;
    let mut reply = exuvia::control::request(path, command, timeout);
    let mut lost = 0;
    while std::time::Instant::now() < deadline {
        let again = match &reply {
            Ok(r) => r.is_retry() || r.is_busy(),
            Err(e) => {
                matches!(command, Command::Verdict { .. })
                    && e.kind() == exuvia::ErrorKind::ControlSocket
                    && {
                        lost += 1;
                        lost <= 50
                    }
            }
        };
        if !again {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        reply = exuvia::control::request(path, command, left.max(Duration::from_millis(1)));
    }
    reply
}

/// Prints the outcome; the exit status: 0 ok, 1 the service said no, 2 it could not be asked.
fn report(command: Command, reply: exuvia::Result<Reply>) -> ExitCode {
    match reply {
        // A stop's answer is printed once every process it named has exited (`request` waited for them).
        Ok(r) if r.is_ok() && command == Command::Stop => {
            println!("{}: exited", r.text());
            ExitCode::SUCCESS
        }
        Ok(r) if r.is_ok() => {
            println!("{}", r.text());
            ExitCode::SUCCESS
        }
        // A stop abandoned the upgrade (systemd's SIGTERM to this helper may still be on its way): the stop is
        // what the operator asked for, as when the SIGTERM arrives first.
        Ok(r) if r.is_stopping() => {
            eprintln!(
                "exuvia-ctl: the reload was interrupted by a stop ({})",
                r.text()
            );
            ExitCode::SUCCESS
        }
        Ok(r) => {
            // The reply as the service said it, less the word "error".
            let said = r.to_string();
            eprintln!(
                "exuvia-ctl: {}",
                said.strip_prefix("error ").unwrap_or(&said)
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("exuvia-ctl: {e}");
            ExitCode::from(2)
        }
    }
}

/// The only `unsafe` outside the library's `sys` module: this binary is its own crate and cannot call it.
///
/// systemd stops a unit in the middle of a reload by sending SIGTERM to the reload helper; the service itself
/// abandons its upgrade and drains. That is the stop the operator asked for, not a failure of the unit: end
/// with status 0 so that the unit ends `inactive`, not `failed (Result: signal)`.
#[allow(unsafe_code)]
fn end_quietly_on_sigterm() {
    extern "C" fn on_term(_: libc::c_int) {
        const MSG: &[u8] = b"exuvia-ctl: the reload was interrupted by a stop\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static buffer.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(0)
        }
    }
    // SAFETY: installs a handler that only makes async-signal-safe calls; this process has one thread here.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_term as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
}

/// As `ExecReload=`: when the service's main process (systemd passes its pid as `$MAINPID`) died during
/// the reload, systemd would otherwise wait for a `READY=1` nobody can send any more (it last heard
/// `RELOADING=1`) until `TimeoutStartSec=`, with no process serving. This helper may notify (the templates'
/// `NotifyAccess=exec`): its `READY=1` ends the reload at once, and systemd, seeing the main process gone
/// with a failure, stops the unit and restarts it (`Restart=`), the socket unit holding clients meanwhile.
/// `ExecStop=` of a blue/green instance (`units/exuvia-app@.service`) whose service another instance took
/// over: the control socket they share is served by the other instance's process, which this unit's stop must
/// not touch. systemd names this unit's own main process in `$MAINPID`: when the socket's process is another
/// one, this unit's process (standing by through the other's probation window) is asked to stop by SIGTERM
/// and waited for; a main process already gone needs nothing. `None`: stop through the socket as usual.
fn stop_another_instance(path: &Path, timeout: Duration) -> Option<ExitCode> {
    let main: u32 = std::env::var("MAINPID").ok()?.trim().parse().ok()?;
    if exuvia::control::wait_exited(main, Duration::ZERO) {
        println!("pid {main} has exited already");
        return Some(ExitCode::SUCCESS);
    }
    let status =
        exuvia::control::request(path, Command::Status, timeout.min(Duration::from_secs(10)));
    let serving: u32 = match &status {
        Ok(r) if r.is_ok() => r
            .text()
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pid="))
            .and_then(|p| p.parse().ok())?,
        _ => return None,
    };
    if serving == main {
        return None;
    }
    let pid = i32::try_from(main)
        .ok()
        .and_then(rustix::process::Pid::from_raw)?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).ok()?;
    if exuvia::control::wait_exited(main, timeout) {
        println!("stopping pid {main} (pid {serving}, another instance, serves the control socket): exited");
        Some(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "exuvia-ctl: pid {main} did not exit within {} s",
            timeout.as_secs()
        );
        Some(ExitCode::from(1))
    }
}

fn main_process_died_during_reload() {
    let Some(pid) = std::env::var("MAINPID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return;
    };
    // Gone, or a zombie systemd has not reaped yet. A killed process closes its sockets (our end of file) a
    // moment before it becomes a zombie: give it that moment.
    if !exuvia::control::wait_exited(pid, Duration::from_secs(2)) {
        return;
    }
    eprintln!("exuvia-ctl: the main process {pid} died during the reload; ending the reload so that systemd restarts the service");
    let status = format!("the main process {pid} died during the reload");
    let sent = exuvia::Notifier::from_env().and_then(|n| match n {
        Some(n) => n.notify(&[exuvia::State::Ready, exuvia::State::Status(&status)]),
        None => Ok(()),
    });
    if let Err(e) = sent {
        eprintln!("exuvia-ctl: cannot tell systemd ({e}); it waits for TimeoutStartSec= before it restarts the service");
    }
}

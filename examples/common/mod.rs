//! What the HTTP examples share: their command line (the interface tests and the demo drive), logging with
//! pids, and the start-up fault injection. The exuvia-specific parts stay in each example.
// Each example uses a subset; `pub` is for the examples, not an API.
#![allow(dead_code, unreachable_pub)]

use std::io;
use std::time::Duration;

use exuvia::Upgrader;

const DEFAULT_VERSION: &str = match option_env!("EXUVIA_EXAMPLE_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// How long a keep-alive connection may sit idle between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

pub struct Args {
    pub listen: String,
    pub version: String,
    pub init_fault: Option<String>,
    pub init_delay: Duration,
    pub ready_timeout: Duration,
    pub drain_timeout: Duration,
    /// `--stream-grace SECS` (`Builder::stream_grace`); the library's default without it.
    pub stream_grace: Option<Duration>,
    pub hold_open: Option<String>,
    pub control_socket: Option<String>,
    pub reuseport: bool,
    pub extra_listeners: usize,
    pub ballast_mib: usize,
    pub background_init: bool,
    pub probation: Duration,
    pub probation_stall: Option<Duration>,
    pub crash_fault: Option<String>,
    pub fd_store: bool,
    pub log: LogTo,
    pub sigchld_ignore: bool,
    pub own_reaper: bool,
    pub no_move: bool,
    /// `--takeover`: take the service over from the process serving the control socket, if any
    /// (`Builder::take_over`).
    pub takeover: bool,
}

/// Where log lines go (`--log`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTo {
    /// journald's native protocol when stderr is the journal (each line carries its own process's `_PID`),
    /// stderr otherwise.
    Auto,
    Journal,
    Stderr,
}

pub fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        listen: "127.0.0.1:8080".into(),
        version: DEFAULT_VERSION.into(),
        init_fault: None,
        init_delay: Duration::ZERO,
        ready_timeout: Duration::from_secs(30),
        drain_timeout: Duration::from_secs(30),
        stream_grace: None,
        hold_open: None,
        control_socket: None,
        reuseport: false,
        extra_listeners: 0,
        ballast_mib: 0,
        background_init: false,
        probation: Duration::ZERO,
        probation_stall: None,
        crash_fault: None,
        fd_store: false,
        log: LogTo::Auto,
        sigchld_ignore: false,
        own_reaper: false,
        no_move: false,
        takeover: false,
    };
    // A deployment's own label for this instance, shown in every response (`--version-tag` wins): how blue/green
    // units that differ in `Environment=` tell their responses apart.
    if let Ok(v) = std::env::var("APP_VERSION") {
        a.version = v;
    }
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let secs = |v: String| -> Result<Duration, String> {
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| format!("{flag}: {v:?} is not a number of seconds"))
        };
        match flag.as_str() {
            "--listen" => a.listen = value()?,
            "--version-tag" => a.version = value()?,
            "--init-fault" => a.init_fault = Some(value()?),
            "--init-delay-ms" => {
                let v = value()?;
                a.init_delay = Duration::from_millis(v.parse().map_err(|_| format!("--init-delay-ms: {v:?} is not a number"))?)
            }
            "--ready-timeout" => a.ready_timeout = secs(value()?)?,
            "--drain-timeout" => a.drain_timeout = secs(value()?)?,
            "--stream-grace" => a.stream_grace = Some(secs(value()?)?),
            "--hold-open" => a.hold_open = Some(value()?),
            "--control-socket" => a.control_socket = Some(value()?),
            "--reuseport" => a.reuseport = true,
            "--background-init" => a.background_init = true,
            "--probation" => a.probation = secs(value()?)?,
            "--probation-stall" => a.probation_stall = Some(secs(value()?)?),
            "--crash-fault" => a.crash_fault = Some(value()?),
            "--fd-store" => a.fd_store = true,
            "--sigchld-ignore" => a.sigchld_ignore = true,
            "--own-reaper" => a.own_reaper = true,
            "--no-move" => a.no_move = true,
            "--takeover" => a.takeover = true,
            "--log" => {
                a.log = match value()?.as_str() {
                    "auto" => LogTo::Auto,
                    "journal" => LogTo::Journal,
                    "stderr" => LogTo::Stderr,
                    v => return Err(format!("--log: {v:?} is not auto, journal or stderr")),
                }
            }
            "--ballast-mib" => {
                let v = value()?;
                a.ballast_mib = v
                    .parse()
                    .map_err(|_| format!("--ballast-mib: {v:?} is not a number"))?
            }
            "--extra-listeners" => {
                let v = value()?;
                a.extra_listeners = v
                    .parse()
                    .map_err(|_| format!("--extra-listeners: {v:?} is not a number"))?
            }
            "-h" | "--help" => {
                return Err("usage: PROGRAM [--listen ADDR] [--version-tag V] [--init-fault FILE] \
                            [--init-delay-ms N] [--ready-timeout SECS] [--drain-timeout SECS] [--stream-grace SECS] [--hold-open FILE] \
                            [--control-socket PATH] [--reuseport] [--extra-listeners N] [--ballast-mib N] [--background-init] \
                            [--probation SECS] [--probation-stall SECS] [--crash-fault FILE] [--fd-store] [--log auto|journal|stderr] \
                            [--sigchld-ignore] [--own-reaper] [--no-move] [--takeover]"
                    .into())
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(a)
}

/// Logs carry the pid and the generation: old and new processes share one stderr (under systemd, one journal
/// stream, which journald attributes to the process that opened it: the first one).
struct PidTime;
impl tracing_subscriber::fmt::time::FormatTime for PidTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        write!(
            w,
            "{}.{:06} pid={}",
            t.as_secs(),
            t.subsec_micros(),
            std::process::id()
        )?;
        write!(w, " gen={}", exuvia::logging::generation())
    }
}

/// `RUST_LOG=debug` (or trace, warn, error) for more or less detail; info by default.
fn log_level() -> tracing::Level {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(tracing::Level::INFO)
}

/// The examples' `main`: parse the command line (exit 2 with a message on a bad one), set up logging, run,
/// and exit 1 with the error logged if `run` fails.
pub fn main(
    name: &str,
    run: impl FnOnce(Args) -> Result<(), Box<dyn std::error::Error>>,
) -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{name}: {msg}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(name, args.log);
    children_as_the_application_says(&args);
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            // A refused takeover: the running process serves on; say so to a supervisor (the blue/green
            // template does not restart on it).
            match e.downcast_ref::<exuvia::Error>().map(exuvia::Error::kind) {
                Some(exuvia::ErrorKind::TakeoverRefused) => {
                    std::process::ExitCode::from(exuvia::EXIT_TAKEOVER_FAILED)
                }
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}

/// `--sigchld-ignore`: `SIGCHLD` set to `SIG_IGN`, as daemons that spawn helpers often do (the kernel then
/// reaps every child at once, so nobody can read an exit status). `--own-reaper`: a thread that reaps every
/// child with `waitpid(-1)` as it ends, as applications with their own process supervision do. Either way
/// exuvia cannot read its new process's exit status; the rollback tests check it still knows a crash.
fn children_as_the_application_says(args: &Args) {
    if args.sigchld_ignore {
        // SAFETY: installs SIG_IGN for SIGCHLD, no handler code; done before any thread of ours exists.
        unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    }
    if args.own_reaper {
        std::thread::spawn(|| loop {
            let mut status = 0;
            // SAFETY: waitpid with a pointer to a live c_int.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid > 0 {
                tracing::info!(pid, status, "own reaper: reaped a child");
            } else {
                // No children now (ECHILD): look again soon.
                std::thread::sleep(Duration::from_millis(5));
            }
        });
    }
}

/// Logging as `--log` says (see `exuvia::logging`): natively to journald, where every entry carries its own
/// process's `_PID` and `EXUVIA_GENERATION`, or to stderr with the pid and generation in each line.
pub fn init_logging(name: &str, to: LogTo) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let level = tracing_subscriber::filter::LevelFilter::from_level(log_level());
    let journal = match to {
        LogTo::Auto => exuvia::logging::stderr_is_journal(),
        LogTo::Journal => true,
        LogTo::Stderr => false,
    };
    if journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_syslog_identifier(name.to_string())
                    .with_custom_fields([(
                        "EXUVIA_GENERATION",
                        exuvia::logging::generation().to_string(),
                    )]);
                tracing_subscriber::registry()
                    .with(layer.with_filter(level))
                    .init();
                return;
            }
            Err(e) => eprintln!("{name}: cannot log to journald ({e}); logging to stderr"),
        }
    }
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_timer(PidTime)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .with_target(false)
        .with_writer(io::stderr)
        .init();
}

/// Bind options as the command line asks: `--reuseport` sets `SO_REUSEPORT`, for the benchmark's
/// overlap baseline only (exuvia itself never needs it: it hands the one socket over).
pub fn bind_options(args: &Args) -> exuvia::BindOptions {
    let reuseport = args.reuseport;
    exuvia::BindOptions::new().configure(move |fd| {
        if !reuseport {
            return Ok(());
        }
        use std::os::fd::AsRawFd;
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a borrowed, open socket with a pointer to a live c_int of the size passed.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_REUSEPORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    })
}

/// `--ballast-mib N`: N MiB of memory, written once so that it is resident, and held: a stand-in for the
/// caches of a big service, for the benchmark's figure of what spawning the new process costs a big old one.
pub fn ballast(mib: usize) -> Vec<u8> {
    vec![1u8; mib << 20]
}

/// `--extra-listeners N`: N more TCP listeners on 127.0.0.1 (ephemeral ports), held but never accepted on, so
/// that the benchmark can time a handover of many sockets. Raises the soft descriptor limit to the hard one
/// first when N needs it.
pub fn extra_listeners(
    upgrader: &Upgrader,
    n: usize,
) -> Result<Vec<std::net::TcpListener>, Box<dyn std::error::Error>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a live rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    (0..n)
        .map(|i| {
            upgrader
                .listen_tcp(&format!("extra-{i}"), "127.0.0.1:0")
                .map_err(|e| format!("extra listener {i} of {n}: {e}").into())
        })
        .collect()
}

/// The upgrader as the command line configures it.
pub fn builder(args: &Args) -> exuvia::Builder {
    let mut builder = Upgrader::builder()
        .ready_timeout(args.ready_timeout)
        .drain_timeout(args.drain_timeout)
        .background_initialisation(args.background_init)
        .probation(args.probation)
        .fd_store(args.fd_store)
        .move_connections(!args.no_move)
        .take_over(args.takeover);
    if let Some(path) = &args.control_socket {
        builder = builder.control_socket(path);
    }
    if let Some(stall) = args.probation_stall {
        builder = builder.probation_stall(stall);
    }
    if let Some(grace) = args.stream_grace {
        builder = builder.stream_grace(grace);
    }
    builder
}

/// The application's "initialisation": the simulated delay and the injected faults (`--init-fault`).
/// Runs before ready; the old process, if any, serves meanwhile.
pub fn initialise(upgrader: &Upgrader, args: &Args) -> Result<(), exuvia::Error> {
    if !args.init_delay.is_zero() {
        tracing::info!(ms = args.init_delay.as_millis() as u64, "initialising");
        std::thread::sleep(args.init_delay);
    }
    if let Some(file) = &args.init_fault {
        let fault = std::fs::read_to_string(file).unwrap_or_default();
        if fault.contains("fail") {
            tracing::error!(
                file,
                "init fault injected: exiting with status 3 before ready"
            );
            std::process::exit(3);
        }
        if fault.contains("refuse") {
            tracing::error!(
                file,
                "init fault injected: reporting failure to the old process"
            );
            upgrader.fail("injected fault: configuration refused")?;
            std::process::exit(1);
        }
        if let Some(n) = fault
            .trim()
            .strip_prefix("fdlimit ")
            .and_then(|n| n.parse::<u64>().ok())
        {
            // A process that runs short of descriptors (as under a low LimitNOFILE=): the soft limit only.
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit/setrlimit with a pointer to a live rlimit.
            unsafe {
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
                r.rlim_cur = n.min(r.rlim_max);
                libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            }
            tracing::warn!(
                file,
                limit = n,
                "init fault injected: descriptor limit lowered"
            );
        }
        if fault.contains("hang") {
            tracing::warn!(file, "init fault injected: never reporting ready");
            loop {
                std::thread::park();
            }
        }
    }
    Ok(())
}

/// The fd-passing variables this process can still see (names only): none once exuvia has read them.
pub fn fd_passing_env() -> String {
    let mut out = String::new();
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("LISTEN_") || k.starts_with("EXUVIA_") {
            out.push_str(&k);
            out.push('\n');
        }
    }
    out
}

/// Opens `path` and clears close-on-exec on it, as careless C libraries do.
pub fn hold_open(path: &str) -> io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    // SAFETY: fcntl on an fd owned by `f`, which outlives the call.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    tracing::info!(
        path,
        fd = f.as_raw_fd(),
        "holding a file open without close-on-exec"
    );
    Ok(f)
}

/// Fault injection for rollback tests (`--crash-fault FILE`): a process that finds FILE once it serves (after
/// `ready()`) removes it, so that only that generation crashes, and crashes as it says: `panic MS` (a panic,
/// the process ends with status 101 as a panicking `main` does), `abort MS` (SIGABRT), `exit MS` (status 1),
/// `hang MS` (never crashes: stays alive; for "after the window" cases the test kills it itself), `oom MS`
/// (allocates and touches memory until the kernel's OOM killer ends it: run it under a memory limit; it stops
/// at 2 GiB and says so, rather than press the whole machine), `exit0 MS` (exits with status 0 on its own: a
/// `main` that returned `Ok` because its accept loop ended), `deaf` (returns [`Fault::Deaf`]: the example then
/// closes its listener and never accepts, alive but not serving).
pub fn crash_later(args: &Args) -> Fault {
    let Some(path) = &args.crash_fault else {
        return Fault::None;
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return Fault::None;
    };
    let _ = std::fs::remove_file(path);
    let mut words = text.split_whitespace();
    let (how, ms) = (
        words.next().unwrap_or("exit").to_string(),
        words
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0),
    );
    tracing::warn!(how, ms, "crash fault armed");
    if how == "deaf" {
        tracing::warn!("deaf fault: closing the listener; this process will never accept");
        return Fault::Deaf;
    }
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(ms));
        tracing::warn!(how, "crashing now (fault)");
        match how.as_str() {
            "panic" => {
                std::panic::set_hook(Box::new(|info| {
                    eprintln!("{info}");
                    std::process::exit(101);
                }));
                panic!("injected crash");
            }
            "abort" => std::process::abort(),
            "exit" => std::process::exit(1),
            "exit0" => std::process::exit(0),
            "oom" => {
                let mut held: Vec<Vec<u8>> = Vec::new();
                while held.len() < 2048 {
                    held.push(vec![1u8; 1 << 20]); // written, so resident
                }
                tracing::error!(
                    mib = held.len(),
                    "oom fault: still alive after 2 GiB; is there a memory limit?"
                );
                std::thread::sleep(Duration::from_secs(3600));
            }
            _ => {}
        }
    });
    Fault::None
}

/// What [`crash_later`] leaves to the example.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Close the listener and never accept.
    Deaf,
}

/// What woke a connection waiting between two messages of its protocol.
pub enum Woken {
    Readable,
    Finishing,
    Idle,
}

/// Waits until `stream` is readable or, unless `finishing_seen`, this process is finishing (the upgrader's
/// finishing descriptor), at most `idle`. Finishing wins when both are ready: the connection moves at once,
/// with whatever the client sent meanwhile still in the socket.
pub fn wait_readable(
    upgrader: &Upgrader,
    stream: &impl std::os::fd::AsRawFd,
    finishing_seen: bool,
    idle: Duration,
) -> io::Result<Woken> {
    use std::os::fd::AsRawFd;
    let mut fds = [
        libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: upgrader.finishing_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let n = if finishing_seen { 1 } else { 2 };
    loop {
        // SAFETY: `fds` holds `n` initialised pollfds whose descriptors outlive the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), n, idle.as_millis() as i32) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(if r == 0 {
            Woken::Idle
        } else if n == 2 && fds[1].revents != 0 {
            Woken::Finishing
        } else {
            Woken::Readable
        });
    }
}

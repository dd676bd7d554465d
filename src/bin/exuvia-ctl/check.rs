//! `exuvia-ctl check UNIT`: the unit's effective settings, as the running systemd has them (`systemctl show`:
//! the same values systemd acts on, drop-ins included, and no D-Bus client needed), and the service's own
//! settings over the control socket (`config`), checked against what an upgrade needs. Every finding says what
//! to change. Exit status: 0 clean, 1 warnings, 2 errors.

use std::collections::HashMap;

use exuvia::control::Config;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Ok,
    Note,
    Warning,
    Error,
}

struct Findings(Vec<(Level, String)>);

impl Findings {
    fn add(&mut self, level: Level, text: impl Into<String>) {
        self.0.push((level, text.into()));
    }
}

/// A property as `systemctl show` printed it, or "" when it did not.
fn prop<'a>(props: &'a HashMap<String, String>, key: &str) -> &'a str {
    props.get(key).map_or("", String::as_str)
}

const PROPERTIES: &str = "LoadState,ActiveState,Type,NotifyAccess,ReloadSignal,ExecReload,ExecStop,KillMode,\
TimeoutStopUSec,TimeoutStartUSec,WatchdogUSec,RuntimeDirectory,RuntimeDirectoryPreserve,FileDescriptorStoreMax,\
FileDescriptorStorePreserve,FragmentPath,DropInPaths,Id,SubState,Result,ExecMainCode,ExecMainStatus,NRestarts,ExecStart,\
PrivateTmp,ProtectHome,InaccessiblePaths,TemporaryFileSystem";

/// The longest unit name systemd accepts (`UNIT_NAME_MAX` less the NUL).
const UNIT_NAME_MAX: usize = 255;
/// The unit types a name may end in.
const UNIT_TYPES: &[&str] = &[
    "service",
    "socket",
    "target",
    "device",
    "mount",
    "automount",
    "swap",
    "timer",
    "path",
    "slice",
    "scope",
];

/// Checks `name` as systemd's `unit_name_is_valid` would, before it goes anywhere near a command line: the
/// characters `[A-Za-z0-9:_.\@-]`, not starting with `-` or `.`, at most 255 bytes, with a known type
/// suffix; a name without a suffix is taken as `.service`, as systemctl does. Returns the name to use.
pub(crate) fn unit_name(name: &str) -> Result<String, String> {
    let shown: String = name.chars().take(64).collect();
    let bad = |why: &str| Err(format!("{shown:?} is not a unit name: {why}"));
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.starts_with('-') {
        return bad("it starts with '-' (options go before the unit name; put the name after --)");
    }
    if name.starts_with('.') {
        return bad("it starts with '.'");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ":-_.\\@".contains(*c)))
    {
        return bad(&format!(
            "{c:?} is not allowed in a unit name (letters, digits and :-_.\\@ only; no globs)"
        ));
    }
    let full = match name.rsplit_once('.') {
        Some((_, ty)) if UNIT_TYPES.contains(&ty) => name.to_string(),
        _ => format!("{name}.service"),
    };
    if full.len() > UNIT_NAME_MAX {
        return bad("it is longer than 255 bytes");
    }
    let (stem, _) = full.rsplit_once('.').unwrap_or((&full, ""));
    match stem.split_once('@') {
        Some((prefix, instance)) if prefix.is_empty() || instance.contains('@') => {
            bad("a template name is PREFIX@INSTANCE")
        }
        Some((_, "")) => {
            bad("a template (PREFIX@.service) is not a running unit; name an instance")
        }
        _ if stem.is_empty() => bad("it has no name before the type"),
        _ => Ok(full),
    }
}

pub(crate) fn run(unit: &str, socket: Option<PathBuf>, timeout: Duration) -> ExitCode {
    let unit = match unit_name(unit) {
        Ok(u) => u,
        Err(why) => {
            eprintln!("exuvia-ctl check: {why}");
            return ExitCode::from(2);
        }
    };
    let unit = unit.as_str();
    let props = match systemctl_show(unit) {
        Ok(p) => p,
        Err(why) => {
            eprintln!("exuvia-ctl check: {why}");
            return ExitCode::from(2);
        }
    };
    let mut f = Findings(Vec::new());
    if props.get("LoadState").map(String::as_str) != Some("loaded") {
        eprintln!(
            "exuvia-ctl check: systemd has no unit {unit:?} loaded (LoadState={}); check the name, or run \
             systemctl daemon-reload",
            props.get("LoadState").map_or("?", String::as_str)
        );
        return ExitCode::from(2);
    }
    let version = systemd_version();
    check_unit(&props, version, &mut f);
    let config = service_config(&props, socket, timeout);
    check_service(&props, config.as_ref(), &mut f);
    let worst = f.0.iter().map(|(l, _)| *l).max().unwrap_or(Level::Ok);
    for (level, text) in &f.0 {
        let tag = match level {
            Level::Ok => "ok",
            Level::Note => "note",
            Level::Warning => "warning",
            Level::Error => "error",
        };
        println!("{tag}: {text}");
    }
    match worst {
        Level::Error => ExitCode::from(2),
        Level::Warning => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    }
}

fn systemctl_show(unit: &str) -> Result<HashMap<String, String>, String> {
    let out = std::process::Command::new("systemctl")
        // The name after `--`: never read as an option, whatever it is (it was validated all the same).
        .args(["show", &format!("--property={PROPERTIES}"), "--", unit])
        .output()
        .map_err(|e| format!("cannot run systemctl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "systemctl show {unit} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// The running manager's version (its `Version` property: "252.39-1~deb12u2"), which is what decides what a
/// unit may say; `systemctl --version` (the client's: "systemd 254 (254.5-1~bpo12+3)") if that is unreadable.
fn systemd_version() -> Option<u32> {
    let run = |args: &[&str]| {
        std::process::Command::new("systemctl")
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    run(&["show", "-p", "Version", "--value"])
        .and_then(|v| parse_version(&v))
        .or_else(|| parse_version(&run(&["--version"])?))
}

/// The major version in "252.39-1~deb12u2" or in "systemd 254 (254.5-1~bpo12+3)".
fn parse_version(text: &str) -> Option<u32> {
    let line = text.lines().next()?.trim();
    let line = line.strip_prefix("systemd ").unwrap_or(line);
    let digits: String = line.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The last `Type=` the unit's files say (the fragment, then its drop-ins), as written: a systemd that does not
/// know the value ignores the line, and `systemctl show` then reports its default instead.
fn written_type(props: &HashMap<String, String>) -> Option<String> {
    let files = std::iter::once(prop(props, "FragmentPath"))
        .chain(prop(props, "DropInPaths").split_whitespace());
    let mut last = None;
    for file in files.filter(|f| !f.is_empty()) {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let mut section = "";
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line;
            } else if let Some(v) = line
                .strip_prefix("Type=")
                .filter(|_| section == "[Service]")
            {
                last = Some(v.trim().to_string());
            }
        }
    }
    last
}

/// A systemd time span as `systemctl show` prints it ("1min 30s", "500ms", "infinity"); `None` for infinity.
fn parse_span(text: &str) -> Option<Duration> {
    if text.trim() == "infinity" {
        return None;
    }
    let mut total = Duration::ZERO;
    for word in text.split_whitespace() {
        let split = word
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(word.len());
        let (n, unit) = word.split_at(split);
        let n: f64 = n.parse().ok()?;
        let secs = match unit {
            "us" | "usec" => n / 1e6,
            "ms" | "msec" => n / 1e3,
            "" | "s" | "sec" => n,
            "min" | "m" => n * 60.0,
            "h" | "hr" => n * 3600.0,
            "d" => n * 86400.0,
            _ => return None,
        };
        total += Duration::from_secs_f64(secs);
    }
    Some(total)
}

/// The `argv[]=` of an `Exec*=` property (`{ path=... ; argv[]=/usr/bin/exuvia-ctl stop ; ... }`), empty when
/// the unit has none.
fn exec_argv(value: &str) -> Vec<String> {
    value
        .split(" ; ")
        .find_map(|part| part.trim().trim_start_matches("{ ").strip_prefix("argv[]="))
        .map(|argv| argv.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Whether an `Exec*=` command is `exuvia-ctl <verb>` with a program that exists and is executable.
fn helper(props: &HashMap<String, String>, key: &str, verb: &str, f: &mut Findings) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let argv = exec_argv(props.get(key).map_or("", String::as_str));
    let Some(program) = argv.first() else {
        return false;
    };
    if argv.get(1).map(String::as_str) != Some(verb) {
        f.add(
            Level::Warning,
            format!(
                "{key}={} is not `exuvia-ctl {verb}`; fix: {key}=/usr/local/bin/exuvia-ctl {verb}",
                argv.join(" ")
            ),
        );
        return true;
    }
    match std::fs::metadata(program) {
        Ok(m) if m.permissions().mode() & 0o111 != 0 => {
            f.add(Level::Ok, format!("{key}={}", argv.join(" ")))
        }
        _ => f.add(
            Level::Error,
            format!(
                "{key}= names {program}, which is not an executable file; fix: install exuvia-ctl there \
                 (cargo install --path . --bin exuvia-ctl --root /usr/local) or change the path"
            ),
        ),
    }
    true
}

/// The unit's own settings, one area at a time.
fn check_unit(props: &HashMap<String, String>, version: Option<u32>, f: &mut Findings) {
    check_state(props, f);
    check_exec_visible(props, f);
    check_type(props, version, f);
    check_notify_access(props, f);
    check_stop(props, f);
    check_runtime(props, f);
}

/// Whether the unit runs at all: a unit that is not active (starting, restarting after a crash, failed, stopped)
/// fails the check, with how its main process last ended and what systemd's own exit codes mean.
fn check_state(props: &HashMap<String, String>, f: &mut Findings) {
    let (active, sub) = (prop(props, "ActiveState"), prop(props, "SubState"));
    if matches!(active, "active" | "reloading") {
        f.add(Level::Ok, format!("ActiveState={active} ({sub})"));
        return;
    }
    let restarts = match prop(props, "NRestarts") {
        "" | "0" => String::new(),
        n => format!(", restarted {n} times"),
    };
    let last = last_exit(prop(props, "ExecMainCode"), prop(props, "ExecMainStatus"));
    f.add(
        Level::Error,
        format!(
            "the unit is not running: ActiveState={active} ({sub}), Result={}{restarts}; {last}; see systemctl \
             status and journalctl -u for the service's own words",
            prop(props, "Result")
        ),
    );
}

/// How the main process last ended, from `ExecMainCode=` (1 exited, 2 killed, 3 dumped core) and
/// `ExecMainStatus=`, with the meaning of systemd's own exit codes (systemd.exec(5), "Process Exit Codes").
fn last_exit(code: &str, status: &str) -> String {
    let status_n: i32 = status.parse().unwrap_or(0);
    match code {
        "1" => {
            let meaning = match status_n {
                200 => " (200/CHDIR: WorkingDirectory= is not reachable)",
                203 => {
                    " (203/EXEC: systemd could not execute ExecStart='s program: missing, not executable, or \
                     hidden by the unit's sandboxing)"
                }
                214 => " (214/SETSCHEDULER: the CPU scheduling settings were refused)",
                216 => " (216/GROUP: the Group= does not exist)",
                217 => " (217/USER: the User= does not exist)",
                218 => " (218/CAPABILITIES: the capability settings were refused)",
                226 => {
                    " (226/NAMESPACE: the sandbox could not be set up: a path in ReadWritePaths=, \
                     ReadOnlyPaths= or InaccessiblePaths= may not exist)"
                }
                233 => " (233/RUNTIME_DIRECTORY: RuntimeDirectory= could not be created)",
                75 => " (75: a takeover failed; the running instance serves on)",
                _ => "",
            };
            format!("its main process last exited with status {status}{meaning}")
        }
        "2" => format!("its main process was last killed by signal {status}"),
        "3" => format!("its main process last dumped core (signal {status})"),
        _ => "its main process has not run".to_string(),
    }
}

/// The program of an `Exec*=` property (`{ path=/usr/local/bin/app ; argv[]=... }`).
fn exec_path(value: &str) -> Option<&str> {
    value
        .split(" ; ")
        .find_map(|part| part.trim().trim_start_matches("{ ").strip_prefix("path="))
        .map(str::trim)
}

/// Whether `path` is `dir` or below it.
fn is_under(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    !dir.is_empty() && (path == dir || path.starts_with(&format!("{dir}/")))
}

/// Whether the unit's own sandboxing hides `ExecStart=`'s program from the service (systemd then fails to
/// execute it, 203/EXEC, and an upgrade would execute the same path): says which setting hides it.
fn check_exec_visible(props: &HashMap<String, String>, f: &mut Findings) {
    let Some(program) = exec_path(prop(props, "ExecStart")) else {
        return;
    };
    let mut hidden: Vec<String> = Vec::new();
    if prop(props, "PrivateTmp") == "yes" {
        for dir in ["/tmp", "/var/tmp"] {
            if is_under(program, dir) {
                hidden.push(format!(
                    "PrivateTmp=yes (the service sees an empty private {dir})"
                ));
            }
        }
    }
    if matches!(prop(props, "ProtectHome"), "yes" | "tmpfs") {
        for dir in ["/home", "/root", "/run/user"] {
            if is_under(program, dir) {
                hidden.push(format!(
                    "ProtectHome={} (the service cannot see {dir})",
                    prop(props, "ProtectHome")
                ));
            }
        }
    }
    for entry in prop(props, "InaccessiblePaths").split_whitespace() {
        let dir = entry.trim_start_matches(['-', '+']);
        if is_under(program, dir) {
            hidden.push(format!("InaccessiblePaths={dir}"));
        }
    }
    for entry in prop(props, "TemporaryFileSystem").split_whitespace() {
        let dir = entry.split(':').next().unwrap_or("");
        if is_under(program, dir) {
            hidden.push(format!(
                "TemporaryFileSystem={dir} (an empty tmpfs over it)"
            ));
        }
    }
    if hidden.is_empty() {
        return;
    }
    f.add(
        Level::Error,
        format!(
            "ExecStart= runs {program}, which the unit's own sandboxing hides from the service: {}; systemd \
             cannot execute it (203/EXEC) and an upgrade would execute the same path; fix: install the binary \
             where the sandbox leaves it visible (/usr/local/bin, /opt/APP), or change that setting",
            hidden.join(", ")
        ),
    );
}

/// `Type=` and the reload helper it needs, for the running systemd's version.
fn check_type(props: &HashMap<String, String>, version: Option<u32>, f: &mut Findings) {
    let v = version.map_or("an unknown version".to_string(), |v| format!("systemd {v}"));
    match prop(props, "Type") {
        "notify-reload" => {
            if version.is_some_and(|v| v < 253) {
                f.add(
                    Level::Error,
                    format!(
                        "Type=notify-reload needs systemd 253 or newer, this is {v}; fix: use \
                         units/exuvia-app-portable.service (Type=notify + ExecReload=exuvia-ctl upgrade)"
                    ),
                );
            } else {
                f.add(Level::Ok, format!("Type=notify-reload ({v})"));
            }
            if prop(props, "ReloadSignal") != "1" {
                f.add(
                    Level::Error,
                    format!(
                        "ReloadSignal= is signal {}, but exuvia upgrades on SIGHUP; fix: ReloadSignal=SIGHUP",
                        prop(props, "ReloadSignal")
                    ),
                );
            }
            if !helper(props, "ExecReload", "reload-verdict", f) {
                f.add(
                    Level::Warning,
                    "no ExecReload=: `systemctl reload` reports success even when the upgrade fails; fix: \
                     ExecReload=/usr/local/bin/exuvia-ctl reload-verdict",
                );
            }
        }
        "notify" => {
            f.add(
                Level::Ok,
                format!("Type=notify ({v}; the portable shape: reloads go through ExecReload=)"),
            );
            if !helper(props, "ExecReload", "upgrade", f) {
                f.add(
                    Level::Error,
                    "Type=notify without ExecReload=: `systemctl reload` does nothing; fix: \
                     ExecReload=/usr/local/bin/exuvia-ctl upgrade",
                );
            }
        }
        other if written_type(props).as_deref() == Some("notify-reload") => f.add(
            Level::Error,
            format!(
                "the unit says Type=notify-reload, which {v} does not know (253+): it ignored the line and runs \
                 the service as Type={other}, so a reload would not upgrade it; fix: use \
                 units/exuvia-app-portable.service (Type=notify + ExecReload=exuvia-ctl upgrade)"
            ),
        ),
        other => f.add(
            Level::Error,
            format!(
                "Type={other}: systemd would not follow the main process across an upgrade; fix: \
                 Type=notify-reload (systemd 253+) or Type=notify with ExecReload=exuvia-ctl upgrade"
            ),
        ),
    }
}

/// `NotifyAccess=`: who may tell systemd the main process changed.
fn check_notify_access(props: &HashMap<String, String>, f: &mut Findings) {
    match prop(props, "NotifyAccess") {
        "all" => f.add(Level::Ok, "NotifyAccess=all"),
        "exec" => f.add(
            Level::Note,
            "NotifyAccess=exec: fine without a probation window; a rollback needs NotifyAccess=all",
        ),
        "main" => f.add(
            Level::Warning,
            "NotifyAccess=main: the reload helper cannot end a reload whose main process died, and a rollback \
             cannot hand the service back; fix: NotifyAccess=all",
        ),
        other => f.add(
            Level::Error,
            format!(
                "NotifyAccess={other}: systemd ignores the service's notifications (READY=1, MAINPID=); fix: \
                 NotifyAccess=all"
            ),
        ),
    }
}

/// `ExecStop=` and `KillMode=`: what a stop waits for, and what it ends.
fn check_stop(props: &HashMap<String, String>, f: &mut Findings) {
    if !helper(props, "ExecStop", "stop", f) {
        f.add(
            Level::Warning,
            "no ExecStop=: after an upgrade the main process is not systemd's child, and a stop sends SIGTERM \
             then SIGKILL without waiting for the drain; fix: ExecStop=/usr/local/bin/exuvia-ctl stop",
        );
    }
    match prop(props, "KillMode") {
        "control-group" | "mixed" => f.add(Level::Ok, format!("KillMode={}", prop(props, "KillMode"))),
        other => f.add(
            Level::Warning,
            format!(
                "KillMode={other}: a stop leaves other processes of the unit (an old process still draining, a \
                 new one's children) running; fix: KillMode=control-group"
            ),
        ),
    }
}

/// `RuntimeDirectory=` (where the control socket lives) and the watchdog.
fn check_runtime(props: &HashMap<String, String>, f: &mut Findings) {
    if prop(props, "RuntimeDirectory").is_empty() {
        f.add(
            Level::Error,
            "no RuntimeDirectory=: the service has no control socket, so ExecReload=/ExecStop= helpers cannot \
             reach it; fix: RuntimeDirectory=%N",
        );
    } else {
        f.add(
            Level::Ok,
            format!("RuntimeDirectory={}", prop(props, "RuntimeDirectory")),
        );
    }
    if let Some(instance) = instance_of(prop(props, "Id")) {
        check_instance(props, instance, f);
    }
    if let Some(w) = parse_span(prop(props, "WatchdogUSec")).filter(|w| !w.is_zero()) {
        f.add(
            Level::Ok,
            format!("WatchdogSec={w:?}: fed by whichever process is the main one, across upgrades"),
        );
    }
}

/// The instance name of a template unit's instance (`green` of `app@green.service`).
fn instance_of(id: &str) -> Option<&str> {
    let stem = id.strip_suffix(".service")?;
    let (_, instance) = stem.split_once('@')?;
    (!instance.is_empty()).then_some(instance)
}

/// An instance of a blue/green template (`units/exuvia-app@.service`): every instance must find the same
/// control socket, and none may remove it from under the other.
fn check_instance(props: &HashMap<String, String>, instance: &str, f: &mut Findings) {
    let dir = prop(props, "RuntimeDirectory");
    if !dir.is_empty() && dir.split_whitespace().any(|d| d.contains(instance)) {
        f.add(
            Level::Error,
            format!(
                "RuntimeDirectory={dir} names this instance ({instance}): each instance then has a control socket \
                 of its own, so a starting instance cannot find the running one to take over from, and binds \
                 afresh (address in use); fix: one directory for every instance, e.g. RuntimeDirectory=app \
                 (not %N or %i)"
            ),
        );
    }
    if !dir.is_empty() && prop(props, "RuntimeDirectoryPreserve") != "yes" {
        f.add(
            Level::Error,
            format!(
                "RuntimeDirectoryPreserve={}: when an instance stops, systemd removes the directory holding \
                 the control socket the other instance serves, and the next takeover finds nobody; fix: \
                 RuntimeDirectoryPreserve=yes",
                prop(props, "RuntimeDirectoryPreserve")
            ),
        );
    } else if !dir.is_empty() {
        f.add(
            Level::Ok,
            "RuntimeDirectoryPreserve=yes: the instances share the control socket's directory",
        );
    }
}

/// The service's own settings, from its control socket (`None` when it cannot say).
fn service_config(
    props: &HashMap<String, String>,
    socket: Option<PathBuf>,
    timeout: Duration,
) -> Option<Config> {
    let path = socket.or_else(|| {
        let dir = props.get("RuntimeDirectory")?.split_whitespace().next()?;
        Some(exuvia::control::socket_path_for_runtime_directory(dir))
    })?;
    let reply = exuvia::control::request(&path, exuvia::control::Command::Config, timeout).ok()?;
    if !reply.is_ok() {
        return None;
    }
    Config::parse(reply.text()).ok()
}

fn check_service(props: &HashMap<String, String>, config: Option<&Config>, f: &mut Findings) {
    let Some(config) = config else {
        f.add(
            Level::Note,
            format!(
                "the service's own settings were not checked: its control socket did not answer (ActiveState={})",
                prop(props, "ActiveState")
            ),
        );
        return;
    };
    if instance_of(prop(props, "Id")).is_some() {
        if config.take_over {
            f.add(
                Level::Ok,
                "the service takes over (--takeover): starting another instance hands the service to it",
            );
        } else {
            f.add(
                Level::Warning,
                "this is an instance of a template, but the service does not take over (Builder::take_over, \
                 the examples' --takeover): starting another instance binds afresh beside this one instead of \
                 taking the service over; fix: add --takeover (or build with take_over(true))",
            );
        }
    }
    let drain = config.drain_timeout;
    match parse_span(prop(props, "TimeoutStopUSec")) {
        Some(stop) if stop < drain + Duration::from_secs(5) => f.add(
            Level::Warning,
            format!(
                "TimeoutStopSec={stop:?} leaves no room for the service's drain timeout of {drain:?}: systemd \
                 kills it mid-drain; fix: TimeoutStopSec={}",
                drain.as_secs() + 15
            ),
        ),
        _ => f.add(
            Level::Ok,
            format!("TimeoutStopSec covers the drain timeout ({drain:?})"),
        ),
    }
    let ready = config.ready_timeout;
    if let Some(start) = parse_span(prop(props, "TimeoutStartUSec")) {
        if start < ready {
            f.add(
                Level::Warning,
                format!(
                    "TimeoutStartSec={start:?} is shorter than the service's ready timeout of {ready:?}: a first \
                     start that initialises slowly fails before the service gives up itself; fix: \
                     TimeoutStartSec={}",
                    ready.as_secs() + 15
                ),
            );
        }
    }
    for name in &config.unclaimed {
        f.add(
            Level::Warning,
            format!(
                "the socket {name:?} is passed to the service but never taken (it is handed on to each new \
                 process unused); fix: take it under that name, or match FileDescriptorName= to the name the \
                 program asks for"
            ),
        );
    }
    if config.fd_store {
        let max: u64 = prop(props, "FileDescriptorStoreMax").parse().unwrap_or(0);
        let needed = config.taken.len() as u64;
        if max < needed.max(1) {
            f.add(
                Level::Error,
                format!(
                    "the service keeps its sockets in the fd store, but FileDescriptorStoreMax={max} (it has \
                     {needed}); fix: FileDescriptorStoreMax={}",
                    needed.max(1) + 4
                ),
            );
        } else {
            f.add(Level::Ok, format!("FileDescriptorStoreMax={max}"));
        }
        match prop(props, "FileDescriptorStorePreserve") {
            "yes" => {}
            // Older managers have no such setting (the property is missing): nothing to fix in the unit.
            "" => f.add(
                Level::Note,
                "this systemd has no FileDescriptorStorePreserve= (254+): the fd store survives crashes and \
                 Restart=, not `systemctl restart`",
            ),
            _ => f.add(
                Level::Warning,
                "the fd store is flushed at `systemctl restart`; fix: FileDescriptorStorePreserve=yes",
            ),
        }
    }
    if !config.probation.is_zero() && prop(props, "NotifyAccess") != "all" {
        f.add(
            Level::Error,
            "the service has a probation window, but a rollback cannot hand the service back without \
             NotifyAccess=all; fix: NotifyAccess=all",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_the_sandbox_hides_is_named_with_the_setting() {
        let props = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let exec = |p: &str| format!("{{ path={p} ; argv[]={p} --takeover ; ignore_errors=no }}");
        let found = |pairs: &[(&str, &str)]| {
            let mut f = Findings(Vec::new());
            check_exec_visible(&props(pairs), &mut f);
            f.0
        };
        let e = exec("/var/tmp/app");
        let hidden = found(&[("ExecStart", &e), ("PrivateTmp", "yes")]);
        assert_eq!(hidden.len(), 1);
        assert_eq!(hidden[0].0, Level::Error);
        assert!(hidden[0].1.contains("PrivateTmp=yes"), "{hidden:?}");
        assert!(found(&[("ExecStart", &e), ("PrivateTmp", "no")]).is_empty());
        let e = exec("/root/bin/app");
        assert!(found(&[("ExecStart", &e), ("ProtectHome", "yes")])[0]
            .1
            .contains("ProtectHome=yes"));
        assert!(found(&[("ExecStart", &e), ("ProtectHome", "read-only")]).is_empty());
        let e = exec("/srv/app/bin/app");
        assert!(
            found(&[("ExecStart", &e), ("InaccessiblePaths", "-/srv/app /x")])[0]
                .1
                .contains("InaccessiblePaths=/srv/app")
        );
        assert!(found(&[("ExecStart", &e), ("InaccessiblePaths", "/srv/application")]).is_empty());
        assert!(
            found(&[("ExecStart", &e), ("TemporaryFileSystem", "/srv:ro")])[0]
                .1
                .contains("TemporaryFileSystem=/srv")
        );
    }

    #[test]
    fn a_unit_that_is_not_running_fails_with_its_last_exit() {
        let mut f = Findings(Vec::new());
        let props: HashMap<String, String> = [
            ("ActiveState", "activating"),
            ("SubState", "auto-restart"),
            ("Result", "exit-code"),
            ("ExecMainCode", "1"),
            ("ExecMainStatus", "203"),
            ("NRestarts", "4"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        check_state(&props, &mut f);
        assert_eq!(f.0[0].0, Level::Error);
        for needle in ["auto-restart", "restarted 4 times", "203/EXEC"] {
            assert!(f.0[0].1.contains(needle), "{needle}: {:?}", f.0);
        }
        assert_eq!(
            last_exit("2", "9"),
            "its main process was last killed by signal 9"
        );
    }

    #[test]
    fn unit_names_are_checked_as_systemd_does() {
        for (name, full) in [
            ("app", "app.service"),
            ("app.service", "app.service"),
            ("app@blue.service", "app@blue.service"),
            ("app@blue", "app@blue.service"),
            ("a-b_c:d\\x2d.socket", "a-b_c:d\\x2d.socket"),
            ("my.app", "my.app.service"),
        ] {
            assert_eq!(unit_name(name).as_deref(), Ok(full), "{name}");
        }
        for (name, why) in [
            ("", "empty"),
            ("-H", "starts with '-'"),
            ("--user", "starts with '-'"),
            ("-M.host", "starts with '-'"),
            ("--version", "starts with '-'"),
            ("*", "not allowed"),
            ("app?.service", "not allowed"),
            ("app[1]", "not allowed"),
            ("a b", "not allowed"),
            ("host:/x", "not allowed"),
            (".service", "starts with '.'"),
            ("app@.service", "name an instance"),
            ("@x.service", "PREFIX@INSTANCE"),
        ] {
            let e = unit_name(name).unwrap_err();
            assert!(e.contains(why), "{name:?}: {e}");
        }
        assert!(unit_name(&"a".repeat(250)).unwrap_err().contains("255"));
    }

    #[test]
    fn systemd_values_are_read_as_systemctl_prints_them() {
        assert_eq!(
            parse_version("systemd 254 (254.5-1~bpo12+3)\n+PAM +AUDIT"),
            Some(254)
        );
        assert_eq!(parse_version("252.39-1~deb12u2\n"), Some(252));
        assert_eq!(parse_version("254"), Some(254));
        assert_eq!(parse_version("something else"), None);
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_span("1min 30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_span("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_span("infinity"), None);
        assert_eq!(parse_span("45s"), Some(Duration::from_secs(45)));
        assert_eq!(
            exec_argv("{ path=/usr/local/bin/exuvia-ctl ; argv[]=/usr/local/bin/exuvia-ctl stop ; ignore_errors=no ; start_time=[n/a] }"),
            vec!["/usr/local/bin/exuvia-ctl".to_string(), "stop".to_string()]
        );
        assert!(exec_argv("").is_empty());
    }

    #[test]
    fn the_written_type_is_the_last_service_line_across_drop_ins() {
        let dir = tempfile::tempdir().unwrap();
        let unit = dir.path().join("a.service");
        let dropin = dir.path().join("b.conf");
        std::fs::write(
            &unit,
            "[Unit]\nType=x\n[Service]\nType=notify-reload\nExecStart=/bin/true\n",
        )
        .unwrap();
        std::fs::write(&dropin, "[Service]\nType=notify\n").unwrap();
        let props = |drop_ins: &str| {
            HashMap::from([
                ("FragmentPath".to_string(), unit.display().to_string()),
                ("DropInPaths".to_string(), drop_ins.to_string()),
            ])
        };
        assert_eq!(written_type(&props("")).as_deref(), Some("notify-reload"));
        assert_eq!(
            written_type(&props(&dropin.display().to_string())).as_deref(),
            Some("notify")
        );
        assert_eq!(written_type(&HashMap::new()), None);
    }
}

//! The `sd_listen_fds` convention: `LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES` name the descriptors a
//! process finds at 3, 4, ... when it starts.
//!
//! Both systemd's socket activation and exuvia's own handover use it, so a child started by an upgrade looks,
//! to any code in it, exactly like a socket-activated process. The variables are read once, validated, and
//! turned into owned, close-on-exec descriptors; see sd_listen_fds(3).

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd, RawFd};

use crate::error::{Error, Result};
use crate::sys;

/// The first inherited descriptor.
pub(crate) const LISTEN_FDS_START: RawFd = 3;
/// More inherited descriptors than this is treated as a corrupt environment.
const MAX_LISTEN_FDS: usize = 1 << 16;
/// systemd's limit on a descriptor name.
pub(crate) const MAX_NAME_LEN: usize = 255;
/// The name systemd gives descriptors when `LISTEN_FDNAMES` is absent.
pub(crate) const UNKNOWN_NAME: &str = "unknown";

pub(crate) const VAR_PID: &str = "LISTEN_PID";
pub(crate) const VAR_FDS: &str = "LISTEN_FDS";
pub(crate) const VAR_NAMES: &str = "LISTEN_FDNAMES";
/// Set by systemd 258+; removed with the others so it never reaches a child with a stale value.
pub(crate) const VAR_PIDFDID: &str = "LISTEN_PIDFDID";

/// Whether `name` can travel in `LISTEN_FDNAMES` (systemd's `fdname_is_valid`: 1 to 255 printable ASCII
/// characters, no `:`).
pub(crate) fn name_is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b':')
}

fn utf8<'a>(var: &str, v: &'a OsStr) -> Result<&'a str> {
    v.to_str()
        .ok_or_else(|| Error::env(format!("{var} is not valid UTF-8")))
}

/// Reads the three variables. `Ok(None)`: no descriptors are meant for this process (no `LISTEN_FDS`, or a
/// `LISTEN_PID` that names another process, as after a fork by code that did not clean the environment).
/// Otherwise the name of each descriptor, in order from fd 3.
pub(crate) fn parse(
    listen_pid: Option<&OsStr>,
    listen_fds: Option<&OsStr>,
    listen_fdnames: Option<&OsStr>,
    my_pid: u32,
) -> Result<Option<Vec<String>>> {
    let Some(fds) = listen_fds else {
        return Ok(None);
    };
    let Some(pid) = listen_pid else {
        // sd_listen_fds(3) treats a missing LISTEN_PID as "not for this process".
        return Ok(None);
    };
    let pid = utf8(VAR_PID, pid)?;
    let pid: u32 = pid.trim().parse().map_err(|_| {
        Error::env(format!(
            "{VAR_PID}={pid:?} is not a process id; the service manager or parent set a corrupt environment"
        ))
    })?;
    if pid != my_pid {
        return Ok(None);
    }
    let fds = utf8(VAR_FDS, fds)?;
    let n: usize = fds.trim().parse().map_err(|_| {
        Error::env(format!(
            "{VAR_FDS}={fds:?} is not a count of descriptors; the service manager or parent set a corrupt \
             environment"
        ))
    })?;
    if n > MAX_LISTEN_FDS {
        return Err(Error::env(format!(
            "{VAR_FDS}={n} is more than {MAX_LISTEN_FDS} descriptors; refusing a corrupt environment"
        )));
    }
    let names: Vec<String> = match listen_fdnames {
        None => vec![UNKNOWN_NAME.to_string(); n],
        Some(v) => {
            let v = utf8(VAR_NAMES, v)?;
            let names: Vec<String> = if v.is_empty() && n == 0 {
                Vec::new()
            } else {
                v.split(':')
                    .map(|s| if s.is_empty() { UNKNOWN_NAME } else { s }.to_string())
                    .collect()
            };
            if names.len() != n {
                return Err(Error::env(format!(
                    "{VAR_NAMES} names {} descriptors but {VAR_FDS}={n}; the two must agree (check \
                     FileDescriptorName= in the socket units)",
                    names.len()
                )));
            }
            if let Some(bad) = names.iter().find(|s| !name_is_valid(s)) {
                return Err(Error::env(format!(
                    "{VAR_NAMES} holds an invalid name {bad:?} (names are 1 to 255 printable ASCII characters)"
                )));
            }
            names
        }
    };
    Ok(Some(names))
}

/// Takes ownership of descriptors 3.. named by `names`, checking that each is open and making it
/// close-on-exec so that nothing the application spawns inherits it by accident.
pub(crate) fn adopt(
    names: Vec<String>,
    inherited: &mut sys::Inherited,
) -> Result<Vec<(String, OwnedFd)>> {
    let mut out = Vec::with_capacity(names.len());
    for (i, name) in names.into_iter().enumerate() {
        let raw = LISTEN_FDS_START + i as RawFd;
        let fd = inherited.adopt(raw).map_err(|e| {
            Error::with_io(
                crate::ErrorKind::Environment,
                format!(
                    "{VAR_FDS} promises descriptor {raw} ({name}) but it is not open; was the environment \
                     copied to a process that did not inherit the descriptors?"
                ),
                e,
            )
        })?;
        sys::set_cloexec(fd.as_fd(), true)
            .map_err(|e| Error::io(format!("cannot set close-on-exec on inherited fd {raw}"), e))?;
        // A named descriptor may be anything the fd store holds for this service (a memfd of state, say); an
        // unnamed one can only be meant as a socket. Anything else is closed here, never handed on.
        if name == UNKNOWN_NAME && !matches!(sys::socket_info(fd.as_fd()), Ok(Some(_))) {
            tracing::warn!(
                fd = raw,
                what = %crate::listen::describe(fd.as_fd()),
                "{VAR_FDS} passed descriptor {raw} without a name ({VAR_NAMES} unset) and it is not a socket: \
                 closed, not handed on (name it in {VAR_NAMES} if it is meant for this service)"
            );
            continue;
        }
        tracing::debug!(fd = raw, name = %name, "adopted inherited descriptor");
        out.push((name, fd));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> Result<Option<Vec<String>>> {
        parse(
            pid.map(OsStr::new),
            fds.map(OsStr::new),
            names.map(OsStr::new),
            100,
        )
    }

    #[test]
    fn absent_or_for_another_process_means_none() {
        assert!(p(None, None, None).unwrap().is_none());
        assert!(p(None, Some("2"), None).unwrap().is_none());
        assert!(p(Some("99"), Some("2"), Some("a:b")).unwrap().is_none());
    }

    #[test]
    fn names_come_in_order_and_default_to_unknown() {
        assert_eq!(
            p(Some("100"), Some("2"), Some("http:admin"))
                .unwrap()
                .unwrap(),
            ["http", "admin"]
        );
        assert_eq!(
            p(Some("100"), Some("2"), None).unwrap().unwrap(),
            ["unknown", "unknown"]
        );
        assert_eq!(
            p(Some("100"), Some("2"), Some(":b")).unwrap().unwrap(),
            ["unknown", "b"]
        );
        assert_eq!(
            p(Some("100"), Some("0"), Some("")).unwrap().unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            p(Some(" 100 "), Some(" 1 "), Some("x")).unwrap().unwrap(),
            ["x"]
        );
    }

    #[test]
    fn corrupt_values_are_environment_errors() {
        for (pid, fds, names, needle) in [
            (Some("abc"), Some("1"), None, "not a process id"),
            (Some("100"), Some("-1"), None, "not a count"),
            (Some("100"), Some("x"), None, "not a count"),
            (Some("100"), Some("99999999"), None, "more than"),
            (Some("100"), Some("2"), Some("a"), "must agree"),
            (Some("100"), Some("1"), Some("a:b"), "must agree"),
            (Some("100"), Some("1"), Some("bad\tname"), "invalid name"),
        ] {
            let e = p(pid, fds, names).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Environment);
            assert!(e.to_string().contains(needle), "{e} lacks {needle}");
        }
        let long = "n".repeat(256);
        assert!(p(Some("100"), Some("1"), Some(&long)).is_err());
    }

    #[test]
    fn non_utf8_is_an_environment_error() {
        use std::os::unix::ffi::OsStrExt;
        let bad = OsStr::from_bytes(b"\xff");
        let e = parse(Some(OsStr::new("100")), Some(bad), None, 100).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Environment);
    }

    #[test]
    fn name_rules_match_systemd() {
        assert!(name_is_valid("http.socket"));
        assert!(name_is_valid("a b"));
        assert!(!name_is_valid(""));
        assert!(!name_is_valid("a:b"));
        assert!(!name_is_valid("é"));
        assert!(!name_is_valid(&"x".repeat(256)));
        assert!(name_is_valid(&"x".repeat(255)));
    }
}

#[cfg(test)]
mod random_inputs {
    use super::*;

    #[test]
    fn random_listen_variables_never_panic() {
        let mut rng = crate::fuzz::Rng::new(2);
        let pieces = [
            "1",
            "2",
            "42",
            ":",
            "http",
            "-",
            " ",
            "\u{0}",
            "99999999999",
            "a:b",
            "3",
        ];
        for _ in 0..crate::fuzz::iterations(50_000) {
            let pid = rng.text(&pieces, 12);
            let fds = rng.text(&pieces, 12);
            let names = rng.text(&pieces, 40);
            let r = parse(
                Some(OsStr::new(&pid)),
                Some(OsStr::new(&fds)),
                Some(OsStr::new(&names)),
                42,
            );
            if let Ok(Some(names)) = r {
                assert!(names.len() <= super::MAX_LISTEN_FDS, "{fds:?}");
                assert!(names.iter().all(|n| name_is_valid(n)), "{names:?}");
            }
        }
    }
}

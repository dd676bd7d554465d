//! Named sockets this process holds for handover: inherited ones (claimed or not) and fresh binds.
//!
//! The registry keeps its own copy of every socket, so that an upgrade can pass it on whatever the
//! application did with the copy it took. Takes are once per name: a second take yields `None`.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::listen::{describe, SocketKind};
use crate::sys;

#[derive(Debug)]
struct Entry {
    name: String,
    /// Shared with an upgrade in flight, which starts the new process from it without the registry's lock.
    fd: Arc<OwnedFd>,
    claimed: bool,
}

/// Name → socket, in the order they will be passed on (fd 3, 4, ...).
#[derive(Debug, Default)]
pub(crate) struct Registry {
    entries: Vec<Entry>,
}

impl Registry {
    pub(crate) fn with_inherited(inherited: Vec<(String, OwnedFd)>) -> Registry {
        Registry {
            entries: inherited
                .into_iter()
                .map(|(name, fd)| Entry {
                    name,
                    fd: Arc::new(fd),
                    claimed: false,
                })
                .collect(),
        }
    }

    fn index_of(&self, name: &str) -> Result<Option<usize>> {
        let mut found = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.name == name);
        let first = found.next().map(|(i, _)| i);
        let more = found.count();
        if more > 0 {
            return Err(Error::new(
                ErrorKind::Environment,
                format!(
                    "{} inherited sockets are named {name:?}; give each its own FileDescriptorName= in the \
                     socket unit, or take them by index",
                    more + 1
                ),
            ));
        }
        Ok(first)
    }

    /// Puts `fd` in place of the socket named `name` (same position, claimed), or adds it. For a socket
    /// re-created in this process (a control socket whose file was deleted).
    pub(crate) fn replace(&mut self, name: &str, fd: OwnedFd) {
        match self.entries.iter_mut().find(|e| e.name == name) {
            Some(e) => {
                e.fd = Arc::new(fd);
                e.claimed = true;
            }
            None => self.add_bound(name, fd),
        }
    }

    /// Whether any entry has this name.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name)
    }

    /// Takes the socket named `name` if there is one, checking it is of `kind`.
    pub(crate) fn take(&mut self, name: &str, kind: SocketKind) -> Result<Option<OwnedFd>> {
        match self.index_of(name)? {
            None => Ok(None),
            Some(i) => self.take_index(i, kind),
        }
    }

    /// Takes the `index`th inherited socket (0 is fd 3), checking it is of `kind`.
    pub(crate) fn take_index(&mut self, index: usize, kind: SocketKind) -> Result<Option<OwnedFd>> {
        let Some(e) = self.entries.get_mut(index) else {
            return Ok(None);
        };
        if e.claimed {
            return Ok(None);
        }
        let ok = match sys::socket_info(e.fd.as_fd()) {
            Ok(Some(info)) => kind.matches(&info),
            _ => false,
        };
        if !ok {
            return Err(Error::new(
                ErrorKind::WrongSocketKind,
                format!(
                    "inherited socket {:?} is {}, not {kind}; fix the socket unit or the name asked for",
                    e.name,
                    describe(e.fd.as_fd())
                ),
            ));
        }
        let copy = e.fd.try_clone().map_err(|err| {
            Error::io(
                format!("cannot duplicate inherited socket {:?}", e.name),
                err,
            )
        })?;
        e.claimed = true;
        tracing::debug!(name = %e.name, "took inherited socket");
        Ok(Some(copy))
    }

    /// Records a socket bound by this process (the registry keeps `fd` for handover).
    pub(crate) fn add_bound(&mut self, name: &str, fd: OwnedFd) {
        self.entries.push(Entry {
            name: name.to_string(),
            fd: Arc::new(fd),
            claimed: true,
        });
    }

    /// Every socket to pass on, claimed or not, in order.
    #[cfg(test)]
    pub(crate) fn handover_set(&self) -> Vec<(&str, std::os::fd::BorrowedFd<'_>)> {
        self.entries
            .iter()
            .map(|e| (e.name.as_str(), e.fd.as_fd()))
            .collect()
    }

    /// Every socket to pass on, in order, shared (not duplicated: a process near its descriptor limit can
    /// still upgrade): the new process is started from these without the registry's lock held.
    pub(crate) fn handover_shared(&self) -> Vec<(String, Arc<OwnedFd>)> {
        self.entries
            .iter()
            .map(|e| (e.name.clone(), e.fd.clone()))
            .collect()
    }

    /// The names of the sockets taken (or bound) in this process, and of those inherited and never taken.
    pub(crate) fn names(&self) -> (Vec<String>, Vec<String>) {
        let (taken, unclaimed): (Vec<&Entry>, Vec<&Entry>) =
            self.entries.iter().partition(|e| e.claimed);
        let name = |e: &&Entry| e.name.clone();
        (
            taken.iter().map(name).collect(),
            unclaimed.iter().map(name).collect(),
        )
    }

    /// Names of inherited sockets nobody took (they are passed on all the same).
    pub(crate) fn unclaimed(&self) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|e| !e.claimed)
            .map(|e| e.name.as_str())
            .collect()
    }

    /// Closes this process's copies after a handover.
    pub(crate) fn close_all(&mut self) -> usize {
        let n = self.entries.len();
        self.entries.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn tcp() -> OwnedFd {
        OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
    }
    fn udp() -> OwnedFd {
        OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
    }

    #[test]
    fn take_once_and_wrong_kind_leaves_the_fd() {
        let mut r = Registry::with_inherited(vec![("http".into(), tcp()), ("dns".into(), udp())]);
        let e = r.take("dns", SocketKind::TcpListener).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WrongSocketKind);
        assert!(
            e.to_string().contains("UDP") || e.to_string().contains("datagram"),
            "{e}"
        );
        // Still there, and takeable as the right kind.
        assert!(r.take("dns", SocketKind::Udp).unwrap().is_some());
        let first = r.take("http", SocketKind::TcpListener).unwrap().unwrap();
        assert!(r.take("http", SocketKind::TcpListener).unwrap().is_none());
        assert!(r.take("absent", SocketKind::TcpListener).unwrap().is_none());
        // The registry keeps its own copy for handover.
        let set = r.handover_set();
        assert_eq!(set.len(), 2);
        assert_ne!(set[0].1.as_raw_fd(), first.as_raw_fd());
        assert!(r.unclaimed().is_empty());
    }

    #[test]
    fn duplicate_names_must_be_taken_by_index() {
        let mut r =
            Registry::with_inherited(vec![("unknown".into(), tcp()), ("unknown".into(), tcp())]);
        let e = r.take("unknown", SocketKind::TcpListener).unwrap_err();
        assert!(e.to_string().contains("2 inherited sockets"), "{e}");
        assert!(r.take_index(1, SocketKind::TcpListener).unwrap().is_some());
        assert!(r.take_index(1, SocketKind::TcpListener).unwrap().is_none());
        assert!(r.take_index(5, SocketKind::TcpListener).unwrap().is_none());
        assert_eq!(r.unclaimed(), ["unknown"]);
    }

    #[test]
    fn a_non_socket_is_refused() {
        let (rd, _wr) = sys::pipe().unwrap();
        let mut r = Registry::with_inherited(vec![("x".into(), rd)]);
        let e = r.take("x", SocketKind::UnixListener).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
    }
}

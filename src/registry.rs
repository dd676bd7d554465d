//! Named sockets this process holds for handover: inherited ones (claimed or not) and fresh binds.
//!
//! The registry keeps its own copy of every socket, so that an upgrade can pass it on whatever the
//! application did with the copy it took. Takes are once per name: a second take yields `None`.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

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

/// Name → socket, in the order they will be passed on (fd 3, 4, ...). Pure bookkeeping, no system call:
/// [`Sockets`] holds it behind its lock and makes the calls outside.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    entries: Vec<Entry>,
    /// Names being bound right now (outside the lock): taken, for anyone else.
    binding: Vec<String>,
}

/// A socket claimed under the lock, to be checked and copied outside it.
#[derive(Debug)]
struct Claimed {
    index: usize,
    name: String,
    fd: Arc<OwnedFd>,
}

impl Registry {
    pub(crate) fn with_inherited(inherited: Vec<(String, OwnedFd)>) -> Registry {
        Registry {
            binding: Vec::new(),
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

    /// Puts `fd` in place of the socket named `name` (same position, claimed), or adds it; returns the one it
    /// replaced, for the caller to close outside the lock. For a socket re-created in this process (a control
    /// socket whose file was deleted).
    fn replace(&mut self, name: &str, fd: OwnedFd) -> Option<Arc<OwnedFd>> {
        match self.entries.iter_mut().find(|e| e.name == name) {
            Some(e) => {
                e.claimed = true;
                Some(std::mem::replace(&mut e.fd, Arc::new(fd)))
            }
            None => {
                self.add_bound(name, fd);
                None
            }
        }
    }

    /// Whether any entry has this name.
    fn contains(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name)
    }

    /// Claims the socket named `name` if there is one and nobody took it: the caller checks and copies it
    /// outside the lock, and gives it back with [`unclaim`](Self::unclaim) if it is not what it asked for.
    fn claim(&mut self, name: &str) -> Result<Option<Claimed>> {
        match self.index_of(name)? {
            None => Ok(None),
            Some(i) => Ok(self.claim_index(i)),
        }
    }

    /// Claims the `index`th inherited socket (0 is fd 3) if nobody took it.
    fn claim_index(&mut self, index: usize) -> Option<Claimed> {
        let e = self.entries.get_mut(index)?;
        if e.claimed {
            return None;
        }
        e.claimed = true;
        Some(Claimed {
            index,
            name: e.name.clone(),
            fd: e.fd.clone(),
        })
    }

    /// Gives back a claim whose socket was not of the kind asked for: it stays, takeable as what it is.
    fn unclaim(&mut self, index: usize) {
        if let Some(e) = self.entries.get_mut(index) {
            e.claimed = false;
        }
    }

    /// Reserves `name` for a bind about to happen outside the lock.
    fn reserve(&mut self, name: &str) -> Result<()> {
        if self.contains(name) || self.binding.iter().any(|n| n == name) {
            return Err(Error::new(
                ErrorKind::AlreadyTaken,
                format!("socket {name:?} was already taken in this process; take each name once"),
            ));
        }
        self.binding.push(name.to_string());
        Ok(())
    }

    /// Ends a reservation (the bind failed, or its socket was added).
    fn unreserve(&mut self, name: &str) {
        self.binding.retain(|n| n != name);
    }

    /// Records a socket bound by this process (the registry keeps `fd` for handover).
    fn add_bound(&mut self, name: &str, fd: OwnedFd) {
        self.entries.push(Entry {
            name: name.to_string(),
            fd: Arc::new(fd),
            claimed: true,
        });
    }

    /// Every socket to pass on, claimed or not, in order.
    #[cfg(test)]
    fn handover_set(&self) -> Vec<(&str, std::os::fd::BorrowedFd<'_>)> {
        self.entries
            .iter()
            .map(|e| (e.name.as_str(), e.fd.as_fd()))
            .collect()
    }

    /// Every socket to pass on, in order, shared (not duplicated: a process near its descriptor limit can
    /// still upgrade): the new process is started from these without the registry's lock held.
    fn handover_shared(&self) -> Vec<(String, Arc<OwnedFd>)> {
        self.entries
            .iter()
            .map(|e| (e.name.clone(), e.fd.clone()))
            .collect()
    }

    /// The names of the sockets taken (or bound) in this process, and of those inherited and never taken.
    fn names(&self) -> (Vec<String>, Vec<String>) {
        let (taken, unclaimed): (Vec<&Entry>, Vec<&Entry>) =
            self.entries.iter().partition(|e| e.claimed);
        let name = |e: &&Entry| e.name.clone();
        (
            taken.iter().map(name).collect(),
            unclaimed.iter().map(name).collect(),
        )
    }

    /// Names of inherited sockets nobody took (they are passed on all the same).
    fn unclaimed(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| !e.claimed)
            .map(|e| e.name.clone())
            .collect()
    }
}

/// Checks outside the lock that a claimed socket is of `kind`, and copies it for the caller (the registry
/// keeps its own).
fn copy_checked(c: &Claimed, kind: SocketKind) -> Result<OwnedFd> {
    let ok = match sys::socket_info(c.fd.as_fd()) {
        Ok(Some(info)) => kind.matches(&info),
        _ => false,
    };
    if !ok {
        return Err(Error::new(
            ErrorKind::WrongSocketKind,
            format!(
                "inherited socket {:?} is {}, not {kind}; fix the socket unit or the name asked for",
                c.name,
                describe(c.fd.as_fd())
            ),
        ));
    }
    c.fd.try_clone().map_err(|err| {
        Error::io(
            format!("cannot duplicate inherited socket {:?}", c.name),
            err,
        )
    })
}

/// The registry behind its lock. Every system call (a socket's type check, `dup`, the bind and the
/// application's `configure` hook, `close`) is made outside the lock: the decision under it, the work after
/// it, the outcome recorded under it again. So the lock is never held across I/O, and a hook may call back
/// into the upgrader.
#[derive(Debug, Default)]
pub(crate) struct Sockets {
    registry: Mutex<Registry>,
}

impl Sockets {
    pub(crate) fn new(registry: Registry) -> Sockets {
        Sockets {
            registry: Mutex::new(registry),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the inherited socket named `name` as `kind`, if there is one and nobody took it.
    pub(crate) fn take(&self, name: &str, kind: SocketKind) -> Result<Option<OwnedFd>> {
        let claimed = self.lock().claim(name)?;
        self.checked(claimed, kind)
    }

    /// Takes the `index`th inherited socket (0 is fd 3) as `kind`, if nobody took it.
    pub(crate) fn take_index(&self, index: usize, kind: SocketKind) -> Result<Option<OwnedFd>> {
        let claimed = self.lock().claim_index(index);
        self.checked(claimed, kind)
    }

    fn checked(&self, claimed: Option<Claimed>, kind: SocketKind) -> Result<Option<OwnedFd>> {
        let Some(c) = claimed else { return Ok(None) };
        match copy_checked(&c, kind) {
            Ok(fd) => {
                tracing::debug!(name = %c.name, "took inherited socket");
                Ok(Some(fd))
            }
            Err(e) => {
                self.lock().unclaim(c.index);
                Err(e)
            }
        }
    }

    /// Binds a fresh socket named `name` with `bind` (outside the lock: it may run the application's hook) and
    /// keeps a copy; `Err` with [`ErrorKind::AlreadyTaken`] if the name exists or is being bound. The bind's
    /// own error comes back as the inner `io::Error`.
    pub(crate) fn bind(
        &self,
        name: &str,
        bind: impl FnOnce() -> std::io::Result<OwnedFd>,
    ) -> Result<std::io::Result<OwnedFd>> {
        self.lock().reserve(name)?;
        let bound = bind().and_then(|fd| Ok((fd.try_clone()?, fd)));
        let mut reg = self.lock();
        reg.unreserve(name);
        Ok(bound.map(|(keep, fd)| {
            reg.add_bound(name, keep);
            fd
        }))
    }

    /// Keeps `fd` under `name` in place of whatever was there (closed outside the lock).
    pub(crate) fn replace(&self, name: &str, fd: OwnedFd) {
        let old = self.lock().replace(name, fd);
        drop(old);
    }

    /// Every socket to pass on, in order, shared (see [`Registry`]).
    pub(crate) fn handover_shared(&self) -> Vec<(String, Arc<OwnedFd>)> {
        self.lock().handover_shared()
    }

    /// The names taken or bound, and those inherited and never taken.
    pub(crate) fn names(&self) -> (Vec<String>, Vec<String>) {
        self.lock().names()
    }

    /// Names of inherited sockets nobody took.
    pub(crate) fn unclaimed(&self) -> Vec<String> {
        self.lock().unclaimed()
    }

    /// Closes this process's copies after a handover (outside the lock); how many there were.
    pub(crate) fn close_all(&self) -> usize {
        let entries = std::mem::take(&mut self.lock().entries);
        let n = entries.len();
        drop(entries);
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
        let r = Sockets::new(Registry::with_inherited(vec![
            ("http".into(), tcp()),
            ("dns".into(), udp()),
        ]));
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
        let reg = r.lock();
        let set = reg.handover_set();
        assert_eq!(set.len(), 2);
        assert_ne!(set[0].1.as_raw_fd(), first.as_raw_fd());
        assert!(reg.unclaimed().is_empty());
    }

    #[test]
    fn duplicate_names_must_be_taken_by_index() {
        let r = Sockets::new(Registry::with_inherited(vec![
            ("unknown".into(), tcp()),
            ("unknown".into(), tcp()),
        ]));
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
        let r = Sockets::new(Registry::with_inherited(vec![("x".into(), rd)]));
        let e = r.take("x", SocketKind::UnixListener).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
    }
}

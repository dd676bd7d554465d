//! The control server's side in the upgrader: binding (or adopting) the control socket, and what a control
//! request may do to this process. The server itself ([`crate::control`]) sees only a [`Served`].

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{lock, Upgrader};
use crate::control::{self, Actions, Config, Reply, Served, REGISTRY_NAME};
use crate::error::{Error, ErrorKind, Result};
use crate::handover::takeover;
use crate::lifecycle::StopCause;
use crate::listen::{self, BindOptions, SocketKind};
use crate::sys;

impl Actions for Upgrader {
    fn run_upgrade(&self) -> Reply {
        match self.upgrade() {
            Ok(r) => Reply::Ok(format!(
                "upgraded to pid {} in {} ms (its own initialisation {} ms, handover overhead {} ms)",
                r.child_pid,
                r.took.as_millis(),
                r.child_init.as_millis(),
                r.overhead().as_millis()
            )),
            Err(e) => self.verdict_reply(&e),
        }
    }

    fn run_takeover(&self, conn: UnixStream, claimed_pid: u32) {
        let refuse = |why: String| {
            let _ = (&conn).write_all(format!("{}\n", Reply::Failed(why)).as_bytes());
        };
        let peer = match sys::peer(conn.as_fd()) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "takeover: cannot read the peer's credentials; refused");
                return refuse(format!("cannot read this process's credentials: {e}"));
            }
        };
        if let Some(why) = takeover::refuse_peer(&peer) {
            tracing::warn!(uid = peer.uid, pid = peer.pid, "takeover refused: {why}");
            return refuse(why);
        }
        let taker = takeover::Taker::new(&peer, claimed_pid);
        match self.take_over_by(&conn, taker) {
            Ok(r) => tracing::info!(
                taker_pid = r.child_pid,
                took_ms = r.took.as_millis() as u64,
                "takeover: handed over"
            ),
            Err(e) => {
                tracing::warn!(taker_pid = taker.pid, error = %e, "takeover failed; this process serves on");
                // Read only if the taker still waits for its answer (refused before the sockets went).
                refuse(e.to_string());
            }
        }
    }

    fn stop(&self) {
        self.shutdown_by(StopCause::ControlSocket);
    }

    fn standby(&self) -> Option<u32> {
        // On probation the old process stops with this one (told before this one can exit); not the one this
        // process took over from: that one takes the service back instead.
        match self.inner.origin {
            super::Origin::Takeover => None,
            _ => self.predecessor_pid(),
        }
    }

    fn config(&self) -> Config {
        let (taken, unclaimed) = self.inner.registry.names();
        Config {
            drain_timeout: self.inner.drain_timeout,
            ready_timeout: self.inner.ready_timeout,
            probation: self.inner.successor_probation,
            fd_store: self.inner.fd_store,
            take_over: self.inner.take_over,
            taken,
            unclaimed,
        }
    }
}

impl Upgrader {
    /// Serves the control socket from now until this process is finishing.
    pub(super) fn serve_control(&self, listener: UnixListener) {
        let served = Served {
            finishing: self.finishing_handle(),
            tracker: self.inner.tracker.clone(),
            generation: self.inner.generation,
            origin: self.inner.origin.name(),
            verdict_wait: self.inner.ready_timeout + Duration::from_secs(30),
            own_probation_ends: self.inner.own_probation_ends.get().copied(),
            actions: Arc::new(self.clone()),
        };
        control::serve(served, listener);
    }

    /// Binds (or adopts) the control socket at `path`, mode 0600.
    ///
    /// The mode is set on the socket before `bind` creates the file, never through the path (a symlink planted
    /// there cannot redirect it). An inherited socket whose file is gone (a tmp cleaner, an operator) is bound
    /// anew at the same path, since nobody could reach it; a path taken over by something that is not a socket
    /// leaves the service without a control socket, with a warning, rather than fail the upgrade.
    pub(super) fn control_listener(&self, path: &Path) -> Result<Option<UnixListener>> {
        use std::os::unix::fs::FileTypeExt;
        let private = BindOptions::new().configure(|fd| sys::set_socket_mode(fd, 0o600));
        let Some(inherited) = self.take(REGISTRY_NAME, SocketKind::UnixListener)? else {
            return self
                .listen_unix_with(REGISTRY_NAME, path, &private)
                .map(Some);
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => Ok(Some(UnixListener::from(inherited))),
            Ok(_) => {
                tracing::warn!(
                    path = %path.display(),
                    "the control socket's path is no longer a socket (replaced by something else); no control \
                     socket until it is removed and the service restarted or upgraded"
                );
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                drop(inherited);
                let fd = self
                    .rebind(REGISTRY_NAME, || {
                        listen::bind_unix(path, listen::UnixType::Stream, true, &private)
                    })
                    .map_err(|e| {
                        Error::with_io(
                            ErrorKind::Bind,
                            format!(
                                "the control socket {} was deleted and cannot be bound again",
                                path.display()
                            ),
                            e,
                        )
                    })?;
                tracing::warn!(path = %path.display(), "the control socket's file was deleted; bound it again");
                Ok(Some(UnixListener::from(fd)))
            }
            Err(e) => Err(Error::io(
                format!("cannot check the control socket {}", path.display()),
                e,
            )),
        }
    }
}

/// Keeps the control listener until `ready()` serves it.
pub(super) fn keep(upgrader: &Upgrader, l: Option<UnixListener>) {
    *lock(&upgrader.inner.control) = l;
}

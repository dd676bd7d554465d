//! What [`serve`](super::serve) accepts connections from.

use std::future::Future;
use std::io;
use std::os::fd::AsFd;

use ::tokio::io::{AsyncRead, AsyncWrite};

use crate::moving::ArrivedStream;
use crate::tokio::{TcpIncoming, UnixIncoming};
use crate::Upgrader;

/// A listener [`serve`](super::serve) can take: a listener from [`Upgrader::listen_tcp`] or
/// [`Upgrader::listen_unix`], or the same already wrapped in [`TcpIncoming`] / [`UnixIncoming`].
///
/// Sealed: the accept loop must end when this process is finishing, which only exuvia's own types do.
pub trait Listener: sealed::Sealed + Sized {
    #[doc(hidden)]
    type Incoming: sealed::Accept;
    #[doc(hidden)]
    fn into_incoming(self, upgrader: &Upgrader) -> io::Result<Self::Incoming>;
}

pub(crate) mod sealed {
    use super::*;

    pub trait Sealed {}

    /// An accept loop that ends (`None`) once this process is finishing.
    pub trait Accept: Send + 'static {
        type Stream: AsyncRead + AsyncWrite + AsFd + crate::moving::Movable + Unpin + Send + 'static;
        /// The client's address, as axum's `ConnectInfo` carries it.
        type Peer: Clone + Send + Sync + 'static;
        fn next(
            &mut self,
        ) -> impl Future<Output = Option<io::Result<(Self::Stream, Self::Peer)>>> + Send;
        /// A connection the old process moved here, as this listener's stream (if it is of its kind).
        fn arrived(stream: ArrivedStream) -> io::Result<(Self::Stream, Self::Peer)>;
    }
}

impl sealed::Sealed for TcpIncoming {}
impl Listener for TcpIncoming {
    type Incoming = TcpIncoming;
    fn into_incoming(self, _: &Upgrader) -> io::Result<TcpIncoming> {
        Ok(self)
    }
}
impl sealed::Accept for TcpIncoming {
    type Stream = ::tokio::net::TcpStream;
    type Peer = std::net::SocketAddr;
    async fn next(&mut self) -> Option<io::Result<(Self::Stream, Self::Peer)>> {
        let accepted = self.accept().await?;
        Some(accepted.inspect(|(stream, _)| {
            // Requests and responses are small and interactive: do not let Nagle hold a response's tail
            // back for the client's delayed acknowledgement.
            let _ = stream.set_nodelay(true);
        }))
    }
    fn arrived(stream: ArrivedStream) -> io::Result<(Self::Stream, Self::Peer)> {
        let ArrivedStream::Tcp(stream) = stream else {
            return Err(io::Error::other("a Unix connection, on a TCP listener"));
        };
        let stream = ::tokio::net::TcpStream::from_std(stream)?;
        let peer = stream.peer_addr()?;
        Ok((stream, peer))
    }
}

impl sealed::Sealed for std::net::TcpListener {}
impl Listener for std::net::TcpListener {
    type Incoming = TcpIncoming;
    fn into_incoming(self, upgrader: &Upgrader) -> io::Result<TcpIncoming> {
        TcpIncoming::new(upgrader, self)
    }
}

impl sealed::Sealed for UnixIncoming {}
impl Listener for UnixIncoming {
    type Incoming = UnixIncoming;
    fn into_incoming(self, _: &Upgrader) -> io::Result<UnixIncoming> {
        Ok(self)
    }
}
impl sealed::Accept for UnixIncoming {
    type Stream = ::tokio::net::UnixStream;
    type Peer = ::tokio::net::unix::SocketAddr;
    async fn next(&mut self) -> Option<io::Result<(Self::Stream, Self::Peer)>> {
        self.accept().await
    }
    fn arrived(stream: ArrivedStream) -> io::Result<(Self::Stream, Self::Peer)> {
        let ArrivedStream::Unix(stream) = stream else {
            return Err(io::Error::other("a TCP connection, on a Unix listener"));
        };
        let stream = ::tokio::net::UnixStream::from_std(stream)?;
        let peer = stream.peer_addr()?;
        Ok((stream, peer))
    }
}

impl sealed::Sealed for std::os::unix::net::UnixListener {}
impl Listener for std::os::unix::net::UnixListener {
    type Incoming = UnixIncoming;
    fn into_incoming(self, upgrader: &Upgrader) -> io::Result<UnixIncoming> {
        UnixIncoming::new(upgrader, self)
    }
}

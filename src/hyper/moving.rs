//! HTTP/1 connections that move to the new process (see [`crate::moving`]): how a connection is told apart
//! (HTTP/1 or HTTP/2), served so that it can be taken back from hyper between two requests, and moved.
//!
//! A finishing process whose successor takes connections gives each HTTP/1 keep-alive connection to it
//! after its current response (at once when idle): hyper's graceful shutdown ends the connection after that
//! response without a `Connection: close` (the response says nothing of the kind, see
//! [`HttpService`](super::service::HttpService)), the socket is not shut down (this wrapper ignores hyper's
//! shutdown while moving), and hyper hands back the stream and the bytes it had read past the response (a
//! pipelined next request), which travel with it.

use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::hyper::body::Bytes;
use ::tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::connection::{Connections, Protocol, Tracked};
use crate::drain::ConnectionGuard;

/// A connection's stream as the HTTP layer serves and moves it (a listener's `Accept::Stream`), named once.
pub(crate) trait ConnectionIo:
    AsyncRead + AsyncWrite + AsFd + crate::moving::Movable + Unpin + Send + 'static
{
}

impl<T> ConnectionIo for T where
    T: AsyncRead + AsyncWrite + AsFd + crate::moving::Movable + Unpin + Send + 'static
{
}

/// The state an HTTP/1 connection moves with: which protocol, in which version of this layer's format.
pub(crate) const HTTP1_STATE: &[u8] = b"exuvia-http1/1";

/// The HTTP/2 connection preface: a connection that starts with it speaks HTTP/2 with prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Speaks {
    Http1,
    Http2,
}

/// Reads the first bytes of a connection until they tell HTTP/2's preface from anything else (HTTP/1), as
/// hyper-util's `auto` builder does. Returns the protocol and the bytes read, which hyper must read first.
/// `None` when the client closed first.
pub(crate) async fn sniff<I: AsyncRead + Unpin>(
    io: &mut I,
) -> io::Result<Option<(Speaks, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(H2_PREFACE.len());
    loop {
        let mut chunk = [0u8; 24];
        let want = H2_PREFACE.len() - buf.len();
        let n = std::future::poll_fn(|cx| {
            let mut read = ReadBuf::new(&mut chunk[..want]);
            Pin::new(&mut *io)
                .poll_read(cx, &mut read)
                .map_ok(|()| read.filled().len())
        })
        .await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf[..] != H2_PREFACE[..buf.len()] {
            return Ok(Some((Speaks::Http1, buf)));
        }
        if buf.len() == H2_PREFACE.len() {
            return Ok(Some((Speaks::Http2, buf)));
        }
    }
}

/// A connection as hyper reads and writes it: bytes already read (by [`sniff`], or by the old process
/// before the connection moved here) come first; a shutdown from hyper is ignored while the connection is
/// moving (the socket goes on in the new process).
#[derive(Debug)]
pub(crate) struct Served<I: AsFd> {
    first: Bytes,
    io: Tracked<I>,
    protocol: Arc<Protocol>,
}

impl<I: AsFd> Served<I> {
    pub(crate) fn new(first: impl Into<Bytes>, io: Tracked<I>, protocol: Arc<Protocol>) -> Self {
        Served {
            first: first.into(),
            io,
            protocol,
        }
    }

    /// What puts the connection back in service if it does not move: the server's list and its protocol.
    pub(crate) fn rejoin(&self) -> (Arc<Connections>, Arc<Protocol>) {
        (self.io.connections(), self.protocol.clone())
    }

    /// The stream, its drain guard, and every byte read from it and not consumed: hyper's `read_buf` (read
    /// first) then what hyper had not read yet of the bytes given first.
    pub(crate) fn into_move(self, read_buf: Bytes) -> (I, ConnectionGuard, Vec<u8>) {
        let mut unread = read_buf.to_vec();
        unread.extend_from_slice(&self.first);
        let (stream, guard) = self.io.into_parts();
        (stream, guard, unread)
    }
}

impl<I: AsFd + AsyncRead + Unpin> AsyncRead for Served<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.first.is_empty() {
            let n = me.first.len().min(buf.remaining());
            buf.put_slice(&me.first.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.io).poll_read(cx, buf)
    }
}

impl<I: AsFd + AsyncWrite + Unpin> AsyncWrite for Served<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.protocol.moving() {
            // The connection moves on: no FIN. Everything written is flushed first.
            return Pin::new(&mut me.io).poll_flush(cx);
        }
        Pin::new(&mut me.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[::tokio::test]
    async fn the_first_bytes_tell_http2_from_http1() {
        for (input, want) in [
            (H2_PREFACE, Some(Speaks::Http2)),
            (&b"GET / HTTP/1.1\r\n\r\n"[..], Some(Speaks::Http1)),
            (&b"PRI * HTTP/1.1\r\n"[..], Some(Speaks::Http1)),
            (&b"P"[..], None),
            (&b""[..], None),
        ] {
            let (mut client, mut server) = ::tokio::io::duplex(64);
            ::tokio::io::AsyncWriteExt::write_all(&mut client, input)
                .await
                .unwrap();
            drop(client);
            let got = sniff(&mut server).await.unwrap();
            assert_eq!(got.as_ref().map(|(s, _)| *s), want, "{input:?}");
            if let Some((_, bytes)) = got {
                // What was read is given back whole, and nothing past the decision is read.
                assert!(input.starts_with(&bytes), "{input:?}");
                assert!(bytes.len() <= H2_PREFACE.len());
            }
        }
    }
}

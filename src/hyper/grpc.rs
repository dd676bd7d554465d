//! gRPC responses still streaming at the end of the grace: ended with `UNAVAILABLE`, between two messages.
//!
//! gRPC (over HTTP/2) ends a call with trailers: `grpc-status` and `grpc-message`. A server that is going away
//! answers `UNAVAILABLE` (14), the status the gRPC spec gives "the service is currently unavailable", which
//! clients treat as "try again, elsewhere": the call is over, cleanly, and the client re-opens it on a new
//! connection, which the new process accepts. Ending the response any other way (a reset stream, a closed
//! connection at the drain deadline) reaches the client as `Unknown`/`Internal` with a protocol error.
//!
//! The trailers go only between two messages: each message is framed (a flag byte, a 4-byte big-endian
//! length, the message), and the frames of the response are followed so that a message the service is in the
//! middle of sending is finished first.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use ::hyper::body::Buf;
use ::hyper::header::{HeaderValue, CONTENT_TYPE};
use ::hyper::HeaderMap;

use crate::{Finish, Upgrader};

/// `UNAVAILABLE`, the code of a server going away.
const UNAVAILABLE: &str = "14";
/// The status messages (percent-encoding is not needed: printable ASCII, no `%`), as the process is
/// replaced or stopped.
const REPLACED: &str = "server going away (replaced by a new process); retry on a new connection";
const STOPPING: &str = "server going away (stopping); retry on a new connection";

/// Whether a response is a gRPC call's (its content type is `application/grpc` or `application/grpc+...`).
pub(crate) fn is_grpc<B>(response: &::hyper::Response<B>) -> bool {
    // Case-insensitively, without allocating: on the path of every HTTP/2 response.
    const GRPC: &[u8] = b"application/grpc";
    response.headers().get(CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= GRPC.len()
            && v[..GRPC.len()].eq_ignore_ascii_case(GRPC)
            && matches!(v.get(GRPC.len()), None | Some(b'+' | b';'))
    })
}

/// One gRPC response's end at the grace: when it is due, and where the response stands in its framing.
pub(crate) struct GrpcGrace {
    upgrader: Upgrader,
    /// Made at the first pause of the response (a unary call's response never pauses: no allocation).
    due: Option<Pin<Box<dyn Future<Output = Finish> + Send>>>,
    framing: Framing,
    /// The trailers were sent: the response is over.
    ended: bool,
}

impl std::fmt::Debug for GrpcGrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcGrace")
            .field("framing", &self.framing)
            .field("ended", &self.ended)
            .finish()
    }
}

impl GrpcGrace {
    /// Due at [`Upgrader::grace_ended`].
    pub(crate) fn new(upgrader: Upgrader) -> GrpcGrace {
        GrpcGrace {
            upgrader,
            due: None,
            framing: Framing::default(),
            ended: false,
        }
    }

    /// Whether the trailers were sent.
    pub(crate) fn ended(&self) -> bool {
        self.ended
    }

    /// Follows the framing through a data frame the service sent.
    pub(crate) fn saw(&mut self, data: &impl Buf) {
        self.framing.saw(data);
    }

    /// With the service's response pending: the trailers, if the grace is over and the response stands
    /// between two messages. Registers for a wake-up at the end of the grace otherwise.
    pub(crate) fn poll_end(&mut self, cx: &mut Context<'_>) -> Option<HeaderMap> {
        if self.ended || !self.framing.between_messages() {
            return None;
        }
        let upgrader = &self.upgrader;
        let due = self.due.get_or_insert_with(|| {
            let upgrader = upgrader.clone();
            Box::pin(async move { upgrader.grace_ended().await })
        });
        match due.as_mut().poll(cx) {
            Poll::Ready(finish) => {
                self.ended = true;
                tracing::debug!("gRPC response ended with UNAVAILABLE at the end of the grace");
                Some(trailers(finish))
            }
            Poll::Pending => None,
        }
    }
}

fn trailers(finish: Finish) -> HeaderMap {
    let message = match finish {
        Finish::Stopped { .. } => STOPPING,
        _ => REPLACED,
    };
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static(UNAVAILABLE));
    t.insert("grpc-message", HeaderValue::from_static(message));
    t
}

/// Where a response stands in gRPC's length-prefixed framing.
#[derive(Debug, Default)]
struct Framing {
    /// The bytes of the current message's 5-byte prefix seen so far (0 between messages).
    prefix: [u8; 5],
    in_prefix: usize,
    /// Bytes of the current message still to come.
    left: u64,
    /// A data frame could not be read through (more chunks than looked at): the boundaries are unknown from
    /// here, and the response is never cut.
    lost: bool,
}

impl Framing {
    fn between_messages(&self) -> bool {
        !self.lost && self.in_prefix == 0 && self.left == 0
    }

    fn saw(&mut self, data: &impl Buf) {
        let mut slices = [std::io::IoSlice::new(&[]); 64];
        let n = data.chunks_vectored(&mut slices);
        let seen: usize = slices[..n].iter().map(|s| s.len()).sum();
        if seen != data.remaining() {
            self.lost = true;
            return;
        }
        for s in &slices[..n] {
            self.feed(s);
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let k = bytes
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                self.left -= k as u64;
                bytes = &bytes[k..];
                continue;
            }
            let k = bytes.len().min(5 - self.in_prefix);
            self.prefix[self.in_prefix..self.in_prefix + k].copy_from_slice(&bytes[..k]);
            self.in_prefix += k;
            bytes = &bytes[k..];
            if self.in_prefix == 5 {
                let len = [
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ];
                self.left = u64::from(u32::from_be_bytes(len));
                self.in_prefix = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(vec![7u8; len as usize]);
        m
    }

    #[test]
    fn framing_follows_messages_split_anywhere() {
        let mut all = message(3);
        all.extend(message(0));
        all.extend(message(300));
        // Every split of the stream into two data frames: between messages only at the boundaries.
        let boundaries = [0, 8, 13, all.len()];
        for cut in 0..=all.len() {
            let mut f = Framing::default();
            f.feed(&all[..cut]);
            assert_eq!(
                f.between_messages(),
                boundaries.contains(&cut),
                "cut at {cut}"
            );
            f.feed(&all[cut..]);
            assert!(f.between_messages());
        }
        // Byte by byte.
        let mut f = Framing::default();
        for (i, b) in all.iter().enumerate() {
            f.feed(std::slice::from_ref(b));
            assert_eq!(
                f.between_messages(),
                boundaries.contains(&(i + 1)),
                "byte {i}"
            );
        }
    }

    #[test]
    fn a_data_frame_read_through_its_chunks() {
        let mut f = Framing::default();
        let first = message(4);
        let (a, b) = first.split_at(2);
        f.saw(&Buf::chain(a, b));
        assert!(f.between_messages());
        f.saw(&&message(10)[..7]);
        assert!(!f.between_messages());
    }

    #[test]
    fn grpc_content_types() {
        let with = |v: &str| {
            ::hyper::Response::builder()
                .header(CONTENT_TYPE, v)
                .body(())
                .unwrap()
        };
        assert!(is_grpc(&with("application/grpc")));
        assert!(is_grpc(&with("application/grpc+proto")));
        assert!(is_grpc(&with("Application/GRPC")));
        assert!(is_grpc(&with("application/grpc; charset=utf-8")));
        assert!(!is_grpc(&with("application/grpc-web")));
        assert!(!is_grpc(&with("application/grp")));
        assert!(!is_grpc(&with("text/plain")));
        assert!(!is_grpc(&::hyper::Response::new(())));
    }
}

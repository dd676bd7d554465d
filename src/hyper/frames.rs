//! Where a WebSocket connection's messages end (RFC 6455, section 5.2), so that the WebSocket library reading
//! through [`WebSocketIo`](super::WebSocketIo) never holds a byte past the message it last returned.
//!
//! The library (tungstenite, say) reads in chunks of its own size and keeps what it read past a frame in a
//! buffer nobody can take back. This reader gives it at most the rest of the current frame per read, so that
//! once the library has returned a whole message everything it was given is consumed; whatever was read from
//! the socket past that point is still here, and travels with the connection as its unread bytes.
//!
//! No WebSocket crate offers this (they own their read buffer), and the part needed is small: the frame
//! header's length fields and two bits.

/// A frame header is at most 14 bytes: 2, then 2 or 8 of extended length, then 4 of masking key.
const MAX_HEADER: usize = 14;

/// The frame boundaries of one direction of a WebSocket connection (the client's frames, read by a server).
#[derive(Debug, Default)]
pub(crate) struct Frames {
    /// Bytes of the current frame (header included) not yet given to the reader; zero between frames.
    left: u64,
    /// A data message sent in fragments has begun and its last fragment has not been given out yet.
    fragmented: bool,
}

/// A frame header's facts this reader needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    /// Header and payload, in bytes.
    len: u64,
    /// The FIN bit: the last frame of its message.
    fin: bool,
    /// Control frames (close, ping, pong: opcodes 8 and up) may come between a message's fragments.
    control: bool,
}

impl Header {
    /// The header at the start of `bytes`, or `None` if `bytes` holds only part of it.
    fn parse(bytes: &[u8]) -> Option<Header> {
        let (&b0, rest) = bytes.split_first()?;
        let &b1 = rest.first()?;
        let masked = b1 & 0x80 != 0;
        let (extended, payload) = match b1 & 0x7f {
            126 => (
                2,
                u64::from(u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?)),
            ),
            127 => (8, u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?)),
            n => (0, u64::from(n)),
        };
        let header = 2 + extended + if masked { 4 } else { 0 };
        if bytes.len() < header {
            return None; // the masking key is still to come
        }
        Some(Header {
            len: (header as u64).saturating_add(payload),
            fin: b0 & 0x80 != 0,
            control: b0 & 0x08 != 0,
        })
    }
}

impl Frames {
    /// Between two messages: every frame given out is whole and no fragmented message is open. A library
    /// that has returned its last message then holds nothing of the connection.
    pub(crate) fn at_message_boundary(&self) -> bool {
        self.left == 0 && !self.fragmented
    }

    /// How many of `buffered` (bytes read from the socket, not yet given out) the reader may have now: the
    /// rest of the current frame at most. `None`: the next frame's header is not whole yet, read more (or,
    /// at the end of the stream, give what there is: the library reports the truncated frame).
    pub(crate) fn may_give(&mut self, buffered: &[u8]) -> Option<usize> {
        if buffered.is_empty() {
            return Some(0);
        }
        if self.left == 0 {
            let header = Header::parse(&buffered[..buffered.len().min(MAX_HEADER)])?;
            self.left = header.len;
            if !header.control {
                self.fragmented = !header.fin;
            }
        }
        Some(usize::try_from(self.left).map_or(buffered.len(), |left| left.min(buffered.len())))
    }

    /// `n` bytes were given out (at most what [`may_give`](Self::may_give) allowed).
    pub(crate) fn gave(&mut self, n: usize) {
        self.left = self.left.saturating_sub(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's frame: `opcode`, FIN, masked, with `payload` bytes of payload.
    fn frame(opcode: u8, fin: bool, payload: usize) -> Vec<u8> {
        let mut f = vec![opcode | if fin { 0x80 } else { 0 }];
        match payload {
            0..=125 => f.push(0x80 | payload as u8),
            126..=0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(payload as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(payload as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(std::iter::repeat(b'x').take(payload));
        f
    }

    /// Feeds `bytes` through the reader in reads of at most `chunk`, as a library would read them; returns
    /// the offsets at which the reader was at a message boundary after a read.
    fn boundaries(bytes: &[u8], chunk: usize) -> Vec<usize> {
        let mut frames = Frames::default();
        let mut at = 0;
        let mut out = Vec::new();
        while at < bytes.len() {
            let n = frames
                .may_give(&bytes[at..])
                .expect("whole headers here")
                .min(chunk);
            assert!(n > 0);
            frames.gave(n);
            at += n;
            if frames.at_message_boundary() {
                out.push(at);
            }
        }
        out
    }

    #[test]
    fn headers_of_every_length_form() {
        for payload in [0, 1, 125, 126, 127, 65535, 65536, 1 << 20] {
            let f = frame(0x1, true, payload);
            let h = Header::parse(&f).unwrap();
            assert_eq!(h.len as usize, f.len(), "payload {payload}");
            // Any cut short of the whole header is "need more".
            let header_len = f.len() - payload;
            for cut in 0..header_len {
                assert_eq!(
                    Header::parse(&f[..cut]),
                    None,
                    "payload {payload} cut {cut}"
                );
            }
        }
    }

    #[test]
    fn a_reader_is_never_given_bytes_past_the_current_frame() {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for payload in [5, 300, 70000, 0, 2] {
            bytes.extend(frame(0x2, true, payload));
            ends.push(bytes.len());
        }
        for chunk in [1, 7, 4096, 1 << 20] {
            assert_eq!(boundaries(&bytes, chunk), ends, "chunk {chunk}");
        }
    }

    #[test]
    fn a_fragmented_message_ends_with_its_last_fragment_whatever_control_frames_come_between() {
        let mut bytes = frame(0x1, false, 10); // first fragment
        bytes.extend(frame(0x9, true, 4)); // ping between fragments
        bytes.extend(frame(0x0, false, 10)); // continuation
        bytes.extend(frame(0xA, true, 0)); // pong
        bytes.extend(frame(0x0, true, 3)); // last fragment
        let end = bytes.len();
        bytes.extend(frame(0x9, true, 1)); // a ping between messages is a boundary too
        assert_eq!(boundaries(&bytes, 4096), vec![end, bytes.len()]);
    }

    #[test]
    fn a_partial_header_asks_for_more() {
        let f = frame(0x1, true, 200);
        let mut frames = Frames::default();
        assert_eq!(frames.may_give(&f[..3]), None);
        assert!(frames.at_message_boundary());
        assert_eq!(frames.may_give(&f[..8]), Some(8));
        frames.gave(8);
        assert!(!frames.at_message_boundary());
    }
}

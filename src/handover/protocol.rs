//! The wire format of the private channel between the old process (parent) and the new one (child).
//!
//! Every frame is a fixed 12-byte header followed by a payload:
//!
//! ```text
//! offset 0   4 bytes  magic "EXUV"
//! offset 4   1 byte   protocol version (1)
//! offset 5   1 byte   message kind
//! offset 6   2 bytes  reserved, zero
//! offset 8   4 bytes  payload length, little endian, bounded by the kind (at most 1 MiB + 16)
//! ```
//!
//! | kind | direction | payload |
//! |------|-----------|---------|
//! | 1 `Hello` | parent → child | parent pid (u32 LE), generation (u32 LE), upgrade start (u64 LE, `CLOCK_MONOTONIC` µs), application state (rest, ≤ 1 MiB) |
//! | 2 `Ready` | child → parent | the child's own initialisation time (u64 LE, µs: from reading `Hello` to reporting ready) |
//! | 3 `Failed` | child → parent | reason, UTF-8, ≤ 4 KiB |
//! | 4 `Commit` | parent → child | empty: the child is now the main process |
//! | 5 `Stopping` | child → parent | empty: during a probation window, a stop reached the child; sent before it can exit |
//! | 6 `Passed` | parent → child | empty: the probation window passed; the parent finishes and can no longer roll back |
//!
//! Kinds 5 and 6 travel only during a probation window, on the channel both sides keep open after `Commit`. A
//! build that predates them closes the channel at the commit and never reads them.
//!
//! The header layout never changes; a peer that sees another version fails the handover with a typed error
//! rather than guessing. File descriptors never travel inside a payload: they sit at fixed positions (3..)
//! in the child, named by `LISTEN_FDNAMES`.

use crate::error::{Error, Result};

/// The first four bytes of every frame.
pub(crate) const MAGIC: [u8; 4] = *b"EXUV";
/// The version this build speaks.
pub(crate) const VERSION: u8 = 1;
/// Header length in bytes.
pub(crate) const HEADER_LEN: usize = 12;
/// The largest application state a parent may hand over.
pub const MAX_STATE_LEN: usize = 1 << 20;
/// The largest failure reason a child may report.
pub(crate) const MAX_REASON_LEN: usize = 4096;

const KIND_HELLO: u8 = 1;
/// Bytes of `Hello` before the application state.
const HELLO_FIXED: usize = 16;
const KIND_READY: u8 = 2;
/// Bytes of `Ready`'s payload.
const READY_LEN: usize = 8;
const KIND_FAILED: u8 = 3;
const KIND_COMMIT: u8 = 4;
const KIND_STOPPING: u8 = 5;
const KIND_PASSED: u8 = 6;

/// One message on the handover channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    Hello {
        parent_pid: u32,
        generation: u32,
        /// When the old process started this upgrade (`CLOCK_MONOTONIC`, µs): lets the new one answer
        /// "which upgrade made me" to the reload helper.
        started_usec: u64,
        state: Vec<u8>,
    },
    Ready {
        /// How long the child's own initialisation took: from reading `Hello` to reporting ready (µs). Lets
        /// the parent tell its handover overhead apart from the application's start-up.
        init_usec: u64,
    },
    Failed(String),
    Commit,
    /// A stop reached the child during its probation window: its coming exit is not a crash.
    Stopping,
    /// The probation window passed: the parent finishes, and nothing can be rolled back any more.
    Passed,
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => KIND_HELLO,
            Message::Ready { .. } => KIND_READY,
            Message::Failed(_) => KIND_FAILED,
            Message::Commit => KIND_COMMIT,
            Message::Stopping => KIND_STOPPING,
            Message::Passed => KIND_PASSED,
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Ready { .. } => "ready",
            Message::Failed(_) => "failed",
            Message::Commit => "commit",
            Message::Stopping => "stopping",
            Message::Passed => "passed",
        }
    }

    /// Encodes one frame. Oversized fields are refused here, so nothing oversized is ever sent.
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        let mut payload = Vec::new();
        match self {
            Message::Hello {
                parent_pid,
                generation,
                started_usec,
                state,
            } => {
                if state.len() > MAX_STATE_LEN {
                    return Err(Error::new(
                        crate::ErrorKind::StateTooLarge,
                        format!(
                            "application state of {} bytes exceeds the handover limit of {} bytes",
                            state.len(),
                            MAX_STATE_LEN
                        ),
                    ));
                }
                payload.reserve(HELLO_FIXED + state.len());
                payload.extend_from_slice(&parent_pid.to_le_bytes());
                payload.extend_from_slice(&generation.to_le_bytes());
                payload.extend_from_slice(&started_usec.to_le_bytes());
                payload.extend_from_slice(state);
            }
            Message::Failed(reason) => {
                // A reason is for an operator's eyes: cut it at a character boundary rather than refuse it.
                let mut end = reason.len().min(MAX_REASON_LEN);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                payload.extend_from_slice(&reason.as_bytes()[..end]);
            }
            Message::Ready { init_usec } => payload.extend_from_slice(&init_usec.to_le_bytes()),
            Message::Commit | Message::Stopping | Message::Passed => {}
        }
        let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
        frame.extend_from_slice(&MAGIC);
        frame.push(VERSION);
        frame.push(self.kind());
        frame.extend_from_slice(&[0, 0]);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&payload);
        Ok(frame)
    }
}

fn max_payload(kind: u8) -> Option<usize> {
    match kind {
        KIND_HELLO => Some(HELLO_FIXED + MAX_STATE_LEN),
        KIND_READY => Some(READY_LEN),
        KIND_COMMIT | KIND_STOPPING | KIND_PASSED => Some(0),
        KIND_FAILED => Some(MAX_REASON_LEN),
        _ => None,
    }
}

/// Decodes the first frame in `buf`. `Ok(None)`: more bytes are needed. On success returns the message and
/// how many bytes it used. Every length is checked before anything is allocated.
pub(crate) fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>> {
    // Check what we can as soon as we have it, so garbage fails fast instead of waiting for 12 bytes.
    let magic_len = buf.len().min(4);
    if buf[..magic_len] != MAGIC[..magic_len] {
        return Err(Error::protocol(format!(
            "handover channel: bad magic {:02x?} (expected \"EXUV\"): the peer is not an exuvia process",
            &buf[..magic_len]
        )));
    }
    if buf.len() > 4 && buf[4] != VERSION {
        return Err(Error::protocol(format!(
            "handover channel: protocol version {} is not supported (this build speaks {}): the old and new \
             binaries cannot hand over to each other; restart the service instead",
            buf[4], VERSION
        )));
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let kind = buf[5];
    let Some(max) = max_payload(kind) else {
        return Err(Error::protocol(format!(
            "handover channel: unknown message kind {kind}"
        )));
    };
    if buf[6] != 0 || buf[7] != 0 {
        return Err(Error::protocol(
            "handover channel: reserved header bytes are not zero",
        ));
    }
    let len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    if len > max {
        return Err(Error::protocol(format!(
            "handover channel: message of kind {kind} announces {len} bytes, more than its limit of {max}"
        )));
    }
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    let payload = &buf[HEADER_LEN..HEADER_LEN + len];
    let msg = match kind {
        KIND_HELLO => {
            if payload.len() < HELLO_FIXED {
                return Err(Error::protocol(
                    "handover channel: hello message shorter than its fixed fields",
                ));
            }
            let mut usec = [0u8; 8];
            usec.copy_from_slice(&payload[8..16]);
            Message::Hello {
                parent_pid: u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]),
                generation: u32::from_le_bytes([payload[4], payload[5], payload[6], payload[7]]),
                started_usec: u64::from_le_bytes(usec),
                state: payload[HELLO_FIXED..].to_vec(),
            }
        }
        KIND_READY => {
            let bytes: [u8; READY_LEN] = payload.try_into().map_err(|_| {
                Error::protocol(format!(
                    "handover channel: ready message of {} bytes, expected {READY_LEN}",
                    payload.len()
                ))
            })?;
            Message::Ready {
                init_usec: u64::from_le_bytes(bytes),
            }
        }
        KIND_COMMIT => Message::Commit,
        KIND_STOPPING => Message::Stopping,
        KIND_PASSED => Message::Passed,
        KIND_FAILED => {
            Message::Failed(String::from_utf8(payload.to_vec()).map_err(|_| {
                Error::protocol("handover channel: failure reason is not valid UTF-8")
            })?)
        }
        _ => unreachable!("kinds are checked by max_payload"),
    };
    Ok(Some((msg, HEADER_LEN + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    const READY: Message = Message::Ready { init_usec: 1234 };

    fn roundtrip(m: Message) {
        let bytes = m.encode().unwrap();
        let (back, used) = decode(&bytes).unwrap().unwrap();
        assert_eq!(back, m);
        assert_eq!(used, bytes.len());
        // Every strict prefix asks for more bytes and never errs or panics.
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).unwrap().is_none(), "prefix {cut}");
        }
    }

    #[test]
    fn all_messages_roundtrip() {
        roundtrip(READY);
        roundtrip(Message::Ready {
            init_usec: u64::MAX,
        });
        roundtrip(Message::Commit);
        roundtrip(Message::Stopping);
        roundtrip(Message::Passed);
        roundtrip(Message::Failed("config: no such file".into()));
        roundtrip(Message::Hello {
            parent_pid: 42,
            generation: 7,
            started_usec: 123_456_789,
            state: vec![],
        });
        roundtrip(Message::Hello {
            parent_pid: u32::MAX,
            generation: 0,
            started_usec: u64::MAX,
            state: vec![0xab; MAX_STATE_LEN],
        });
    }

    #[test]
    fn two_frames_back_to_back() {
        let mut bytes = READY.encode().unwrap();
        bytes.extend(Message::Failed("x".into()).encode().unwrap());
        let (m, used) = decode(&bytes).unwrap().unwrap();
        assert_eq!(m, READY);
        let (m2, _) = decode(&bytes[used..]).unwrap().unwrap();
        assert_eq!(m2, Message::Failed("x".into()));
    }

    #[test]
    fn oversized_state_is_refused_before_sending() {
        let e = Message::Hello {
            parent_pid: 1,
            generation: 1,
            started_usec: 0,
            state: vec![0; MAX_STATE_LEN + 1],
        }
        .encode()
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::StateTooLarge);
    }

    #[test]
    fn long_reasons_are_cut_at_a_char_boundary() {
        let reason = "é".repeat(MAX_REASON_LEN); // 2 bytes each
        let bytes = Message::Failed(reason).encode().unwrap();
        let (m, _) = decode(&bytes).unwrap().unwrap();
        let Message::Failed(r) = m else { panic!() };
        assert!(r.len() <= MAX_REASON_LEN && !r.is_empty());
    }

    fn err_of(bytes: &[u8]) -> Error {
        decode(bytes).expect_err("must be refused")
    }

    #[test]
    fn garbage_is_a_typed_error() {
        assert_eq!(err_of(b"GET / HTTP/1.1\r\n").kind(), ErrorKind::Protocol);
        assert_eq!(err_of(b"X").kind(), ErrorKind::Protocol);
        assert!(err_of(b"EXUW").to_string().contains("bad magic"));
    }

    #[test]
    fn wrong_version_is_a_typed_error() {
        let mut bytes = READY.encode().unwrap();
        bytes[4] = 2;
        let e = err_of(&bytes);
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().contains("version 2 is not supported"), "{e}");
        // Detected from the first five bytes alone.
        assert!(decode(&bytes[..5]).is_err());
    }

    #[test]
    fn oversized_length_is_refused_without_allocating() {
        let mut bytes = READY.encode().unwrap();
        bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(err_of(&bytes).to_string().contains("more than its limit"));
        let mut hello = Message::Hello {
            parent_pid: 1,
            generation: 1,
            started_usec: 0,
            state: vec![],
        }
        .encode()
        .unwrap();
        hello[8..12].copy_from_slice(&((HELLO_FIXED + MAX_STATE_LEN + 1) as u32).to_le_bytes());
        assert!(err_of(&hello).to_string().contains("more than its limit"));
    }

    #[test]
    fn malformed_payloads_are_refused() {
        // Unknown kind.
        let mut b = READY.encode().unwrap();
        b[5] = 99;
        assert!(err_of(&b).to_string().contains("unknown message kind 99"));
        // Reserved bytes set.
        let mut b = READY.encode().unwrap();
        b[6] = 1;
        assert!(err_of(&b).to_string().contains("reserved"));
        // Hello too short for its fixed fields.
        let mut b = READY.encode().unwrap();
        b[5] = KIND_HELLO;
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&[1, 2, 3]);
        assert!(err_of(&b).to_string().contains("shorter"));
        // Ready without its 8 bytes, or with more.
        for len in [0u32, 7, 9] {
            let mut b = READY.encode().unwrap();
            b.truncate(HEADER_LEN);
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b.extend(std::iter::repeat(0).take(len as usize));
            let e = err_of(&b).to_string();
            assert!(
                e.contains("expected 8") || e.contains("more than its limit"),
                "{len}: {e}"
            );
        }
        // Failure reason not UTF-8.
        let mut b = Message::Failed("ab".into()).encode().unwrap();
        b[12] = 0xff;
        assert!(err_of(&b).to_string().contains("UTF-8"));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic generator: decoding any byte string returns, never panics.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for len in 0..200usize {
            let mut buf = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            if len >= 4 && x % 2 == 0 {
                buf[..4].copy_from_slice(&MAGIC);
                if len >= 5 {
                    buf[4] = VERSION;
                }
            }
            let _ = decode(&buf);
        }
    }
}

#[cfg(test)]
mod random_inputs {
    use super::*;

    #[test]
    fn random_frames_never_panic_and_never_claim_more_than_they_have() {
        let seeds: Vec<Vec<u8>> = [
            Message::Hello {
                parent_pid: 7,
                generation: 3,
                started_usec: 99,
                state: b"state".to_vec(),
            },
            Message::Ready { init_usec: 5 },
            Message::Failed("why".into()),
            Message::Commit,
        ]
        .iter()
        .map(|m| m.encode().unwrap())
        .collect();
        let mut rng = crate::fuzz::Rng::new(1);
        for i in 0..crate::fuzz::iterations(100_000) {
            let seed = &seeds[i as usize % seeds.len()];
            let input = rng.mutate(seed, 256);
            if let Ok(Some((m, used))) = decode(&input) {
                assert!(used <= input.len(), "{input:?}");
                // What decodes, encodes back to the same bytes.
                assert_eq!(m.encode().unwrap(), &input[..used], "{input:?}");
            }
        }
    }
}

//! The wire format of the connection channel: a `SOCK_SEQPACKET` socket pair between the old process and the
//! new one, one frame per packet, the connections' descriptors attached to `Batch` frames as `SCM_RIGHTS`.
//!
//! Every frame is a fixed 12-byte header followed by a payload whose length is the rest of the packet:
//!
//! ```text
//! offset 0   4 bytes  magic "EXMC"
//! offset 4   1 byte   protocol version (1)
//! offset 5   1 byte   message kind
//! offset 6   2 bytes  reserved, zero
//! offset 8   4 bytes  payload length, little endian (the packet's length minus 12; at most 160 KiB)
//! ```
//!
//! | kind | direction | payload |
//! |------|-----------|---------|
//! | 1 `Takes` | new → old | the most connections it takes per batch (u16 LE), reserved (u16, zero) |
//! | 2 `Batch` | old → new | sequence number (u32 LE), count (u16 LE), reserved (u16); then `count` records |
//! | 3 `Taken` | new → old | the batch's sequence number (u32 LE), how many of its first records it took (u16 LE), reserved (u16) |
//!
//! A record: stream kind (u8: 1 TCP, 2 Unix stream), 3 reserved bytes, state length (u32 LE), unread length
//! (u32 LE), the state (≤ 64 KiB), the unread bytes (≤ 64 KiB). A `Batch` carries exactly `count`
//! descriptors, in record order; a new process that runs out of descriptors receives only the first ones
//! (the kernel closes the rest) and says how many in `Taken`: the others are still the old process's.
//!
//! The new process sends `Takes` once, before it reports ready; an old process that finds none never sends
//! a connection (a build that predates connection moving, or an application that does not take them).

use crate::error::{Error, Result};

/// The first four bytes of every frame.
const MAGIC: [u8; 4] = *b"EXMC";
/// The version this build speaks.
const VERSION: u8 = 1;
/// Header length in bytes.
pub(crate) const HEADER_LEN: usize = 12;
/// The largest per-connection state the application may hand over with a connection.
pub const MAX_CONNECTION_STATE: usize = 64 * 1024;
/// The most bytes read from a connection but not consumed that may travel with it.
pub const MAX_UNREAD: usize = 64 * 1024;
/// The most connections in one batch (one packet; `SCM_MAX_FD` is 253).
pub(crate) const MAX_BATCH: usize = 64;
/// The largest payload: a batch of records. One record of the largest state and unread bytes always fits; the
/// whole packet stays below the default socket buffer (`net.core.wmem_default`, 208 KiB), which bounds a
/// packet's size.
pub(crate) const MAX_PAYLOAD: usize = 160 * 1024;

const KIND_TAKES: u8 = 1;
const KIND_BATCH: u8 = 2;
const KIND_TAKEN: u8 = 3;
/// A batch's bytes before its records.
pub(crate) const BATCH_FIXED: usize = 8;
const RECORD_FIXED: usize = 12;

/// What kind of stream a moved descriptor is: the new process checks the descriptor against it and hands the
/// application a stream of that type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// A TCP connection (IPv4 or IPv6).
    Tcp,
    /// A Unix stream socket's connection.
    Unix,
}

impl StreamKind {
    fn code(self) -> u8 {
        match self {
            StreamKind::Tcp => 1,
            StreamKind::Unix => 2,
        }
    }

    fn from_code(code: u8) -> Option<StreamKind> {
        match code {
            1 => Some(StreamKind::Tcp),
            2 => Some(StreamKind::Unix),
            _ => None,
        }
    }
}

/// One connection's record in a batch, as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) kind: StreamKind,
    pub(crate) state: Vec<u8>,
    pub(crate) unread: Vec<u8>,
}

/// One connection's record as the old process sends it (borrowed from the connection waiting to move).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordRef<'a> {
    pub(crate) kind: StreamKind,
    pub(crate) state: &'a [u8],
    pub(crate) unread: &'a [u8],
}

impl RecordRef<'_> {
    /// Bytes this record takes in a batch's payload.
    pub(crate) fn len(&self) -> usize {
        RECORD_FIXED + self.state.len() + self.unread.len()
    }

    /// Whether it is within the bounds (then it always fits a batch of its own).
    pub(crate) fn check(&self) -> std::result::Result<(), (&'static str, usize, usize)> {
        if self.state.len() > MAX_CONNECTION_STATE {
            return Err(("state", self.state.len(), MAX_CONNECTION_STATE));
        }
        if self.unread.len() > MAX_UNREAD {
            return Err(("unread bytes", self.unread.len(), MAX_UNREAD));
        }
        Ok(())
    }
}

/// One frame on the connection channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    /// The new process takes connections, at most `max_batch` per batch.
    Takes { max_batch: u16 },
    /// Connections; their descriptors travel with the packet.
    Batch { seq: u32, records: Vec<Record> },
    /// The new process took the first `taken` connections of batch `seq`.
    Taken { seq: u32, taken: u16 },
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&MAGIC);
    frame.push(VERSION);
    frame.push(kind);
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// `Takes`.
pub(crate) fn takes(max_batch: u16) -> Vec<u8> {
    let mut p = max_batch.to_le_bytes().to_vec();
    p.extend_from_slice(&[0, 0]);
    frame(KIND_TAKES, &p)
}

/// `Taken`.
pub(crate) fn taken(seq: u32, taken: u16) -> Vec<u8> {
    let mut p = seq.to_le_bytes().to_vec();
    p.extend_from_slice(&taken.to_le_bytes());
    p.extend_from_slice(&[0, 0]);
    frame(KIND_TAKEN, &p)
}

/// `Batch`. The caller keeps within [`MAX_BATCH`] records, [`MAX_PAYLOAD`] bytes and each record's bounds
/// (checked here too: nothing out of bounds is ever sent).
pub(crate) fn batch(seq: u32, records: &[RecordRef<'_>]) -> Result<Vec<u8>> {
    let len = BATCH_FIXED + records.iter().map(RecordRef::len).sum::<usize>();
    if records.len() > MAX_BATCH || len > MAX_PAYLOAD || records.iter().any(|r| r.check().is_err())
    {
        return Err(Error::protocol(format!(
            "connection channel: a batch of {} connections and {len} bytes is out of bounds",
            records.len()
        )));
    }
    let mut p = Vec::with_capacity(len);
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&(records.len() as u16).to_le_bytes());
    p.extend_from_slice(&[0, 0]);
    for r in records {
        p.push(r.kind.code());
        p.extend_from_slice(&[0, 0, 0]);
        p.extend_from_slice(&(r.state.len() as u32).to_le_bytes());
        p.extend_from_slice(&(r.unread.len() as u32).to_le_bytes());
        p.extend_from_slice(r.state);
        p.extend_from_slice(r.unread);
    }
    Ok(frame(KIND_BATCH, &p))
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::protocol(format!("connection channel: {what}"))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Decodes one packet. Every length is checked against the packet and the bounds before anything is
/// allocated; garbage is a typed protocol error, never a panic.
pub(crate) fn decode(packet: &[u8]) -> Result<Message> {
    if packet.len() < HEADER_LEN {
        return Err(bad(format!(
            "a packet of {} bytes, shorter than a header",
            packet.len()
        )));
    }
    if packet[..4] != MAGIC {
        return Err(bad(format!(
            "bad magic {:02x?} (expected \"EXMC\"): the peer is not an exuvia process",
            &packet[..4]
        )));
    }
    if packet[4] != VERSION {
        return Err(bad(format!(
            "protocol version {} is not supported (this build speaks {VERSION})",
            packet[4]
        )));
    }
    if packet[6] != 0 || packet[7] != 0 {
        return Err(bad("reserved header bytes are not zero"));
    }
    let len = u32_at(packet, 8) as usize;
    let payload = &packet[HEADER_LEN..];
    if len != payload.len() || len > MAX_PAYLOAD {
        return Err(bad(format!(
            "the header announces {len} bytes, the packet holds {} (at most {MAX_PAYLOAD})",
            payload.len()
        )));
    }
    match packet[5] {
        KIND_TAKES if len == 4 => Ok(Message::Takes {
            max_batch: u16_at(payload, 0),
        }),
        KIND_TAKEN if len == 8 => Ok(Message::Taken {
            seq: u32_at(payload, 0),
            taken: u16_at(payload, 4),
        }),
        KIND_BATCH => decode_batch(payload),
        kind @ (KIND_TAKES | KIND_TAKEN) => Err(bad(format!("message kind {kind} of {len} bytes"))),
        kind => Err(bad(format!("unknown message kind {kind}"))),
    }
}

fn decode_batch(p: &[u8]) -> Result<Message> {
    if p.len() < BATCH_FIXED {
        return Err(bad("a batch shorter than its fixed fields"));
    }
    let seq = u32_at(p, 0);
    let count = u16_at(p, 4) as usize;
    if count > MAX_BATCH {
        return Err(bad(format!(
            "a batch of {count} connections (at most {MAX_BATCH})"
        )));
    }
    let mut records = Vec::with_capacity(count);
    let mut at = BATCH_FIXED;
    for i in 0..count {
        let fixed = p
            .get(at..at + RECORD_FIXED)
            .ok_or_else(|| bad(format!("record {i} of {count} is cut short")))?;
        let kind = StreamKind::from_code(fixed[0])
            .ok_or_else(|| bad(format!("record {i}: unknown stream kind {}", fixed[0])))?;
        let state_len = u32_at(fixed, 4) as usize;
        let unread_len = u32_at(fixed, 8) as usize;
        if state_len > MAX_CONNECTION_STATE || unread_len > MAX_UNREAD {
            return Err(bad(format!(
                "record {i}: {state_len} bytes of state and {unread_len} unread, out of bounds"
            )));
        }
        at += RECORD_FIXED;
        let state = p
            .get(at..at + state_len)
            .ok_or_else(|| bad(format!("record {i}'s state is cut short")))?;
        at += state_len;
        let unread = p
            .get(at..at + unread_len)
            .ok_or_else(|| bad(format!("record {i}'s unread bytes are cut short")))?;
        at += unread_len;
        records.push(Record {
            kind,
            state: state.to_vec(),
            unread: unread.to_vec(),
        });
    }
    if at != p.len() {
        return Err(bad(format!(
            "{} bytes after the batch's last record",
            p.len() - at
        )));
    }
    Ok(Message::Batch { seq, records })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn records() -> Vec<Record> {
        vec![
            Record {
                kind: StreamKind::Tcp,
                state: b"count=7".to_vec(),
                unread: b"GET / HTTP/1.1\r\n".to_vec(),
            },
            Record {
                kind: StreamKind::Unix,
                state: Vec::new(),
                unread: Vec::new(),
            },
            Record {
                kind: StreamKind::Tcp,
                state: vec![0xab; MAX_CONNECTION_STATE],
                unread: vec![b'x'; MAX_UNREAD],
            },
        ]
    }

    fn refs(records: &[Record]) -> Vec<RecordRef<'_>> {
        records
            .iter()
            .map(|r| RecordRef {
                kind: r.kind,
                state: &r.state,
                unread: &r.unread,
            })
            .collect()
    }

    #[test]
    fn every_message_roundtrips() {
        assert_eq!(
            decode(&takes(64)).unwrap(),
            Message::Takes { max_batch: 64 }
        );
        assert_eq!(
            decode(&taken(9, 3)).unwrap(),
            Message::Taken { seq: 9, taken: 3 }
        );
        let records = records();
        let packet = batch(7, &refs(&records)).unwrap();
        assert!(packet.len() <= HEADER_LEN + MAX_PAYLOAD);
        assert_eq!(decode(&packet).unwrap(), Message::Batch { seq: 7, records });
        let empty = batch(8, &[]).unwrap();
        assert_eq!(
            decode(&empty).unwrap(),
            Message::Batch {
                seq: 8,
                records: Vec::new()
            }
        );
    }

    #[test]
    fn out_of_bounds_batches_are_never_encoded() {
        let big = vec![0u8; MAX_CONNECTION_STATE + 1];
        let over = RecordRef {
            kind: StreamKind::Tcp,
            state: &big,
            unread: &[],
        };
        assert_eq!(
            over.check(),
            Err(("state", big.len(), MAX_CONNECTION_STATE))
        );
        assert!(batch(1, &[over]).is_err());
        let one = RecordRef {
            kind: StreamKind::Tcp,
            state: &[],
            unread: &[],
        };
        assert!(batch(1, &vec![one; MAX_BATCH + 1]).is_err());
        assert!(batch(1, &vec![one; MAX_BATCH]).is_ok());
    }

    #[test]
    fn every_cut_and_every_flipped_byte_is_an_error_or_a_valid_message_never_a_panic() {
        let records = records()[..2].to_vec();
        let packet = batch(3, &refs(&records)).unwrap();
        for cut in 0..packet.len() {
            let e = decode(&packet[..cut]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol, "cut at {cut}");
        }
        for at in 0..packet.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut p = packet.clone();
                p[at] ^= flip;
                let _ = decode(&p);
            }
        }
        // A few that must be refused, whatever else.
        let mut p = packet.clone();
        p[0] = b'X';
        assert!(decode(&p).unwrap_err().to_string().contains("magic"));
        let mut p = packet.clone();
        p[4] = 2;
        assert!(decode(&p).unwrap_err().to_string().contains("version 2"));
        let mut p = packet.clone();
        p.push(0);
        assert!(decode(&p).is_err(), "a byte more than announced");
        let mut p = taken(1, 1);
        p[5] = 9;
        assert!(decode(&p).unwrap_err().to_string().contains("kind 9"));
    }

    #[test]
    fn announced_lengths_are_checked_before_allocating() {
        // A record that claims 4 GiB of state in a short packet.
        let mut p = Vec::new();
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&1u16.to_le_bytes());
        p.extend_from_slice(&[0, 0]);
        p.push(1);
        p.extend_from_slice(&[0, 0, 0]);
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        let e = decode(&frame(KIND_BATCH, &p)).unwrap_err();
        assert!(e.to_string().contains("out of bounds"), "{e}");
        // A batch that claims more records than allowed.
        let mut p = vec![0u8; BATCH_FIXED];
        p[4..6].copy_from_slice(&65535u16.to_le_bytes());
        assert!(decode(&frame(KIND_BATCH, &p)).is_err());
    }
}

//! A framed, deadline-bounded message stream over the private socket pair between parent and child.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::protocol::{self, Message};
use crate::error::{Error, ErrorKind, Result};
use crate::sys::{PollFlags, PollSet};

/// What a [`Channel::recv`] saw first.
#[derive(Debug)]
pub(crate) enum Event {
    /// A whole message.
    Message(Message),
    /// The peer closed its end cleanly between messages.
    Closed,
    /// The deadline passed.
    Timeout,
    /// [`Also::ended`] turned readable: the other process has ended (its pidfd).
    Ended,
    /// [`Also::stop`] turned readable: this process is stopping (its finishing pipe).
    Stop,
}

/// What else a [`Channel::recv`] watches besides the channel.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Also<'a> {
    /// The other process's pidfd: readable once it has ended.
    pub(crate) ended: Option<BorrowedFd<'a>>,
    /// This process's finishing pipe: readable once it is stopping.
    pub(crate) stop: Option<BorrowedFd<'a>>,
}

impl Also<'_> {
    /// The channel alone.
    pub(crate) const NOTHING: Also<'static> = Also {
        ended: None,
        stop: None,
    };
}

/// One end of the handover channel.
#[derive(Debug)]
pub(crate) struct Channel {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Channel {
    pub(crate) fn new(stream: UnixStream) -> Result<Channel> {
        stream
            .set_nonblocking(true)
            .map_err(|e| Error::io("handover channel: cannot make it non-blocking", e))?;
        Ok(Channel {
            stream,
            buf: Vec::new(),
        })
    }

    /// A second descriptor for the channel's socket, to watch it (never to read or write) from another thread.
    pub(crate) fn watch_fd(&self) -> Result<OwnedFd> {
        self.stream
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("handover channel: cannot duplicate its descriptor", e))
    }

    /// A second channel over the same socket (a duplicated descriptor): one thread reads while another may
    /// send. Each keeps its own buffer, so only one of them may read.
    pub(crate) fn duplicate(&self) -> Result<Channel> {
        let stream = self
            .stream
            .try_clone()
            .map_err(|e| Error::io("handover channel: cannot duplicate its descriptor", e))?;
        Ok(Channel {
            stream,
            buf: Vec::new(),
        })
    }

    /// Shuts the channel down both ways: the peer reads end of file (after what was sent), even while another
    /// descriptor of this socket stays open.
    pub(crate) fn shut(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Sends one message, waiting for room until `deadline`.
    pub(crate) fn send(&mut self, msg: &Message, deadline: Instant) -> Result<()> {
        let frame = msg.encode()?;
        let mut rest = &frame[..];
        while !rest.is_empty() {
            match self.stream.write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut set = PollSet::new();
                    set.add(self.stream.as_fd(), PollFlags::OUT);
                    let ready = set
                        .wait(Some(deadline))
                        .map_err(|e| Error::io("handover channel: poll failed", e))?;
                    if !ready {
                        return Err(Error::new(
                            ErrorKind::Channel,
                            format!(
                                "handover channel: peer did not take the {} message before the deadline",
                                msg.name()
                            ),
                        ));
                    }
                }
                Err(e) => {
                    return Err(Error::with_io(
                        ErrorKind::Channel,
                        format!("handover channel: cannot send the {} message", msg.name()),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    /// Waits for the next message until `deadline`, or until one of `also` becomes readable.
    pub(crate) fn recv(&mut self, deadline: Option<Instant>, also: Also<'_>) -> Result<Event> {
        loop {
            if let Some((msg, used)) = protocol::decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(Event::Message(msg));
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    if self.buf.is_empty() {
                        return Ok(Event::Closed);
                    }
                    return Err(Error::protocol(format!(
                        "handover channel: peer closed the channel in the middle of a message ({} bytes of it \
                         received)",
                        self.buf.len()
                    )));
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(Event::Closed),
                Err(e) => {
                    return Err(Error::with_io(
                        ErrorKind::Channel,
                        "handover channel: read failed",
                        e,
                    ))
                }
            }
            let mut set = PollSet::new();
            let me = set.readable(self.stream.as_fd());
            let ended = also.ended.map(|fd| set.readable(fd));
            let stop = also.stop.map(|fd| set.readable(fd));
            if !set
                .wait(deadline)
                .map_err(|e| Error::io("handover channel: poll failed", e))?
            {
                return Ok(Event::Timeout);
            }
            // Only report the others when the channel itself has nothing: a message that arrived together with
            // them (a child that said "failed" and exited, or "stopping" and exited) is the better explanation.
            if !set.fired(me) {
                if ended.is_some_and(|i| set.fired(i)) {
                    return Ok(Event::Ended);
                }
                if stop.is_some_and(|i| set.fired(i)) {
                    return Ok(Event::Stop);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pair() -> (Channel, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Channel::new(a).unwrap(), b)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn messages_cross_in_order() {
        let (mut a, b) = pair();
        let mut b = Channel::new(b).unwrap();
        a.send(&Message::Ready { init_usec: 7 }, soon()).unwrap();
        a.send(&Message::Failed("why".into()), soon()).unwrap();
        assert!(matches!(
            b.recv(Some(soon()), Also::NOTHING).unwrap(),
            Event::Message(Message::Ready { init_usec: 7 })
        ));
        assert!(
            matches!(b.recv(Some(soon()), Also::NOTHING).unwrap(), Event::Message(Message::Failed(r)) if r == "why")
        );
        drop(a);
        assert!(matches!(
            b.recv(Some(soon()), Also::NOTHING).unwrap(),
            Event::Closed
        ));
    }

    #[test]
    fn a_large_state_crosses_while_the_peer_reads() {
        let (mut a, b) = pair();
        let state = vec![7u8; protocol::MAX_STATE_LEN];
        let reader = std::thread::spawn(move || {
            let mut b = Channel::new(b).unwrap();
            match b.recv(Some(soon()), Also::NOTHING).unwrap() {
                Event::Message(Message::Hello { state, .. }) => state.len(),
                other => panic!("{other:?}"),
            }
        });
        a.send(
            &Message::Hello {
                parent_pid: 1,
                generation: 2,
                started_usec: 0,
                state,
            },
            soon(),
        )
        .unwrap();
        assert_eq!(reader.join().unwrap(), protocol::MAX_STATE_LEN);
    }

    #[test]
    fn timeout_and_truncation_are_reported() {
        let (mut a, mut b) = pair();
        let t0 = Instant::now();
        assert!(matches!(
            a.recv(
                Some(Instant::now() + Duration::from_millis(50)),
                Also::NOTHING
            )
            .unwrap(),
            Event::Timeout
        ));
        assert!(t0.elapsed() >= Duration::from_millis(50));
        // Half a frame, then the peer goes away.
        let frame = Message::Failed("truncated".into()).encode().unwrap();
        b.write_all(&frame[..frame.len() - 3]).unwrap();
        drop(b);
        let e = a.recv(Some(soon()), Also::NOTHING).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().contains("middle of a message"), "{e}");
    }

    #[test]
    fn garbage_from_the_peer_is_a_protocol_error() {
        let (mut a, mut b) = pair();
        b.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert_eq!(
            a.recv(Some(soon()), Also::NOTHING).unwrap_err().kind(),
            ErrorKind::Protocol
        );
    }

    #[test]
    fn a_peer_that_never_reads_hits_the_send_deadline() {
        let (mut a, _b) = pair();
        let big = Message::Hello {
            parent_pid: 1,
            generation: 1,
            started_usec: 0,
            state: vec![0; protocol::MAX_STATE_LEN],
        };
        let e = a
            .send(&big, Instant::now() + Duration::from_millis(100))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Channel);
    }
}

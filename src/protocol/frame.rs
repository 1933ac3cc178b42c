//! Frames: the length-prefixed unit every PyProxy stream is made of.
//!
//! ```text
//! offset  size  field
//! 0       4     length      u32, big endian: bytes after this field (9 + payload)
//! 4       1     kind        u8, see [`Kind`]
//! 5       8     request_id  u64, big endian
//! 13      n     payload     length - 9 bytes
//! ```
//!
//! The length is checked against the maximum before anything is allocated, so
//! a hostile length prefix costs the reader nothing.

use std::fmt;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use byteorder::{BigEndian, ByteOrder};

use super::buffer::Buffer;
use super::error::{timed_out, Error, Result};

/// Bytes of the length prefix.
pub const LENGTH_SIZE: usize = 4;
/// Bytes of kind + request id, counted in the length.
pub const HEADER_BODY_SIZE: usize = 9;
/// Bytes before the payload.
pub const HEADER_SIZE: usize = LENGTH_SIZE + HEADER_BODY_SIZE;
/// Default largest value of the length field (64 MiB + header), negotiated in `WELCOME`.
pub const DEFAULT_MAX_FRAME: u32 = 64 * 1024 * 1024 + 4096;

macro_rules! kinds {
    ($($(#[$doc:meta])* $name:ident = $value:literal, $text:literal;)*) => {
        /// Every frame kind, in the order of the table in `docs/protocol.md`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Kind {
            $($(#[$doc])* $name = $value,)*
        }

        impl Kind {
            /// All kinds, in wire order.
            pub const ALL: &'static [Kind] = &[$(Kind::$name,)*];

            /// The kind's name as the spec writes it.
            pub fn name(self) -> &'static str {
                match self {
                    $(Kind::$name => $text,)*
                }
            }
        }

        impl TryFrom<u8> for Kind {
            type Error = Error;
            fn try_from(value: u8) -> Result<Kind> {
                match value {
                    $($value => Ok(Kind::$name),)*
                    other => Err(Error::UnknownKind(other)),
                }
            }
        }
    };
}

kinds! {
    /// server → client, main-stream: the nonce the client must prove the token against.
    Challenge = 0x01, "CHALLENGE";
    /// client → server, main-stream: protocol version, proof, client Python, backend.
    Hello = 0x02, "HELLO";
    /// server → client, main-stream: session id, attach secret, server proof, limits.
    Welcome = 0x03, "WELCOME";
    /// client → server, main-stream: run an atom; the request id is the atom id.
    Eval = 0x10, "EVAL";
    /// client → server, main-stream: cancel a queued or running atom.
    Cancel = 0x11, "CANCEL";
    /// client → server, main-stream: end the session.
    Close = 0x12, "CLOSE";
    /// server → client, main-stream: an atom's value or exception.
    Result = 0x20, "RESULT";
    /// server → client, either stream: a request or the connection failed.
    Error = 0x21, "ERROR";
    /// client → server, output-stream: bind this stream to a session.
    Attach = 0x30, "ATTACH";
    /// server → client, output-stream: the attach succeeded.
    Attached = 0x31, "ATTACHED";
    /// server → client, output-stream: whole lines an atom wrote to fd 1 or 2.
    Output = 0x32, "OUTPUT";
    /// server → client, output-stream: the atom's last output byte was sent.
    EndOfOutput = 0x33, "END_OF_OUTPUT";
    /// server → client, output-stream: a server log record about the session.
    Log = 0x34, "LOG";
    /// server → client, output-stream: the session is ending, and why.
    Goodbye = 0x35, "GOODBYE";
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One frame. `Debug` shows the kind, request id and payload length, never the payload.
///
/// The payload on the wire is `payload` followed by the bytes of each `tail`
/// buffer: a frame built to be written keeps large out-of-band buffers there,
/// so they go to the socket from where they lie (one vectored write) instead
/// of being copied behind the rest. Frames read from a stream have no tail.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub request_id: u64,
    pub payload: Vec<u8>,
    pub tail: Vec<Buffer>,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("kind", &self.kind)
            .field("request_id", &self.request_id)
            .field("payload_len", &self.payload_len())
            .finish()
    }
}

/// The fixed part of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub request_id: u64,
    pub payload_len: u32,
}

impl Header {
    /// Parses a header from the first [`HEADER_SIZE`] bytes of `buf`.
    ///
    /// `Ok(None)`: not enough bytes yet. `Err`: the bytes can never make a valid frame.
    pub fn parse(buf: &[u8], max_frame: u32) -> Result<Option<Header>> {
        if buf.len() < LENGTH_SIZE {
            return Ok(None);
        }
        let length = BigEndian::read_u32(&buf[..LENGTH_SIZE]);
        if length > max_frame {
            return Err(Error::FrameTooLarge {
                size: u64::from(length),
                max: max_frame,
            });
        }
        if (length as usize) < HEADER_BODY_SIZE {
            return Err(Error::FrameTooSmall { size: length });
        }
        if buf.len() < HEADER_SIZE {
            return Ok(None);
        }
        let kind = Kind::try_from(buf[LENGTH_SIZE])?;
        let request_id = BigEndian::read_u64(&buf[LENGTH_SIZE + 1..HEADER_SIZE]);
        Ok(Some(Header {
            kind,
            request_id,
            payload_len: length - HEADER_BODY_SIZE as u32,
        }))
    }

    /// Writes the header's [`HEADER_SIZE`] bytes.
    pub fn format(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        BigEndian::write_u32(
            &mut out[..LENGTH_SIZE],
            self.payload_len + HEADER_BODY_SIZE as u32,
        );
        out[LENGTH_SIZE] = self.kind as u8;
        BigEndian::write_u64(&mut out[LENGTH_SIZE + 1..], self.request_id);
        out
    }
}

impl Frame {
    pub fn new(kind: Kind, request_id: u64, payload: Vec<u8>) -> Frame {
        Frame {
            kind,
            request_id,
            payload,
            tail: Vec::new(),
        }
    }

    /// Bytes of payload on the wire: `payload` and the tail.
    pub fn payload_len(&self) -> usize {
        self.payload.len() + self.tail.iter().map(|b| b.len()).sum::<usize>()
    }

    /// The payload on the wire as the slices it is the concatenation of.
    pub fn payload_slices(&self) -> Vec<&[u8]> {
        let mut parts = Vec::with_capacity(1 + self.tail.len());
        parts.push(&self.payload[..]);
        parts.extend(self.tail.iter().map(|b| &b[..]));
        parts
    }

    /// Parses one frame from the front of `buf`, returning it and the bytes it used.
    ///
    /// `Ok(None)`: `buf` holds only part of a frame so far.
    pub fn parse(buf: &[u8], max_frame: u32) -> Result<Option<(Frame, usize)>> {
        let Some(header) = Header::parse(buf, max_frame)? else {
            return Ok(None);
        };
        let total = HEADER_SIZE + header.payload_len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        let frame = Frame::new(
            header.kind,
            header.request_id,
            buf[HEADER_SIZE..total].to_vec(),
        );
        Ok(Some((frame, total)))
    }

    /// The frame's header, for a payload that fits the length field.
    pub fn header(&self) -> Header {
        Header {
            kind: self.kind,
            request_id: self.request_id,
            payload_len: self.payload_len() as u32,
        }
    }

    /// The whole frame as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_SIZE + self.payload_len());
        self.append_to(&mut out);
        out
    }

    /// Appends the whole frame to `out` (several frames sent in one write).
    pub fn append_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header().format());
        out.extend_from_slice(&self.payload);
        for part in &self.tail {
            out.extend_from_slice(part);
        }
    }
}

/// Reads frames from any `Read`, enforcing the maximum frame size before allocating.
pub struct FrameReader<R> {
    inner: R,
    max_frame: u32,
    /// Whether a checked length may be allocated in one piece (see [`FrameReader::set_max_frame`]).
    trusted: bool,
    /// See [`FrameReader::set_frame_timeout`].
    frame_timeout: Option<Duration>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, max_frame: u32) -> Self {
        FrameReader {
            inner,
            max_frame,
            trusted: false,
            frame_timeout: None,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// Raises (or sets) the limit once the handshake has authenticated the
    /// peer. From then on a payload whose length passed the check is read into
    /// one buffer of its final size; before, the buffer grows with the bytes
    /// that actually arrive, so an unauthenticated prefix never buys an allocation.
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame;
        self.trusted = true;
    }

    /// Once a frame's first byte has arrived, the rest must arrive within
    /// `timeout` ([`Error::Stalled`] otherwise); waiting between frames has no
    /// limit. The stream must time its reads out (e.g. `set_read_timeout` with
    /// at most `timeout`): a read that times out between frames is retried.
    pub fn set_frame_timeout(&mut self, timeout: Duration) {
        self.frame_timeout = Some(timeout);
    }

    /// Whether payloads are allocated in one piece (after [`FrameReader::set_max_frame`]).
    pub fn is_trusted(&self) -> bool {
        self.trusted
    }

    /// Reads the next frame. A clean end of stream before a frame starts is
    /// [`Error::ConnectionClosed`]; an end inside one is [`Error::Truncated`].
    pub fn read_frame(&mut self) -> Result<Frame> {
        let mut head = [0u8; HEADER_SIZE];
        let first = loop {
            match self.inner.read(&mut head[..LENGTH_SIZE]) {
                Ok(0) => return Err(Error::ConnectionClosed),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Idle between frames: no limit.
                Err(e) if self.frame_timeout.is_some() && timed_out(&e) => {}
                Err(e) => return Err(Error::Io(e)),
            }
        };
        let mut clock = self.frame_timeout.map(|t| FrameClock {
            timeout: t,
            deadline: Instant::now() + t,
            got: first,
        });
        let got = first + read_full(&mut self.inner, &mut head[first..LENGTH_SIZE], &mut clock)?;
        if got < LENGTH_SIZE {
            return Err(Error::Truncated {
                needed: HEADER_SIZE,
                got,
            });
        }
        // Judge the length prefix before waiting for anything else, so an
        // oversized or nonsensical prefix is refused even if no more bytes come.
        Header::parse(&head[..LENGTH_SIZE], self.max_frame)?;
        let got = LENGTH_SIZE + read_full(&mut self.inner, &mut head[LENGTH_SIZE..], &mut clock)?;
        let header = match Header::parse(&head[..got], self.max_frame)? {
            Some(h) => h,
            None => {
                return Err(Error::Truncated {
                    needed: HEADER_SIZE,
                    got,
                })
            }
        };
        let len = header.payload_len as usize;
        let (payload, got) = if self.trusted {
            // The length passed the max_frame check and the peer is
            // authenticated: one buffer of the final size (recycled or huge
            // pages when large, see `buffer::for_writing`; every byte is read
            // into it or the frame is an error), instead of a Vec doubled and
            // copied ~log2(n) times.
            let mut payload = super::buffer::for_writing(len);
            let got = read_full(&mut self.inner, &mut payload, &mut clock)?;
            (payload, got)
        } else {
            // Before authentication, grow with the data actually received
            // rather than trusting the prefix for one big allocation.
            let mut payload = Vec::new();
            let got = (&mut self.inner)
                .take(len as u64)
                .read_to_end(&mut payload)
                .map_err(Error::Io)?;
            (payload, got)
        };
        if got < len {
            return Err(Error::Truncated {
                needed: HEADER_SIZE + len,
                got: HEADER_SIZE + got,
            });
        }
        Ok(Frame::new(header.kind, header.request_id, payload))
    }
}

/// The time a begun frame has left (see [`FrameReader::set_frame_timeout`]).
struct FrameClock {
    timeout: Duration,
    deadline: Instant,
    /// Bytes of the frame read so far.
    got: usize,
}

impl FrameClock {
    fn check(&self) -> Result<()> {
        if Instant::now() >= self.deadline {
            return Err(Error::Stalled {
                timeout: self.timeout,
                got: self.got,
            });
        }
        Ok(())
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read. With
/// a clock, a frame that has not arrived by its deadline is [`Error::Stalled`].
fn read_full<R: Read>(r: &mut R, buf: &mut [u8], clock: &mut Option<FrameClock>) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                if let Some(c) = clock {
                    c.got += n;
                    if filled < buf.len() {
                        c.check()?;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => match clock {
                Some(c) => c.check()?,
                None => return Err(Error::Io(e)),
            },
            Err(e) => return Err(Error::Io(e)),
        }
    }
    Ok(filled)
}

/// Writes frames to any `Write`.
pub struct FrameWriter<W> {
    inner: W,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter { inner }
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }

    /// Writes one frame (header, payload and tail in one vectored write when possible).
    pub fn write_frame(&mut self, frame: &Frame) -> Result<()> {
        write_frame_slices(
            &mut self.inner,
            frame.kind,
            frame.request_id,
            &frame.payload_slices(),
        )
    }

    pub fn flush(&mut self) -> Result<()> {
        self.inner.flush().map_err(Error::Io)
    }
}

/// Writes a frame from its parts without building a `Frame`, so large
/// payloads are never copied to add a header.
pub fn write_frame_parts<W: Write>(
    w: &mut W,
    kind: Kind,
    request_id: u64,
    payload: &[u8],
) -> Result<()> {
    write_frame_slices(w, kind, request_id, &[payload])
}

/// Writes a frame whose payload is the concatenation of `parts`, with
/// vectored writes straight from them: nothing is concatenated first.
pub fn write_frame_slices<W: Write>(
    w: &mut W,
    kind: Kind,
    request_id: u64,
    parts: &[&[u8]],
) -> Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let header = Header {
        kind,
        request_id,
        payload_len: u32::try_from(len)
            .ok()
            .filter(|n| n.checked_add(HEADER_BODY_SIZE as u32).is_some())
            .ok_or(Error::FrameTooLarge {
                size: len as u64,
                max: u32::MAX,
            })?,
    }
    .format();
    let mut bufs = Vec::with_capacity(parts.len() + 1);
    bufs.push(io::IoSlice::new(&header));
    bufs.extend(
        parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| io::IoSlice::new(p)),
    );
    let mut slices: &mut [io::IoSlice<'_>] = &mut bufs;
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(Error::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Io(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    /// A reader over one end of a loopback connection whose reads time out
    /// after 20 ms, with a 150 ms frame timeout; and the other end.
    fn timed_pair() -> (FrameReader<std::net::TcpStream>, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut reader = FrameReader::new(ours, DEFAULT_MAX_FRAME);
        reader.set_max_frame(DEFAULT_MAX_FRAME);
        reader.set_frame_timeout(Duration::from_millis(150));
        (reader, peer)
    }

    #[test]
    fn waiting_between_frames_has_no_limit_but_a_begun_frame_has() {
        let (mut reader, mut peer) = timed_pair();
        let bytes = Frame::new(Kind::Eval, 3, vec![7u8; 100]).to_bytes();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400)); // idle: many read timeouts
            peer.write_all(&bytes).unwrap();
            peer.write_all(&bytes[..20]).unwrap(); // half a frame, then nothing
            std::thread::sleep(Duration::from_millis(600));
            peer
        });
        let frame = reader.read_frame().unwrap();
        assert_eq!(
            (frame.kind, frame.request_id, frame.payload.len()),
            (Kind::Eval, 3, 100)
        );
        let started = Instant::now();
        match reader.read_frame() {
            Err(Error::Stalled { got, .. }) => assert_eq!(got, 20),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_millis(500));
        drop(sender.join().unwrap());
    }

    #[test]
    fn a_frame_trickled_in_slower_than_its_timeout_stalls() {
        let (mut reader, mut peer) = timed_pair();
        let bytes = Frame::new(Kind::Eval, 3, vec![7u8; 100]).to_bytes();
        let sender = std::thread::spawn(move || {
            for b in bytes {
                if peer.write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        assert!(matches!(reader.read_frame(), Err(Error::Stalled { .. })));
        drop(reader);
        sender.join().unwrap();
    }

    #[test]
    fn literal_bytes_round_trip() {
        // CLOSE, request id 7, no payload.
        let bytes = [0, 0, 0, 9, 0x12, 0, 0, 0, 0, 0, 0, 0, 7];
        let (frame, used) = Frame::parse(&bytes, DEFAULT_MAX_FRAME).unwrap().unwrap();
        assert_eq!(used, 13);
        assert_eq!(frame.kind, Kind::Close);
        assert_eq!(frame.request_id, 7);
        assert!(frame.payload.is_empty());
        assert_eq!(frame.to_bytes(), bytes);
    }

    #[test]
    fn partial_input_is_not_an_error() {
        let bytes = Frame::new(Kind::Eval, 1, vec![1, 2, 3]).to_bytes();
        for cut in 0..bytes.len() {
            assert!(
                Frame::parse(&bytes[..cut], DEFAULT_MAX_FRAME)
                    .unwrap()
                    .is_none(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn oversized_prefix_is_refused_before_the_body_arrives() {
        let bytes = [0xff, 0xff, 0xff, 0xff];
        match Frame::parse(&bytes, 1024) {
            Err(Error::FrameTooLarge { size, max }) => {
                assert_eq!(size, u64::from(u32::MAX));
                assert_eq!(max, 1024);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        let mut reader = FrameReader::new(Cursor::new(vec![0xff, 0xff, 0xff, 0xff, 0x10]), 1024);
        assert!(matches!(
            reader.read_frame(),
            Err(Error::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn too_small_length_and_unknown_kind_are_refused() {
        assert!(matches!(
            Frame::parse(&[0, 0, 0, 3, 1, 2, 3], 1024),
            Err(Error::FrameTooSmall { size: 3 })
        ));
        let mut bytes = Frame::new(Kind::Close, 0, vec![]).to_bytes();
        bytes[4] = 0x7f;
        assert!(matches!(
            Frame::parse(&bytes, 1024),
            Err(Error::UnknownKind(0x7f))
        ));
    }

    #[test]
    fn reader_distinguishes_clean_close_from_truncation() {
        let mut r = FrameReader::new(Cursor::new(Vec::new()), 1024);
        assert!(matches!(r.read_frame(), Err(Error::ConnectionClosed)));
        let bytes = Frame::new(Kind::Eval, 3, vec![9; 20]).to_bytes();
        for cut in 1..bytes.len() {
            for trusted in [false, true] {
                let mut r = FrameReader::new(Cursor::new(bytes[..cut].to_vec()), 1024);
                if trusted {
                    r.set_max_frame(1024);
                }
                assert!(
                    matches!(r.read_frame(), Err(Error::Truncated { .. })),
                    "cut {cut}"
                );
            }
        }
    }

    #[test]
    fn kind_table_round_trips() {
        for kind in Kind::ALL {
            assert_eq!(Kind::try_from(*kind as u8).unwrap(), *kind);
        }
    }

    #[test]
    fn debug_never_prints_the_payload() {
        let f = Frame::new(Kind::Eval, 5, b"secret-token".to_vec());
        let text = format!("{f:?}");
        assert!(!text.contains("secret"));
        assert!(text.contains("payload_len: 12"));
    }

    fn any_kind() -> impl Strategy<Value = Kind> {
        proptest::sample::select(Kind::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn frames_round_trip_through_reader_and_writer(
            frames in proptest::collection::vec((any_kind(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..8)
        ) {
            let mut w = FrameWriter::new(Vec::new());
            for (k, id, p) in &frames {
                w.write_frame(&Frame::new(*k, *id, p.clone())).unwrap();
            }
            let bytes = w.into_inner();
            let mut r = FrameReader::new(Cursor::new(bytes.clone()), DEFAULT_MAX_FRAME);
            // After the handshake the payload is read into one exact allocation.
            let mut trusted = FrameReader::new(Cursor::new(bytes), 0);
            trusted.set_max_frame(DEFAULT_MAX_FRAME);
            prop_assert!(trusted.is_trusted() && !r.is_trusted());
            for (k, id, p) in &frames {
                prop_assert_eq!(&trusted.read_frame().unwrap(), &Frame::new(*k, *id, p.clone()));
                let f = r.read_frame().unwrap();
                prop_assert_eq!(f.kind, *k);
                prop_assert_eq!(f.request_id, *id);
                prop_assert_eq!(&f.payload, p);
            }
            prop_assert!(matches!(r.read_frame(), Err(Error::ConnectionClosed)));
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), max in 0u32..400) {
            let _ = Frame::parse(&bytes, max);
            let mut r = FrameReader::new(Cursor::new(bytes), max);
            for _ in 0..4 {
                if r.read_frame().is_err() { break; }
            }
        }
    }
}

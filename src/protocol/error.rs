//! Errors of the wire layer: one variant per rule a peer can break, carrying
//! the numbers that explain it, so a log line says exactly what was wrong.

use std::fmt;
use std::io;

/// Everything that can go wrong while reading or writing frames.
#[derive(Debug)]
pub enum Error {
    /// The peer closed the stream cleanly between two frames.
    ConnectionClosed,
    /// The stream ended in the middle of a frame.
    Truncated { needed: usize, got: usize },
    /// The length prefix exceeds the negotiated maximum; nothing was allocated.
    FrameTooLarge { size: u64, max: u32 },
    /// The length prefix is too small to hold a frame header.
    FrameTooSmall { size: u32 },
    /// The frame kind byte is not one this protocol version defines.
    UnknownKind(u8),
    /// A payload field ran past the end of the payload.
    PayloadTruncated {
        field: &'static str,
        needed: usize,
        remaining: usize,
    },
    /// The payload had bytes left over after its last field.
    TrailingBytes { kind: &'static str, extra: usize },
    /// A string field was not UTF-8.
    InvalidUtf8 { field: &'static str },
    /// An enumerated field held a value this version does not define.
    InvalidValue { field: &'static str, value: u64 },
    /// A message of this kind is not allowed on this stream or at this point.
    Unexpected {
        kind: &'static str,
        expected: &'static str,
    },
    /// A frame began but the rest of it did not arrive within the frame timeout.
    Stalled {
        timeout: std::time::Duration,
        got: usize,
    },
    /// The underlying stream failed.
    Io(io::Error),
}

impl Error {
    /// True when a socket timeout passed (`set_read_timeout`/`set_write_timeout`).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Io(e) if timed_out(e))
    }

    /// True when the peer just went away (a client leaving, not a fault).
    pub fn is_disconnect(&self) -> bool {
        match self {
            Error::ConnectionClosed => true,
            Error::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ConnectionClosed => write!(f, "connection closed by peer"),
            Error::Truncated { needed, got } => {
                write!(
                    f,
                    "stream ended inside a frame: needed {needed} bytes, got {got}"
                )
            }
            Error::FrameTooLarge { size, max } => {
                write!(
                    f,
                    "frame of {size} bytes exceeds the maximum of {max} bytes"
                )
            }
            Error::FrameTooSmall { size } => {
                write!(
                    f,
                    "frame length {size} is smaller than the 9-byte frame header"
                )
            }
            Error::UnknownKind(k) => write!(f, "unknown frame kind 0x{k:02x}"),
            Error::PayloadTruncated {
                field,
                needed,
                remaining,
            } => write!(
                f,
                "payload truncated at field `{field}`: needed {needed} bytes, {remaining} remain"
            ),
            Error::TrailingBytes { kind, extra } => {
                write!(f, "{extra} unexpected bytes after the last field of {kind}")
            }
            Error::InvalidUtf8 { field } => write!(f, "field `{field}` is not valid UTF-8"),
            Error::InvalidValue { field, value } => {
                write!(f, "field `{field}` has undefined value {value}")
            }
            Error::Unexpected { kind, expected } => {
                write!(f, "unexpected {kind} frame; expected {expected}")
            }
            Error::Stalled { timeout, got } => write!(
                f,
                "a frame stalled: {got} bytes of it arrived and the rest did not within {} s \
                 (the server's --frame-timeout)",
                timeout.as_secs_f64()
            ),
            Error::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Whether an I/O error is a socket timeout passing (Linux reports it as
/// `WouldBlock`, other systems as `TimedOut`).
pub(crate) fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

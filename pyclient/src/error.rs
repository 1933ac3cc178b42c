//! The client's own error type: one variant per way a session call can fail,
//! each carrying enough to tell the user what happened and what to do.
//!
//! Nothing here knows Python. `lib.rs` turns a [`ClientError`] into a Python
//! exception in exactly one function (`to_pyerr`), by the name returned from
//! [`ClientError::python_class`], which names a class in `pyproxy._errors`.

use std::fmt;

use pyproxy::protocol::ErrorCode;

/// Why a call into the session failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// No TCP connection could be made, or the handshake did not finish in time.
    ConnectFailed { address: String, reason: String },
    /// The token was missing, refused, or the server could not prove it knows it.
    Auth(String),
    /// Client and server disagree on the protocol or Python version.
    VersionMismatch(String),
    /// The server sent something this protocol version does not allow.
    Protocol(String),
    /// The server refused the session, or one of its connections before the
    /// handshake, for a reason other than auth or version. `what` names what
    /// was refused ("the session", "the connection", ...); `message` is the
    /// server's own text.
    Refused {
        address: String,
        what: &'static str,
        code: ErrorCode,
        message: String,
    },
    /// The session is gone; `cause` says why (never retried).
    SessionClosed { cause: String },
    /// The server answered one request with `ERROR` instead of a `RESULT`.
    AtomRefused {
        atom: u64,
        code: ErrorCode,
        message: String,
    },
    /// An atom would not fit in one frame the server accepts.
    TooLarge { size: usize, max: u32 },
}

impl ClientError {
    /// Name of the exception class in `pyproxy._errors` (or builtins) this error becomes.
    pub fn python_class(&self) -> &'static str {
        match self {
            ClientError::ConnectFailed { .. } => "ConnectFailed",
            ClientError::Auth(_) => "AuthError",
            ClientError::VersionMismatch(_) => "VersionMismatch",
            ClientError::Protocol(_) => "ProtocolError",
            ClientError::Refused { .. } => "SessionRefused",
            ClientError::SessionClosed { .. } => "SessionClosed",
            ClientError::AtomRefused { .. } => "RemoteError",
            ClientError::TooLarge { .. } => "ValueError",
        }
    }
}

/// The spec's name of an error code, as the server's log and docs write it.
pub fn code_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadFrame => "BAD_FRAME",
        ErrorCode::AuthFailed => "AUTH_FAILED",
        ErrorCode::VersionMismatch => "VERSION_MISMATCH",
        ErrorCode::UnexpectedMessage => "UNEXPECTED_MESSAGE",
        ErrorCode::LimitExceeded => "LIMIT_EXCEEDED",
        ErrorCode::AttachRefused => "ATTACH_REFUSED",
        ErrorCode::UnsupportedBackend => "UNSUPPORTED_BACKEND",
        ErrorCode::Internal => "INTERNAL",
        ErrorCode::Timeout => "TIMEOUT",
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::ConnectFailed { address, reason } => write!(
                f,
                "could not open a PyProxy session to {address}: {reason}; \
                 check that pyproxy-server is running and listening there"
            ),
            ClientError::Auth(m) | ClientError::VersionMismatch(m) | ClientError::Protocol(m) => {
                f.write_str(m)
            }
            ClientError::Refused {
                address,
                what,
                code,
                message,
            } => write!(
                f,
                "the server at {address} refused {what} ({}): {message}",
                code_name(*code)
            ),
            ClientError::SessionClosed { cause } => f.write_str(cause),
            ClientError::AtomRefused {
                atom,
                code,
                message,
            } => write!(
                f,
                "the server refused atom {atom} ({}): {message}",
                code_name(*code)
            ),
            ClientError::TooLarge { size, max } => write!(
                f,
                "the atom is {size} bytes pickled, more than the {max} bytes the server \
                 accepts in one frame; send less data (e.g. load it on the server side)"
            ),
        }
    }
}

impl std::error::Error for ClientError {}

pub type Result<T> = std::result::Result<T, ClientError>;

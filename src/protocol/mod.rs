//! The PyProxy wire protocol, byte for byte as `docs/protocol.md` specifies it.
//!
//! Nothing here touches Python: the client extension and the server share it.
//! Frames ([`frame`]) carry typed messages ([`message`]) whose fields use the
//! encodings in [`codec`]; [`auth`] is the token proof of the handshake.

pub mod auth;
pub mod buffer;
pub mod codec;
pub mod error;
pub mod frame;
pub mod message;

pub use buffer::Buffer;
pub use error::{Error, Result};
pub use frame::{Frame, FrameReader, FrameWriter, Header, Kind, DEFAULT_MAX_FRAME, HEADER_SIZE};
pub use message::*;

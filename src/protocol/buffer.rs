//! Out-of-band buffers: the large byte strings (a `bytes` argument, an array's
//! data) that travel after the pickles of an `EVAL` or a `RESULT` value instead
//! of inside them (`docs/protocol.md`, "Out-of-band buffers").
//!
//! A [`Buffer`] is a slice of a shared, immutable allocation — usually the
//! frame it arrived in — so decoding a frame hands its buffers out without
//! copying them, and a `Buffer` can be passed between threads and kept alive by
//! whoever still needs it (the engine while an atom loads its arguments, the
//! client's `Value` views while Python reads them).

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

/// Immutable bytes: `data[range]`. Invariant: `range` lies within `data`.
#[derive(Clone)]
pub struct Buffer {
    data: Arc<Vec<u8>>,
    range: Range<usize>,
}

impl Buffer {
    /// The bytes `data[range]`. Panics if `range` is not within `data`.
    pub fn new(data: Arc<Vec<u8>>, range: Range<usize>) -> Buffer {
        assert!(
            range.start <= range.end && range.end <= data.len(),
            "buffer range {range:?} outside {} bytes",
            data.len()
        );
        Buffer { data, range }
    }
}

impl From<Vec<u8>> for Buffer {
    fn from(v: Vec<u8>) -> Buffer {
        let range = 0..v.len();
        Buffer {
            data: Arc::new(v),
            range,
        }
    }
}

impl From<&[u8]> for Buffer {
    fn from(v: &[u8]) -> Buffer {
        Buffer::from(v.to_vec())
    }
}

impl Deref for Buffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.data[self.range.clone()]
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl PartialEq for Buffer {
    fn eq(&self, other: &Buffer) -> bool {
        **self == **other
    }
}

impl Eq for Buffer {}

/// Shows the length, never the bytes.
impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Buffer({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_is_its_range() {
        let data = Arc::new(b"hello world".to_vec());
        let b = Buffer::new(Arc::clone(&data), 6..11);
        assert_eq!(&*b, b"world");
        assert_eq!(b, Buffer::from(&b"world"[..]));
        assert_eq!(format!("{b:?}"), "Buffer(5 bytes)");
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn a_range_past_the_data_panics() {
        let _ = Buffer::new(Arc::new(vec![0; 4]), 2..5);
    }
}

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

/// Buffers at least this large are advised to use transparent huge pages.
const HUGE_MIN: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// A zeroed `Vec` of `len` bytes, for data about to be read or copied into it.
/// A large one is fresh `mmap`'d memory (`calloc` leaves it untouched), which
/// [`advise_huge_pages`] lets the kernel back with 2 MiB pages: filling 64 MiB
/// then takes 32 page faults instead of 16,384, which is most of what a copy
/// into fresh memory costs on these machines.
pub fn zeroed(len: usize) -> Vec<u8> {
    let v = vec![0u8; len];
    advise_huge_pages(v.as_ptr(), len);
    v
}

/// Advises the kernel to back the 2 MiB-aligned part of `[ptr, ptr + len)`
/// with transparent huge pages (`MADV_HUGEPAGE`; THP is `madvise`-only on these
/// machines). Call before the memory is first touched. Contents are unchanged
/// whatever the kernel does; small ranges and other systems are left alone.
pub fn advise_huge_pages(ptr: *const u8, len: usize) {
    if len < HUGE_MIN {
        return;
    }
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
    let end = (ptr as usize + len) / HUGE_PAGE * HUGE_PAGE;
    #[cfg(target_os = "linux")]
    if end > start {
        // SAFETY: the range lies within the caller's allocation; the advice
        // changes how pages are backed, never their contents.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, end);
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
    fn zeroed_buffers_are_zero_and_writable() {
        let mut v = zeroed(9 << 20);
        assert!(v.iter().all(|&b| b == 0));
        v[5 << 20] = 1;
        assert_eq!(zeroed(3), [0, 0, 0]);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn a_range_past_the_data_panics() {
        let _ = Buffer::new(Arc::new(vec![0; 4]), 2..5);
    }
}

//! Out-of-band buffers: the large byte strings (a `bytes` argument, an array's
//! data) that travel after the pickles of an `EVAL` or a `RESULT` value instead
//! of inside them (`docs/protocol.md`, "Out-of-band buffers").
//!
//! A [`Buffer`] is a slice of a shared, immutable allocation — usually the
//! frame it arrived in — so decoding a frame hands its buffers out without
//! copying them, and a `Buffer` can be passed between threads and kept alive by
//! whoever still needs it (the engine while an atom loads its arguments, the
//! client's `Value` views while Python reads them).
//!
//! Large allocations are what a payload costs most on these machines: a copy
//! into fresh memory pays a page fault and a page clear per 4 KiB (~30 ms for
//! 64 MiB, against ~7 ms for the copy itself). So large buffers are backed by
//! huge pages ([`advise_huge_pages`]), and the storage of a large `Buffer` goes
//! back to a small process-wide pool when its last handle drops, for the next
//! large frame to be read into ([`for_writing`]).

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::{Arc, Mutex};

/// Immutable bytes: `data[range]`. Invariant: `range` lies within `data`.
#[derive(Clone)]
pub struct Buffer {
    data: Arc<Storage>,
    range: Range<usize>,
}

/// The allocation behind one or more buffers; recycled when the last goes.
struct Storage(Vec<u8>);

impl Drop for Storage {
    fn drop(&mut self) {
        recycle(std::mem::take(&mut self.0));
    }
}

impl Buffer {
    /// Buffers `data[r]` for each of `ranges`, sharing `data`. Panics if a
    /// range is not within `data`.
    pub fn split(data: Vec<u8>, ranges: Vec<Range<usize>>) -> Vec<Buffer> {
        for range in &ranges {
            assert!(
                range.start <= range.end && range.end <= data.len(),
                "buffer range {range:?} outside {} bytes",
                data.len()
            );
        }
        let data = Arc::new(Storage(data));
        ranges
            .into_iter()
            .map(|range| Buffer {
                data: Arc::clone(&data),
                range,
            })
            .collect()
    }
}

impl From<Vec<u8>> for Buffer {
    fn from(v: Vec<u8>) -> Buffer {
        let range = 0..v.len();
        Buffer {
            data: Arc::new(Storage(v)),
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
        &self.data.0[self.range.clone()]
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

/// At most this many storages wait in the pool, holding at most
/// [`POOL_BYTES`] together.
const POOL_MAX: usize = 2;
const POOL_BYTES: usize = 160 << 20;

/// Large storages whose buffers are all gone, for [`for_writing`] to reuse.
static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn pool() -> std::sync::MutexGuard<'static, Vec<Vec<u8>>> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps a large allocation for reuse if the pool has room; else frees it.
/// Its pages are marked `MADV_FREE`: the kernel may take them back under
/// memory pressure (a later write then faults in fresh ones), and otherwise
/// the next frame is read into them without a single fault.
fn recycle(v: Vec<u8>) {
    if v.capacity() < HUGE_MIN {
        return;
    }
    let mut pool = pool();
    let held: usize = pool.iter().map(Vec::capacity).sum();
    if pool.len() < POOL_MAX && held + v.capacity() <= POOL_BYTES {
        advise_free(v.as_ptr(), v.capacity());
        pool.push(v);
    }
}

/// A `Vec` of `len` bytes for data about to be read or copied into all of it:
/// its contents are unspecified (zeros, or the bytes of an earlier buffer of
/// this process), so the caller must overwrite every byte before anyone reads
/// it. A large one comes from the pool when it holds one of a fitting size
/// (no page faults at all), else it is fresh memory advised to use huge pages:
/// filling 64 MiB then takes 32 page faults instead of 16,384.
pub fn for_writing(len: usize) -> Vec<u8> {
    if len >= HUGE_MIN {
        let mut pool = pool();
        let fit = (0..pool.len())
            .filter(|&i| pool[i].capacity() >= len && pool[i].capacity() / 2 <= len)
            .min_by_key(|&i| pool[i].capacity());
        if let Some(i) = fit {
            let mut v = pool.swap_remove(i);
            drop(pool);
            v.resize(len, 0);
            return v;
        }
    }
    let v = vec![0u8; len];
    advise_huge_pages(v.as_ptr(), len);
    v
}

/// `madvise(MADV_FREE)` on the whole pages of `[ptr, ptr + len)`: the kernel
/// may take them back under memory pressure, and a later write then faults in
/// zeroed ones; until then they keep their contents.
pub fn advise_free(ptr: *const u8, len: usize) {
    let page = 4096;
    let start = (ptr as usize).next_multiple_of(page);
    let end = (ptr as usize + len) / page * page;
    #[cfg(target_os = "linux")]
    if end > start {
        // SAFETY: the range lies within an allocation the pool owns and nobody
        // reads until it has been overwritten (see `for_writing`).
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_FREE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, end);
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
        let bs = Buffer::split(b"hello world".to_vec(), vec![6..11, 0..5]);
        let b = &bs[0];
        assert_eq!(&**b, b"world");
        assert_eq!(&*bs[1], b"hello");
        assert_eq!(*b, Buffer::from(&b"world"[..]));
        assert_eq!(format!("{b:?}"), "Buffer(5 bytes)");
    }

    #[test]
    fn large_storages_are_reused_once_their_buffers_are_gone() {
        let mut v = for_writing(9 << 20);
        assert_eq!(v.len(), 9 << 20);
        v.fill(7);
        let ptr = v.as_ptr();
        let bufs = Buffer::split(v, vec![0..10, 10..20]);
        drop(bufs[0].clone());
        drop(bufs);
        // Other tests may take it first; when this one does, it is the same memory.
        let w = for_writing(8 << 20);
        assert_eq!(w.len(), 8 << 20);
        if w.as_ptr() == ptr {
            assert!(w.capacity() >= 9 << 20);
        }
        // Too small to pool, too large for what is pooled: fresh.
        assert_eq!(for_writing(3), [0, 0, 0]);
        let big = for_writing(40 << 20);
        assert!(big.iter().all(|&b| b == 0) || big.as_ptr() != ptr);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn a_range_past_the_data_panics() {
        let _ = Buffer::split(vec![0; 4], vec![0..1, 2..5]);
    }
}

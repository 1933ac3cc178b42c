//! CPython's arenas — obmalloc's 1 MiB arenas and each thread state's 16 KiB
//! frame stack chunks — are kept for reuse when freed, a few at a time.
//!
//! CPython maps each arena with `mmap` and unmaps it as soon as it is empty.
//! An executor's thread state for an interpreter is made anew for each
//! session (a reset deletes them), and its first frame maps a data stack
//! chunk: in a perf profile of W5 that `mmap` and its page faults were a
//! quarter of the first atom's time in Python. Keeping up to [`KEEP`] freed
//! blocks (at most 8 MiB, still faulted in) hands the next arena of the same
//! size back without a system call.
//!
//! The hook wraps the arena allocator found at install time (CPython's
//! default: `mmap`/`munmap`), so a block it did not keep goes back the way it
//! came. CPython does not rely on arenas being zeroed: obmalloc initialises
//! each pool it carves and a data stack chunk its header, as they must for any
//! allocator `PyObject_SetArenaAllocator` installs.

use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

use pyo3::ffi;

/// Freed blocks kept at most (of any size CPython frees).
const KEEP: usize = 8;
/// Blocks larger than this are never kept.
const KEEP_MAX: usize = 1 << 20;

struct Inner(ffi::PyObjectArenaAllocator);

// SAFETY: CPython's arena allocator is called from every interpreter's
// threads; the default one (mmap) has no state behind `ctx`.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

static INNER: OnceLock<Inner> = OnceLock::new();

/// Freed blocks kept for reuse, as (address, size).
struct Kept(Vec<(usize, usize)>);

impl Kept {
    /// A kept block of exactly `size` bytes, if any.
    fn take(&mut self, size: usize) -> Option<usize> {
        let at = self.0.iter().position(|&(_, s)| s == size)?;
        Some(self.0.swap_remove(at).0)
    }

    /// Keeps a freed block if there is room and it is not too large.
    fn keep(&mut self, addr: usize, size: usize) -> bool {
        if size > KEEP_MAX || self.0.len() >= KEEP {
            return false;
        }
        self.0.push((addr, size));
        true
    }
}

static KEPT: Mutex<Kept> = Mutex::new(Kept(Vec::new()));

fn kept() -> std::sync::MutexGuard<'static, Kept> {
    KEPT.lock().unwrap_or_else(|e| e.into_inner())
}

fn inner() -> &'static ffi::PyObjectArenaAllocator {
    &INNER.get().expect("arena hook called before install").0
}

extern "C" fn hook_alloc(_ctx: *mut c_void, size: usize) -> *mut c_void {
    if let Some(addr) = kept().take(size) {
        return addr as *mut c_void;
    }
    let a = inner();
    // Forwarding to the allocator the hook replaced (its fields are safe fn pointers).
    a.alloc.expect("arena alloc")(a.ctx, size)
}

extern "C" fn hook_free(_ctx: *mut c_void, ptr: *mut c_void, size: usize) {
    if ptr.is_null() || kept().keep(ptr as usize, size) {
        return;
    }
    let a = inner();
    // `ptr` came from that allocator (directly, or kept by us).
    a.free.expect("arena free")(a.ctx, ptr, size)
}

/// Installs the hook; call before `Py_Initialize*` (later is also sound: the
/// blocks CPython mapped before are freed through the hook to the same
/// allocator). Idempotent.
pub(crate) fn install() {
    // SAFETY: Get/SetArenaAllocator copy the struct; the hook forwards every
    // call it does not serve to the allocator it replaces.
    unsafe {
        let mut current: ffi::PyObjectArenaAllocator = std::mem::zeroed();
        ffi::PyObject_GetArenaAllocator(&mut current);
        if INNER.set(Inner(current)).is_err() {
            return;
        }
        let mut hook = ffi::PyObjectArenaAllocator {
            ctx: std::ptr::null_mut(),
            alloc: Some(hook_alloc),
            free: Some(hook_free),
        };
        ffi::PyObject_SetArenaAllocator(&mut hook);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_block_comes_back_for_its_size_and_no_more_than_keep_are_kept() {
        let mut k = Kept(Vec::new());
        assert!(k.keep(0x1000, 16 * 1024));
        assert!(k.keep(0x9000, 1 << 20));
        assert_eq!(
            k.take(8 * 1024),
            None,
            "only a block of the same size is reused"
        );
        assert_eq!(k.take(16 * 1024), Some(0x1000));
        assert_eq!(k.take(16 * 1024), None, "each block is handed out once");
        assert!(
            !k.keep(0x2000, KEEP_MAX + 1),
            "large blocks go back to the OS"
        );
        for i in 1..KEEP {
            assert!(k.keep(0x10_0000 * i, 4096));
        }
        assert!(!k.keep(0xf000_0000, 4096), "at most KEEP blocks are kept");
        assert_eq!(k.take(1 << 20), Some(0x9000));
    }
}

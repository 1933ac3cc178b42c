//! Large allocations of the embedded interpreter get transparent huge pages.
//!
//! Python objects of more than 512 bytes come from CPython's raw allocator
//! (`malloc`). A 64 MiB `bytes` an atom builds is 16,384 page faults on 4 KiB
//! pages, ~30 ms on this VM against ~9 ms on huge pages (`docs/performance.md`,
//! "W4 payload"), and an untouched `bytes(n)` (calloc) is read through 16,384
//! faults on the zero page when its result is sent. THP is `madvise`-only on
//! common distributions, so nothing of Python's gets huge pages unless asked.
//!
//! The hook wraps the raw domain's allocator (CPython's default, `malloc`; with
//! `PYTHONMALLOC` or `PYTHONDEVMODE` set, CPython installs its own allocators
//! over it and the hook is never called) and advises the kernel about the
//! 2 MiB-aligned interior of allocations of at least 4 MiB
//! ([`buffer::advise_huge_pages`]).
//!
//! Fresh memory is the other half of the cost: the kernel zeroes every page it
//! maps, 40 % of the server's CPU while 64 MiB arguments arrive one after
//! another. So the hook also keeps up to two freed blocks of at least 4 MiB
//! (160 MiB together, `MADV_FREE` while kept, so the kernel may still reclaim
//! them) and hands one back to a `malloc` of a size it fits: an atom's large
//! argument then lands in the pages the previous one left. `calloc` never
//! takes a kept block (it would have to zero it).

use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

use pyo3::ffi;

use crate::protocol::buffer;

/// The raw allocator found when the hook was installed; every call goes to it.
struct Inner(ffi::PyMemAllocatorEx);

// SAFETY: the allocator's `ctx` is CPython's, shared by every thread that
// allocates (the raw domain is thread-safe by contract: no GIL needed).
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

static INNER: OnceLock<Inner> = OnceLock::new();

fn inner() -> &'static ffi::PyMemAllocatorEx {
    // Installed before the hook can be called (see `install`).
    &INNER
        .get()
        .expect("huge_alloc hook called before install")
        .0
}

extern "C" fn hook_malloc(_ctx: *mut c_void, size: usize) -> *mut c_void {
    if let Some(p) = take_kept(size) {
        return p;
    }
    let a = inner();
    let p = a.malloc.expect("raw malloc")(a.ctx, size);
    advise(p, size);
    p
}

extern "C" fn hook_calloc(_ctx: *mut c_void, nelem: usize, elsize: usize) -> *mut c_void {
    let a = inner();
    let p = a.calloc.expect("raw calloc")(a.ctx, nelem, elsize);
    advise(p, nelem.saturating_mul(elsize));
    p
}

extern "C" fn hook_realloc(_ctx: *mut c_void, ptr: *mut c_void, size: usize) -> *mut c_void {
    let a = inner();
    let p = a.realloc.expect("raw realloc")(a.ctx, ptr, size);
    // Pages already touched keep their backing; the advice covers the rest.
    advise(p, size);
    p
}

extern "C" fn hook_free(_ctx: *mut c_void, ptr: *mut c_void) {
    if keep(ptr) {
        return;
    }
    let a = inner();
    a.free.expect("raw free")(a.ctx, ptr)
}

/// Blocks at least this large are kept when freed.
const KEEP_MIN: usize = 4 << 20;
const KEEP_MAX: usize = 2;
const KEEP_BYTES: usize = 160 << 20;

/// A freed block: its address and usable size.
#[derive(Clone, Copy)]
struct Kept {
    ptr: usize,
    size: usize,
}

/// A fixed array: the allocator hook must not allocate while it holds the lock.
static KEPT: Mutex<[Option<Kept>; KEEP_MAX]> = Mutex::new([None; KEEP_MAX]);

fn kept() -> std::sync::MutexGuard<'static, [Option<Kept>; KEEP_MAX]> {
    KEPT.lock().unwrap_or_else(|e| e.into_inner())
}

/// A kept block of at least `size` bytes and at most twice that, if any.
fn take_kept(size: usize) -> Option<*mut c_void> {
    if size < KEEP_MIN {
        return None;
    }
    let mut slots = kept();
    let fit = slots
        .iter()
        .enumerate()
        .filter_map(|(i, k)| k.map(|k| (i, k.size)))
        .filter(|&(_, have)| have >= size && have / 2 <= size)
        .min_by_key(|&(_, have)| have)?;
    slots[fit.0].take().map(|k| k.ptr as *mut c_void)
}

/// Keeps a freed block for [`take_kept`] if it is large and there is room.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep(ptr: *mut c_void) -> bool {
    if ptr.is_null() {
        return false;
    }
    // SAFETY: `ptr` was returned by the wrapped allocator, which is glibc's
    // malloc (see the module comment), and has not been freed.
    let size = unsafe { libc::malloc_usable_size(ptr) };
    if size < KEEP_MIN {
        return false;
    }
    let mut slots = kept();
    let held: usize = slots.iter().flatten().map(|k| k.size).sum();
    let Some(free) = slots.iter_mut().find(|k| k.is_none()) else {
        return false;
    };
    if held + size > KEEP_BYTES {
        return false;
    }
    buffer::advise_free(ptr.cast::<u8>(), size);
    *free = Some(Kept {
        ptr: ptr as usize,
        size,
    });
    true
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep(_ptr: *mut c_void) -> bool {
    false
}

fn advise(p: *mut c_void, size: usize) {
    if !p.is_null() {
        buffer::advise_huge_pages(p.cast::<u8>(), size);
    }
}

/// Wraps the raw domain's allocator. Call before `Py_InitializeFromConfig`
/// (so every raw allocation goes through one allocator); a second call does
/// nothing.
pub(crate) fn install() {
    if INNER.get().is_some() {
        return;
    }
    // SAFETY: PyMem_GetAllocator/SetAllocator may be called before the
    // runtime is initialised; the hook forwards every call to the allocator
    // it replaces, so memory allocated before or after is freed by the same code.
    unsafe {
        let mut current: ffi::PyMemAllocatorEx = std::mem::zeroed();
        ffi::PyMem_GetAllocator(ffi::PyMemAllocatorDomain::PYMEM_DOMAIN_RAW, &mut current);
        if INNER.set(Inner(current)).is_err() {
            return;
        }
        let mut hook = ffi::PyMemAllocatorEx {
            ctx: std::ptr::null_mut(),
            malloc: Some(hook_malloc),
            calloc: Some(hook_calloc),
            realloc: Some(hook_realloc),
            free: Some(hook_free),
        };
        ffi::PyMem_SetAllocator(ffi::PyMemAllocatorDomain::PYMEM_DOMAIN_RAW, &mut hook);
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    // One test: the kept blocks are process-wide.
    #[test]
    fn freed_large_blocks_are_reused_by_malloc_but_never_by_calloc() {
        install();
        let n = 8 << 20;
        let first = hook_malloc(std::ptr::null_mut(), n);
        assert!(!first.is_null());
        // SAFETY: `first` is a fresh block of `n` bytes.
        unsafe { std::ptr::write_bytes(first.cast::<u8>(), 0x77, n) };
        hook_free(std::ptr::null_mut(), first);
        assert_eq!(
            hook_malloc(std::ptr::null_mut(), n),
            first,
            "the freed block comes back"
        );
        hook_free(std::ptr::null_mut(), first);

        // calloc must return zeros: it never takes the kept block.
        let zeroed = hook_calloc(std::ptr::null_mut(), n, 1);
        assert_ne!(zeroed, first);
        // SAFETY: `zeroed` is a block of `n` bytes.
        let all_zero = unsafe { std::slice::from_raw_parts(zeroed.cast::<u8>(), n) }
            .iter()
            .all(|&b| b == 0);
        assert!(all_zero);

        // A block more than twice the size asked for stays kept.
        let small = hook_malloc(std::ptr::null_mut(), KEEP_MIN);
        assert_ne!(small, first);

        // At most two blocks are kept: the third one freed goes back to malloc.
        hook_free(std::ptr::null_mut(), zeroed);
        let third = hook_malloc(std::ptr::null_mut(), 16 << 20);
        hook_free(std::ptr::null_mut(), third);
        assert_eq!(kept().iter().flatten().count(), 2);
        assert!(kept().iter().flatten().all(|k| k.ptr != third as usize));

        hook_free(std::ptr::null_mut(), small);
        let again = [
            hook_malloc(std::ptr::null_mut(), n),
            hook_malloc(std::ptr::null_mut(), n),
        ];
        assert!(again.contains(&first) && again.contains(&zeroed));
        assert!(kept().iter().all(Option::is_none));
        for p in again {
            hook_free(std::ptr::null_mut(), p);
        }
    }
}

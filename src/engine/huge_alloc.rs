//! Large allocations of the embedded interpreter get transparent huge pages.
//!
//! Python objects of more than 512 bytes come from CPython's raw allocator
//! (`malloc`). A 64 MiB `bytes` an atom builds is 16,384 page faults on 4 KiB
//! pages, ~30 ms on this VM against ~9 ms on huge pages (`docs/performance.md`,
//! "W4 payload"), and an untouched `bytes(n)` (calloc) is read through 16,384
//! faults on the zero page when its result is sent. THP is `madvise`-only on
//! common distributions, so nothing of Python's gets huge pages unless asked.
//!
//! The hook wraps the raw domain's allocator (whatever it is: the default, or
//! the debug hooks `PYTHONMALLOC` installs) and only advises the kernel about
//! the 2 MiB-aligned interior of allocations of at least 4 MiB
//! ([`buffer::advise_huge_pages`]); it never changes which memory is returned
//! or how it is freed.

use std::ffi::c_void;
use std::sync::OnceLock;

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
    let a = inner();
    a.free.expect("raw free")(a.ctx, ptr)
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

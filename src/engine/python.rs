//! CPython as a process-wide resource: initialisation from a `PyConfig` (so a
//! virtualenv is honoured and Python installs no signal handlers), finalisation,
//! and the few raw-FFI helpers the rest of the engine shares.
//!
//! Everything here uses `pyo3::ffi` directly and nothing of pyo3's safe API:
//! pyo3 caches objects in process-wide statics, which would hand one
//! sub-interpreter's objects to another (see `../shared/notes/subinterpreters.md`).
//!
//! Thread-state discipline, followed by every engine thread: a thread rests with
//! *no* current thread state, enters an interpreter with
//! `PyEval_RestoreThread(ts)` and leaves it with `PyEval_SaveThread()`. Each
//! engine thread first creates an *anchor*, a thread state of the main
//! interpreter that lives as long as the thread. CPython binds every thread
//! state it activates to the thread's `PyGILState` slot, and the pool thread
//! deletes executors' sub-interpreter thread states (at a reset, at an
//! interpreter's end); so an executor re-binds its slot to its anchor after
//! every atom ([`Anchor::rebind`]), and the slot never names a deleted state.

use std::cell::UnsafeCell;
use std::ffi::{c_char, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr;

use pyo3::ffi;

use super::error::EngineError;
use crate::protocol::{buffer, Buffer};

/// An owned reference to a Python object. Must be created, used and dropped with
/// the GIL of the interpreter that owns the object held by the current thread.
pub(crate) struct PyRef(*mut ffi::PyObject);

impl PyRef {
    /// Takes ownership of a new reference; `None` when `ptr` is NULL (an error is set).
    pub(crate) unsafe fn new(ptr: *mut ffi::PyObject) -> Option<PyRef> {
        if ptr.is_null() {
            None
        } else {
            Some(PyRef(ptr))
        }
    }

    pub(crate) fn as_ptr(&self) -> *mut ffi::PyObject {
        self.0
    }

    /// Gives up ownership (for APIs that steal a reference).
    pub(crate) fn into_ptr(self) -> *mut ffi::PyObject {
        let p = self.0;
        std::mem::forget(self);
        p
    }
}

impl Drop for PyRef {
    fn drop(&mut self) {
        // SAFETY: the type's contract: the owning interpreter's GIL is held.
        unsafe { ffi::Py_DecRef(self.0) }
    }
}

/// `bytes` from a Rust slice.
pub(crate) unsafe fn bytes(data: &[u8]) -> Option<PyRef> {
    unsafe {
        PyRef::new(ffi::PyBytes_FromStringAndSize(
            data.as_ptr().cast(),
            data.len() as ffi::Py_ssize_t,
        ))
    }
}

/// What the `take` function of [`buffer_taker`] holds: shared handles on the
/// EVAL's buffers (no copy), freed with the capsule.
struct Taker {
    buffers: Vec<Buffer>,
}

const TAKER_NAME: &CStr = c"pyproxy.buffers";

/// A method definition in a `static`, for `PyCFunction_New`.
pub(crate) struct MethodDef(pub(crate) UnsafeCell<ffi::PyMethodDef>);
// SAFETY: CPython only reads the definition; it is never written.
unsafe impl Sync for MethodDef {}

static TAKE_DEF: MethodDef = MethodDef(UnsafeCell::new(ffi::PyMethodDef {
    ml_name: c"take".as_ptr(),
    ml_meth: ffi::PyMethodDefPointer { PyCFunction: take },
    ml_flags: ffi::METH_VARARGS,
    ml_doc: c"take(i, as_bytearray): out-of-band buffer i as a new bytes (or bytearray)".as_ptr(),
}));

/// `take(i, as_bytearray)`; `slf` is the capsule holding the [`Taker`].
unsafe extern "C" fn take(slf: *mut ffi::PyObject, args: *mut ffi::PyObject) -> *mut ffi::PyObject {
    unsafe {
        let taker = ffi::PyCapsule_GetPointer(slf, TAKER_NAME.as_ptr()).cast::<Taker>();
        if taker.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: the capsule owns the Taker until it is freed, which cannot
        // happen while this call holds the function (and so the capsule).
        let taker: &Taker = &*taker;
        let mut i: ffi::Py_ssize_t = 0;
        let mut as_bytearray: std::ffi::c_int = 0;
        if ffi::PyArg_ParseTuple(args, c"np".as_ptr(), &mut i, &mut as_bytearray) == 0 {
            return ptr::null_mut();
        }
        let Some(buf) = usize::try_from(i).ok().and_then(|i| taker.buffers.get(i)) else {
            ffi::PyErr_SetString(
                ffi::PyExc_IndexError,
                c"no such out-of-band buffer".as_ptr(),
            );
            return ptr::null_mut();
        };
        let n = buf.len() as ffi::Py_ssize_t;
        let (obj, dst) = if as_bytearray != 0 {
            let o = ffi::PyByteArray_FromStringAndSize(ptr::null(), n);
            (
                o,
                if o.is_null() {
                    ptr::null_mut()
                } else {
                    ffi::PyByteArray_AsString(o)
                },
            )
        } else {
            let o = ffi::PyBytes_FromStringAndSize(ptr::null(), n);
            (
                o,
                if o.is_null() {
                    ptr::null_mut()
                } else {
                    ffi::PyBytes_AsString(o)
                },
            )
        };
        if dst.is_null() {
            return obj; // NULL with the error set
        }
        // The one copy of this buffer on the server, into pages not yet touched.
        buffer::advise_huge_pages(dst.cast::<u8>(), buf.len());
        ptr::copy_nonoverlapping(buf.as_ptr(), dst.cast::<u8>(), buf.len());
        obj
    }
}

unsafe extern "C" fn drop_taker(capsule: *mut ffi::PyObject) {
    unsafe {
        let p = ffi::PyCapsule_GetPointer(capsule, TAKER_NAME.as_ptr());
        if p.is_null() {
            ffi::PyErr_Clear();
        } else {
            drop(Box::from_raw(p.cast::<Taker>()));
        }
    }
}

/// A builtin function `take(i, as_bytearray)` of the current interpreter that
/// returns out-of-band buffer `i` as a new `bytes` (or `bytearray`): the only
/// copy of it the server makes, into memory advised to use huge pages. It
/// shares `buffers` (no copy) for as long as Python keeps the function.
pub(crate) unsafe fn buffer_taker(buffers: &[Buffer]) -> Option<PyRef> {
    unsafe {
        let taker = Box::into_raw(Box::new(Taker {
            buffers: buffers.to_vec(),
        }));
        let Some(capsule) = PyRef::new(ffi::PyCapsule_New(
            taker.cast(),
            TAKER_NAME.as_ptr(),
            Some(drop_taker),
        )) else {
            drop(Box::from_raw(taker));
            return None;
        };
        PyRef::new(ffi::PyCFunction_New(TAKE_DEF.0.get(), capsule.as_ptr()))
    }
}

static READ_BYTES_DEF: MethodDef = MethodDef(UnsafeCell::new(ffi::PyMethodDef {
    ml_name: c"read_bytes".as_ptr(),
    ml_meth: ffi::PyMethodDefPointer {
        PyCFunction: read_bytes,
    },
    ml_flags: ffi::METH_VARARGS,
    ml_doc:
        c"read_bytes(fd, n): exactly n bytes read from fd into a new bytes; None at end of stream"
            .as_ptr(),
}));

/// `read_bytes(fd, n)`: reads exactly `n` bytes from `fd` (blocking) straight
/// into a new `bytes`, advised to use huge pages when large: the kernel's copy
/// is the only one. None if the stream ends first; `OSError` on a failed read.
unsafe extern "C" fn read_bytes(
    _slf: *mut ffi::PyObject,
    args: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    unsafe {
        let mut fd: std::ffi::c_int = 0;
        let mut n: ffi::Py_ssize_t = 0;
        if ffi::PyArg_ParseTuple(args, c"in".as_ptr(), &mut fd, &mut n) == 0 {
            return ptr::null_mut();
        }
        if n < 0 {
            ffi::PyErr_SetString(ffi::PyExc_ValueError, c"negative length".as_ptr());
            return ptr::null_mut();
        }
        let Some(obj) = PyRef::new(ffi::PyBytes_FromStringAndSize(ptr::null(), n)) else {
            return ptr::null_mut();
        };
        let dst = ffi::PyBytes_AsString(obj.as_ptr()).cast::<u8>();
        buffer::advise_huge_pages(dst, n as usize);
        let mut got = 0usize;
        let ts = ffi::PyEval_SaveThread();
        let failed = loop {
            if got == n as usize {
                break None;
            }
            let r = libc::read(fd, dst.add(got).cast(), n as usize - got);
            if r > 0 {
                got += r as usize;
            } else if r == 0 {
                break Some(None);
            } else {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    break Some(Some(e));
                }
            }
        };
        ffi::PyEval_RestoreThread(ts);
        match failed {
            None => obj.into_ptr(),
            Some(None) => none().into_ptr(),
            Some(Some(e)) => {
                let msg = CString::new(e.to_string()).unwrap_or_default();
                ffi::PyErr_SetString(ffi::PyExc_OSError, msg.as_ptr());
                ptr::null_mut()
            }
        }
    }
}

/// The builtin function `read_bytes(fd, n)` (see [`read_bytes`]), for the
/// fork worker to read an ATOM's out-of-band buffers with.
pub(crate) unsafe fn read_bytes_function() -> Option<PyRef> {
    unsafe {
        PyRef::new(ffi::PyCFunction_New(
            READ_BYTES_DEF.0.get(),
            ptr::null_mut(),
        ))
    }
}

/// Copies the bytes of any C-contiguous buffer object (`bytes`, a
/// `memoryview`…; borrowed reference). One copy, into a fresh `Vec` (huge
/// pages when large, see `protocol::buffer::for_writing`).
pub(crate) unsafe fn buffer_to_vec(obj: *mut ffi::PyObject) -> Option<Vec<u8>> {
    unsafe {
        let mut view: ffi::Py_buffer = std::mem::zeroed();
        if ffi::PyObject_GetBuffer(obj, &mut view, ffi::PyBUF_C_CONTIGUOUS) != 0 {
            ffi::PyErr_Clear();
            return None;
        }
        let src = std::slice::from_raw_parts(view.buf as *const u8, view.len as usize);
        let mut out = crate::protocol::buffer::for_writing(src.len());
        out.copy_from_slice(src);
        ffi::PyBuffer_Release(&mut view);
        Some(out)
    }
}

/// A new reference to `None`.
pub(crate) unsafe fn none() -> PyRef {
    unsafe {
        let p = ffi::Py_None();
        ffi::Py_IncRef(p);
        PyRef(p)
    }
}

/// Copies a `bytes` object's contents (borrowed reference).
pub(crate) unsafe fn bytes_to_vec(obj: *mut ffi::PyObject) -> Option<Vec<u8>> {
    unsafe {
        let mut data: *mut c_char = ptr::null_mut();
        let mut len: ffi::Py_ssize_t = 0;
        if ffi::PyBytes_AsStringAndSize(obj, &mut data, &mut len) != 0 {
            ffi::PyErr_Clear();
            return None;
        }
        Some(std::slice::from_raw_parts(data.cast::<u8>(), len as usize).to_vec())
    }
}

/// A `str` object's text (borrowed reference).
pub(crate) unsafe fn str_to_string(obj: *mut ffi::PyObject) -> Option<String> {
    unsafe {
        let mut len: ffi::Py_ssize_t = 0;
        let data = ffi::PyUnicode_AsUTF8AndSize(obj, &mut len);
        if data.is_null() {
            ffi::PyErr_Clear();
            return None;
        }
        let slice = std::slice::from_raw_parts(data.cast::<u8>(), len as usize);
        Some(String::from_utf8_lossy(slice).into_owned())
    }
}

/// Runs `source` as a new module `name` (`file` names it in tracebacks) and
/// returns the module. With `register` it goes into `sys.modules` first, so
/// that modules run after it can import it.
///
/// # Safety
/// The GIL of the interpreter the module is for is held.
pub(crate) unsafe fn exec_module(
    name: &str,
    file: &str,
    source: &str,
    register: bool,
) -> Result<PyRef, String> {
    let source = CString::new(source).expect("module source has no NUL");
    let file = CString::new(file).expect("no NUL");
    let cname = CString::new(name).expect("no NUL");
    // SAFETY: GIL held (caller); plain C-API calls with owned references.
    unsafe {
        let code = PyRef::new(ffi::Py_CompileString(
            source.as_ptr(),
            file.as_ptr(),
            ffi::Py_file_input,
        ))
        .ok_or_else(|| take_error())?;
        let module = PyRef::new(ffi::PyModule_New(cname.as_ptr())).ok_or_else(|| take_error())?;
        let dict = ffi::PyModule_GetDict(module.as_ptr()); // borrowed
        ffi::PyDict_SetItemString(dict, c"__builtins__".as_ptr(), ffi::PyEval_GetBuiltins());
        if register {
            ffi::PyDict_SetItemString(
                ffi::PyImport_GetModuleDict(),
                cname.as_ptr(),
                module.as_ptr(),
            );
        }
        PyRef::new(ffi::PyEval_EvalCode(code.as_ptr(), dict, dict))
            .ok_or_else(|| format!("{name}: {}", take_error()))?;
        Ok(module)
    }
}

/// Takes the current Python exception (if any) and describes it as
/// `TypeName: message`. Clears the error indicator.
pub(crate) unsafe fn take_error() -> String {
    unsafe {
        let Some(exc) = PyRef::new(ffi::PyErr_GetRaisedException()) else {
            return "unknown error (no exception set)".to_owned();
        };
        let tp = ffi::Py_TYPE(exc.as_ptr());
        let name = CStr::from_ptr((*tp).tp_name).to_string_lossy().into_owned();
        let message = PyRef::new(ffi::PyObject_Str(exc.as_ptr()))
            .and_then(|s| str_to_string(s.as_ptr()))
            .unwrap_or_default();
        ffi::PyErr_Clear();
        format!("{name}: {message}")
    }
}

/// Calls `func(*args)`; the arguments are consumed.
pub(crate) unsafe fn call(func: *mut ffi::PyObject, args: Vec<PyRef>) -> Option<PyRef> {
    unsafe {
        let tuple = PyRef::new(ffi::PyTuple_New(args.len() as ffi::Py_ssize_t))?;
        for (i, arg) in args.into_iter().enumerate() {
            // PyTuple_SetItem steals the reference, even on failure.
            ffi::PyTuple_SetItem(tuple.as_ptr(), i as ffi::Py_ssize_t, arg.into_ptr());
        }
        PyRef::new(ffi::PyObject_Call(func, tuple.as_ptr(), ptr::null_mut()))
    }
}

/// The version of the linked libpython, `major.minor.micro`.
pub(crate) fn version() -> String {
    // SAFETY: Py_GetVersion returns a static string and may be called any time.
    let full = unsafe { CStr::from_ptr(ffi::Py_GetVersion()) }.to_string_lossy();
    full.split_whitespace().next().unwrap_or("").to_owned()
}

/// The pthread id CPython records for the calling thread
/// (`PyThread_get_thread_ident`, which `PyThreadState_SetAsyncExc` matches).
pub(crate) fn thread_ident() -> u64 {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() as u64 }
}

/// A thread state of the main interpreter, kept by an engine thread for its
/// whole life (see the module comment). Not current after creation.
pub(crate) struct Anchor(*mut ffi::PyThreadState);

impl Anchor {
    /// Call on the thread that will own it, with no thread state current.
    pub(crate) fn new() -> Anchor {
        // SAFETY: PyThreadState_New needs no GIL; the main interpreter lives until finalisation.
        Anchor(unsafe { ffi::PyThreadState_New(ffi::PyInterpreterState_Main()) })
    }

    /// Points this thread's `PyGILState` slot back at the anchor. Activating a
    /// thread state (`PyEval_RestoreThread`) binds the slot to it (3.12, 3.13),
    /// and the next activation on this thread writes to the state the slot
    /// names. An executor's thread states are deleted by the pool thread (at a
    /// reset or an interpreter's end), which cannot clear *this* thread's slot:
    /// left pointing at a deleted state, the next activation here writes into
    /// freed memory (valgrind: `bind_gilstate_tstate` reading a block freed by
    /// `drop_exec_tstates`; heap corruption once in ~10 runs of
    /// `tests/engine.rs`). Call with no thread state current, after every use of
    /// a thread state another thread may delete.
    pub(crate) fn rebind(&self) {
        // SAFETY: the anchor belongs to this thread and is not current; taking
        // the main interpreter's GIL for a moment is all this costs.
        unsafe {
            ffi::PyEval_RestoreThread(self.0);
            ffi::PyEval_SaveThread();
        }
    }
}

impl Drop for Anchor {
    fn drop(&mut self) {
        // SAFETY: dropped on its own thread with no thread state current, before
        // finalisation; clearing needs the main interpreter's GIL.
        unsafe {
            ffi::PyEval_RestoreThread(self.0);
            ffi::PyThreadState_Clear(self.0);
            ffi::PyThreadState_DeleteCurrent();
        }
    }
}

/// The interpreter's executable for `PyConfig`: the venv's `bin/python` or,
/// without a venv, the `bin/python3.X` next to the libpython we are linked to.
fn executable(python_env: Option<&Path>) -> Result<Option<PathBuf>, EngineError> {
    if let Some(env) = python_env {
        for name in ["bin/python", "bin/python3"] {
            let exe = env.join(name);
            if exe.exists() {
                return Ok(Some(exe));
            }
        }
        return Err(EngineError::PythonEnvNotFound {
            path: env.to_owned(),
        });
    }
    // Without it, getpath searches PATH for "python3" and sys.executable comes
    // out as whatever is found there (measured: a pyenv shim of another version).
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the address; Py_GetVersion is in libpython.
    let found = unsafe { libc::dladdr(ffi::Py_GetVersion as *const libc::c_void, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return Ok(None);
    }
    let lib = PathBuf::from(std::ffi::OsStr::from_bytes(
        // SAFETY: dladdr returned a NUL-terminated path.
        unsafe { CStr::from_ptr(info.dli_fname) }.to_bytes(),
    ));
    let version = version();
    let minor: String = version.split('.').take(2).collect::<Vec<_>>().join(".");
    let exe = lib
        .parent()
        .and_then(Path::parent)
        .map(|prefix| prefix.join("bin").join(format!("python{minor}")));
    Ok(exe.filter(|e| e.exists()))
}

fn check(status: ffi::PyStatus, what: &str) -> Result<(), EngineError> {
    // SAFETY: PyStatus_Exception only reads the struct.
    if unsafe { ffi::PyStatus_Exception(status) } != 0 {
        let detail = if status.err_msg.is_null() {
            format!("exit code {}", status.exitcode)
        } else {
            // SAFETY: err_msg is a static C string when set.
            unsafe { CStr::from_ptr(status.err_msg) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(EngineError::PythonInit {
            message: format!("{what}: {detail}"),
        });
    }
    Ok(())
}

fn cpath(path: &Path) -> Result<CString, EngineError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| EngineError::BadPath {
        path: path.to_owned(),
    })
}

/// Initialises CPython on the calling thread and releases the main GIL.
/// Returns the main thread state, to be restored by [`finalize`].
pub(crate) fn initialize(python_env: Option<&Path>) -> Result<usize, EngineError> {
    // SAFETY: plain FFI calls in the order CPython documents for PyConfig.
    unsafe {
        if ffi::Py_IsInitialized() != 0 {
            return Err(EngineError::AlreadyInitialized);
        }
        let exe = executable(python_env)?;
        super::huge_alloc::install();
        super::arena_cache::install();
        let mut config: ffi::PyConfig = std::mem::zeroed();
        ffi::PyConfig_InitPythonConfig(&mut config);
        config.install_signal_handlers = 0;
        config.parse_argv = 0;
        let result = (|| {
            if let Some(exe) = &exe {
                let c = cpath(exe)?;
                let cfg = &raw mut config;
                check(
                    ffi::PyConfig_SetBytesString(cfg, &raw mut (*cfg).program_name, c.as_ptr()),
                    "program_name",
                )?;
                check(
                    ffi::PyConfig_SetBytesString(cfg, &raw mut (*cfg).executable, c.as_ptr()),
                    "executable",
                )?;
            }
            check(
                ffi::Py_InitializeFromConfig(&config),
                "Py_InitializeFromConfig",
            )
        })();
        ffi::PyConfig_Clear(&mut config);
        result?;
        Ok(ffi::PyEval_SaveThread() as usize)
    }
}

/// Finalises CPython. Every sub-interpreter must have been ended and every
/// engine thread joined. `main_tstate` is what [`initialize`] returned; it is
/// used when called on the thread that initialised Python, otherwise a fresh
/// thread state of the main interpreter is made for this thread.
pub(crate) fn finalize(main_tstate: usize, on_init_thread: bool) -> i32 {
    // SAFETY: see the contract above; no thread state is current on this thread.
    unsafe {
        if on_init_thread {
            ffi::PyEval_RestoreThread(main_tstate as *mut ffi::PyThreadState);
        } else {
            let ts = ffi::PyThreadState_New(ffi::PyInterpreterState_Main());
            ffi::PyEval_RestoreThread(ts);
        }
        ffi::Py_FinalizeEx()
    }
}

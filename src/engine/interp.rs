//! One isolated sub-interpreter with its own GIL, its output pipes and its copy
//! of the helper module (`helper.py`), and the few operations the engine runs in
//! it: warm-up, running an atom, interrupting it, resetting it between sessions,
//! and ending it.
//!
//! Who may touch what (the invariants that make the raw pointers sound):
//! - `home` is the thread state `Py_NewInterpreterFromConfig` made; only the
//!   pool thread (which created the interpreter) uses it, for warm-up, reset and
//!   `Py_EndInterpreter`.
//! - `exec_tstates[i]` belongs to executor `i`, which creates it lazily on its own
//!   thread (a thread state records its thread's id, which interrupts target).
//!   While the interpreter is idle in the pool the pool thread may delete them
//!   all (`reset`), which drops per-thread state (trace functions, contextvars,
//!   a pending async exception) left by the session.
//! - `helper` functions are objects of this interpreter and are used only with
//!   its GIL held.
//! - `running_atom` is written only with this interpreter's GIL held, so an
//!   interrupter that holds the GIL sees a stable value.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::Mutex;

use pyo3::ffi;

use super::error::EngineError;
use super::python::{self, PyRef};
use crate::protocol::{AtomKind, Buffer};

/// The helper module exec'd into every interpreter.
const HELPER_SOURCE: &str = include_str!("helper.py");
const HELPER_FILE: &str = "<pyproxy-engine>";

/// What running an atom produced, before interruptions are accounted for.
#[derive(Debug)]
pub(crate) enum RawOutcome {
    /// The pickled value and the out-of-band buffers it refers to.
    Value {
        pickled: Vec<u8>,
        buffers: Vec<Buffer>,
    },
    Raised {
        type_name: String,
        message: String,
        traceback: String,
        pickled: Option<Vec<u8>>,
    },
    /// The helper itself failed (should not happen; reported as a server error).
    Internal(String),
}

pub(crate) struct Interp {
    /// Engine-wide serial number, for logs.
    pub(crate) serial: u64,
    state: *mut ffi::PyInterpreterState,
    home: *mut ffi::PyThreadState,
    exec_tstates: Vec<AtomicPtr<ffi::PyThreadState>>,
    helper_run: *mut ffi::PyObject,
    helper_reset: *mut ffi::PyObject,
    /// Read ends (non-blocking) of the stdout and stderr pipes.
    out_r: OwnedFd,
    err_r: OwnedFd,
    /// Write ends, used by the interpreter's `sys.stdout`/`sys.stderr`.
    _out_w: OwnedFd,
    _err_w: OwnedFd,
    /// The wake pipe (both ends non-blocking): the interpreter's `time.sleep`
    /// waits on the read end, and `interrupt` writes a byte right after setting
    /// the KeyboardInterrupt, so a sleeping atom stops at once, not when its
    /// sleep would have ended.
    wake_r: OwnedFd,
    wake_w: OwnedFd,
    /// The atom running now (0: none). Written only under this interpreter's GIL.
    running_atom: AtomicU64,
    /// Thread id of the executor running `running_atom`.
    running_thread: AtomicU64,
    /// Set once `Py_EndInterpreter` ran; nothing may enter the interpreter after.
    ended: AtomicBool,
    /// A session left Python threads running here: the pool keeps the
    /// interpreter for that session until it closes (their output must reach
    /// no other session). Set and cleared by the pool thread while it alone
    /// holds the interpreter; read under the pool's lock.
    pinned: AtomicBool,
    /// Held by `interrupt` (which enters from a foreign thread) and by `end`, so
    /// that an interrupt never enters an interpreter being ended. Always taken
    /// before this interpreter's GIL, never while holding it.
    gate: Mutex<()>,
}

// SAFETY: the pointers are only dereferenced by CPython under the rules in the
// module comment; the struct itself is just handles.
unsafe impl Send for Interp {}
unsafe impl Sync for Interp {}

fn pipe() -> Result<(OwnedFd, OwnedFd), EngineError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two fds on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(EngineError::Pipe {
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: both fds are fresh and ours.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    set_nonblocking(r.as_raw_fd());
    Ok((r, w))
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an fd the caller owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

/// Reads and discards whatever is in a non-blocking pipe (output nobody owns:
/// from warm-up, or from threads a finished session left behind).
fn discard(fd: RawFd) -> usize {
    let mut buf = [0u8; 8192];
    let mut total = 0;
    loop {
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return total;
        }
        total += n as usize;
    }
}

impl Interp {
    /// Creates and warms up a sub-interpreter. Call on the pool thread, with no
    /// thread state current; returns with none current.
    pub(crate) fn create(
        serial: u64,
        executors: usize,
        workdir: Option<&str>,
        preload: &[String],
        environ: &[(String, String)],
    ) -> Result<Interp, EngineError> {
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let (wake_r, wake_w) = pipe()?;
        set_nonblocking(wake_w.as_raw_fd());
        let config = ffi::PyInterpreterConfig {
            use_main_obmalloc: 0,
            allow_fork: 0,
            allow_exec: 0,
            allow_threads: 1,
            allow_daemon_threads: 0,
            check_multi_interp_extensions: 1,
            gil: ffi::PyInterpreterConfig_OWN_GIL,
        };
        let mut home: *mut ffi::PyThreadState = ptr::null_mut();
        // SAFETY: no thread state is current (engine-thread discipline); on success
        // the new interpreter's thread state is current and holds its new GIL.
        let status = unsafe { ffi::Py_NewInterpreterFromConfig(&mut home, &config) };
        // SAFETY: reading the status struct.
        if unsafe { ffi::PyStatus_Exception(status) } != 0 || home.is_null() {
            let message = if status.err_msg.is_null() {
                "Py_NewInterpreterFromConfig failed".to_owned()
            } else {
                // SAFETY: a static C string.
                unsafe { std::ffi::CStr::from_ptr(status.err_msg) }
                    .to_string_lossy()
                    .into_owned()
            };
            return Err(EngineError::Interpreter { message });
        }
        // SAFETY: `home` is current and holds the GIL.
        let state = unsafe { ffi::PyThreadState_GetInterpreter(home) };
        let mut interp = Interp {
            serial,
            state,
            home,
            exec_tstates: (0..executors)
                .map(|_| AtomicPtr::new(ptr::null_mut()))
                .collect(),
            helper_run: ptr::null_mut(),
            helper_reset: ptr::null_mut(),
            out_r,
            err_r,
            running_atom: AtomicU64::new(0),
            running_thread: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            pinned: AtomicBool::new(false),
            gate: Mutex::new(()),
            _out_w: out_w,
            _err_w: err_w,
            wake_r,
            wake_w,
        };
        // SAFETY: the GIL of the new interpreter is held by this thread.
        let warmed = unsafe { interp.warm_up(workdir, preload, environ) };
        // SAFETY: release the GIL; no thread state current afterwards.
        unsafe { ffi::PyEval_SaveThread() };
        match warmed {
            Ok(()) => {
                interp.discard_output();
                Ok(interp)
            }
            Err(message) => {
                interp.end();
                Err(EngineError::Interpreter { message })
            }
        }
    }

    unsafe fn warm_up(
        &mut self,
        workdir: Option<&str>,
        preload: &[String],
        environ: &[(String, String)],
    ) -> Result<(), String> {
        unsafe {
            let module = python::exec_module("_pyproxy_engine", HELPER_FILE, HELPER_SOURCE, false)?;
            let dict = ffi::PyModule_GetDict(module.as_ptr()); // borrowed
            let get = |n: &str| -> Result<*mut ffi::PyObject, String> {
                let key = CString::new(n).expect("no NUL");
                let f = ffi::PyDict_GetItemString(dict, key.as_ptr());
                if f.is_null() {
                    return Err(format!("helper has no {n}"));
                }
                ffi::Py_IncRef(f);
                Ok(f)
            };
            self.helper_run = get("run")?;
            self.helper_reset = get("reset")?;
            let setup = get("setup")?;
            let setup = PyRef::new(setup).expect("non-null");
            super::dict_watch::install(dict)?;
            let wd = match workdir {
                Some(w) => {
                    let c = CString::new(w).map_err(|_| "workdir has NUL".to_owned())?;
                    PyRef::new(ffi::PyUnicode_FromString(c.as_ptr()))
                        .ok_or_else(|| python::take_error())?
                }
                None => python::none(),
            };
            let list = PyRef::new(ffi::PyList_New(0)).ok_or_else(|| python::take_error())?;
            for m in preload {
                let c = CString::new(m.as_str()).map_err(|_| "module name has NUL".to_owned())?;
                let s = PyRef::new(ffi::PyUnicode_FromString(c.as_ptr()))
                    .ok_or_else(|| python::take_error())?;
                ffi::PyList_Append(list.as_ptr(), s.as_ptr());
            }
            let env = PyRef::new(ffi::PyDict_New()).ok_or_else(|| python::take_error())?;
            for (k, v) in environ {
                let text = |t: &str| {
                    PyRef::new(ffi::PyUnicode_FromStringAndSize(
                        t.as_ptr().cast(),
                        t.len() as ffi::Py_ssize_t,
                    ))
                };
                let (Some(k), Some(v)) = (text(k), text(v)) else {
                    return Err(python::take_error());
                };
                ffi::PyDict_SetItem(env.as_ptr(), k.as_ptr(), v.as_ptr());
            }
            let args = vec![
                PyRef::new(ffi::PyLong_FromLong(self.out_fd() as _))
                    .ok_or_else(|| python::take_error())?,
                PyRef::new(ffi::PyLong_FromLong(self.err_fd_w() as _))
                    .ok_or_else(|| python::take_error())?,
                wd,
                list,
                env,
                PyRef::new(ffi::PyLong_FromLong(self.wake_r.as_raw_fd() as _))
                    .ok_or_else(|| python::take_error())?,
            ];
            python::call(setup.as_ptr(), args)
                .map(drop)
                .ok_or_else(|| format!("warm-up failed: {}", python::take_error()))
        }
    }

    pub(crate) fn out_r_fd(&self) -> RawFd {
        self.out_r.as_raw_fd()
    }

    pub(crate) fn err_r_fd(&self) -> RawFd {
        self.err_r.as_raw_fd()
    }

    fn out_fd(&self) -> RawFd {
        self._out_w.as_raw_fd()
    }

    fn err_fd_w(&self) -> RawFd {
        self._err_w.as_raw_fd()
    }

    fn discard_output(&self) -> usize {
        // Stale wake-ups too: a new session's first sleep should not loop once for nothing.
        discard(self.wake_r.as_raw_fd());
        discard(self.out_r.as_raw_fd()) + discard(self.err_r.as_raw_fd())
    }

    /// Executor `index`'s thread state for this interpreter, created on first use.
    /// Call on that executor's thread, with no thread state current.
    pub(crate) fn exec_tstate(&self, index: usize) -> *mut ffi::PyThreadState {
        let slot = &self.exec_tstates[index];
        let ts = slot.load(Ordering::Acquire);
        if !ts.is_null() {
            return ts;
        }
        // SAFETY: PyThreadState_New needs no GIL; it binds the new state to this thread.
        let ts = unsafe { ffi::PyThreadState_New(self.state) };
        slot.store(ts, Ordering::Release);
        ts
    }

    /// Runs one atom on the calling executor thread (`tstate` from
    /// [`exec_tstate`]); blocks until the atom returns. Output goes to the pipes.
    #[allow(clippy::too_many_arguments)] // the atom's fields, borrowed from its request
    pub(crate) fn run_atom(
        &self,
        tstate: *mut ffi::PyThreadState,
        atom: u64,
        kind: AtomKind,
        payload: &[u8],
        globals: Option<&[u8]>,
        locals: Option<&[u8]>,
        buffers: &[Buffer],
    ) -> RawOutcome {
        debug_assert!(!self.ended.load(Ordering::Acquire));
        let thread = python::thread_ident();
        // SAFETY: `tstate` belongs to this thread and this interpreter; no thread
        // state is current. Every object below is created and dropped under the GIL.
        unsafe {
            ffi::PyEval_RestoreThread(tstate);
            self.running_thread.store(thread, Ordering::Release);
            let before = self.running_atom.swap(atom, Ordering::AcqRel);
            debug_assert!(
                before == 0,
                "interpreter {} runs atom {atom} while atom {before} runs",
                self.serial
            );
            let outcome = self.call_run(kind, payload, globals, locals, buffers);
            self.running_atom.store(0, Ordering::Release);
            // An interrupt aimed at this atom that has not been delivered yet must
            // not hit the next one.
            ffi::PyThreadState_SetAsyncExc(thread as _, ptr::null_mut());
            if !ffi::PyErr_Occurred().is_null() {
                ffi::PyErr_Clear();
            }
            ffi::PyEval_SaveThread();
            outcome
        }
    }

    unsafe fn call_run(
        &self,
        kind: AtomKind,
        payload: &[u8],
        globals: Option<&[u8]>,
        locals: Option<&[u8]>,
        buffers: &[Buffer],
    ) -> RawOutcome {
        unsafe {
            let opt = |b: Option<&[u8]>| match b {
                Some(b) => python::bytes(b),
                None => Some(python::none()),
            };
            // The out-of-band buffers go in as `take(i, as_bytearray)`, which
            // makes each into the `bytes` or `bytearray` its pickle asks for
            // with one copy; None when there are none.
            let taker = if buffers.is_empty() {
                Some(python::none())
            } else {
                python::buffer_taker(buffers)
            };
            let Some(taker) = taker else {
                return RawOutcome::Internal(python::take_error());
            };
            let args = (|| {
                Some(vec![
                    PyRef::new(ffi::PyLong_FromLong(kind as u8 as _))?,
                    python::bytes(payload)?,
                    opt(globals)?,
                    opt(locals)?,
                    taker,
                    PyRef::new(ffi::PyLong_FromSize_t(buffers.len()))?,
                ])
            })();
            let Some(args) = args else {
                return RawOutcome::Internal(python::take_error());
            };
            let Some(result) = python::call(self.helper_run, args) else {
                // The helper catches everything; only an interrupt landing at the
                // very edge of it gets here.
                let e = python::take_error();
                return RawOutcome::Raised {
                    type_name: format!("builtins.{}", e.split(':').next().unwrap_or("Exception")),
                    message: e,
                    traceback: String::new(),
                    pickled: None,
                };
            };
            decode_result(result.as_ptr())
        }
    }

    /// Raises KeyboardInterrupt in the executor running `atom`, if it still runs.
    /// Blocks until this interpreter's GIL is free (at most a switch interval
    /// while Python code runs; as long as a C call holds the GIL otherwise).
    /// Call with no thread state current, from a thread that is not running an
    /// atom of this interpreter. Returns whether the interrupt was set.
    pub(crate) fn interrupt(&self, atom: u64) -> bool {
        let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        if self.ended.load(Ordering::Acquire) {
            return false;
        }
        // SAFETY: a temporary thread state of this interpreter, on this thread.
        unsafe {
            let ts = ffi::PyThreadState_New(self.state);
            ffi::PyEval_AcquireThread(ts);
            let hit = self.running_atom.load(Ordering::Acquire) == atom;
            if hit {
                let thread = self.running_thread.load(Ordering::Acquire);
                ffi::PyThreadState_SetAsyncExc(thread as _, ffi::PyExc_KeyboardInterrupt);
                // After the exception is set, so a sleep that wakes finds it pending.
                // A full pipe already holds a wake-up; nothing is lost by EAGAIN.
                libc::write(self.wake_w.as_raw_fd(), [1u8].as_ptr().cast(), 1);
            }
            ffi::PyThreadState_Clear(ts);
            ffi::PyThreadState_DeleteCurrent();
            hit
        }
    }

    /// Restores the warm snapshot and drops the executors' thread states. Call on
    /// the pool thread while no session owns the interpreter. Returns the number
    /// of Python threads the session left running.
    pub(crate) fn reset(&self) -> Result<usize, String> {
        let running = self.running_atom.load(Ordering::Acquire);
        debug_assert!(
            running == 0,
            "interpreter {} reset while atom {running} runs",
            self.serial
        );
        // SAFETY: pool thread, no thread state current; `home` is ours.
        unsafe {
            ffi::PyEval_RestoreThread(self.home);
            let result = python::call(self.helper_reset, Vec::new());
            let outcome = match result {
                Some(n) => {
                    let n = ffi::PyLong_AsLong(n.as_ptr());
                    Ok(n.max(0) as usize)
                }
                None => Err(python::take_error()),
            };
            self.drop_exec_tstates();
            ffi::PyEval_SaveThread();
            self.discard_output();
            outcome
        }
    }

    /// With this interpreter's GIL held through `home`.
    unsafe fn drop_exec_tstates(&self) {
        for slot in &self.exec_tstates {
            let ts = slot.swap(ptr::null_mut(), Ordering::AcqRel);
            if !ts.is_null() {
                // SAFETY: not current anywhere (the interpreter is idle); the GIL is held.
                unsafe {
                    ffi::PyThreadState_Clear(ts);
                    ffi::PyThreadState_Delete(ts);
                }
            }
        }
    }

    /// Ends the interpreter. Call on the pool thread (which owns `home`) with no
    /// thread state current, when nothing else uses the interpreter. Idempotent.
    pub(crate) fn end(&self) {
        let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        if self.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: see above. Py_EndInterpreter requires `home` to be current and
        // the last thread state of the interpreter.
        unsafe {
            ffi::PyEval_RestoreThread(self.home);
            self.drop_exec_tstates();
            for f in [self.helper_run, self.helper_reset] {
                if !f.is_null() {
                    ffi::Py_DecRef(f);
                }
            }
            ffi::Py_EndInterpreter(self.home);
            // Py_EndInterpreter leaves no thread state current.
        }
    }

    pub(crate) fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    pub(crate) fn is_pinned(&self) -> bool {
        self.pinned.load(Ordering::Relaxed)
    }

    pub(crate) fn set_pinned(&self, pinned: bool) {
        self.pinned.store(pinned, Ordering::Relaxed);
    }
}

/// Decodes the helper's `(0, value, buffers)` / `(1, type, message, traceback, pickled)`.
unsafe fn decode_result(t: *mut ffi::PyObject) -> RawOutcome {
    unsafe {
        let item = |i| ffi::PyTuple_GetItem(t, i);
        let tag = ffi::PyLong_AsLong(item(0));
        if tag == 0 {
            let Some(pickled) = python::bytes_to_vec(item(1)) else {
                return RawOutcome::Internal("helper returned no bytes".into());
            };
            // One copy of each buffer (the value's own `bytes`, an array's
            // data) into memory the network layer owns; the pickle refers to them.
            let list = item(2);
            let n = ffi::PyList_Size(list);
            let mut buffers = Vec::with_capacity(n.max(0) as usize);
            for i in 0..n.max(0) {
                match python::buffer_to_vec(ffi::PyList_GetItem(list, i)) {
                    Some(v) => buffers.push(Buffer::from(v)),
                    None => return RawOutcome::Internal("helper returned a bad buffer".into()),
                }
            }
            if n < 0 {
                ffi::PyErr_Clear();
                return RawOutcome::Internal("helper returned no buffer list".into());
            }
            return RawOutcome::Value { pickled, buffers };
        }
        let text = |i| python::str_to_string(item(i)).unwrap_or_default();
        let pickled = item(4);
        let pickled = if pickled.is_null() || pickled == ffi::Py_None() {
            None
        } else {
            python::bytes_to_vec(pickled)
        };
        if !ffi::PyErr_Occurred().is_null() {
            ffi::PyErr_Clear();
        }
        RawOutcome::Raised {
            type_name: text(1),
            message: text(2),
            traceback: text(3),
            pickled,
        }
    }
}

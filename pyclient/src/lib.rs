//! The native half of the PyProxy client, imported as `pyproxy._native`.
//!
//! It exposes the session machinery of [`session`] and [`reader`] to the
//! pure-Python layer in `pyclient/python/pyproxy/`, which adds pickling, the
//! futures API and exception re-raising. Every call that can block releases
//! the GIL (`Python::detach`) and wakes every [`SIGNAL_SLICE`] to let Ctrl-C
//! through. Client errors become Python exceptions in exactly one place,
//! [`to_pyerr`].

pub mod error;
pub mod notify;
mod outbox;
mod reader;
pub mod session;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use pyproxy::protocol::{AtomKind, Outcome};

use crate::error::ClientError;
use crate::notify::Notifier;
use crate::session::{Completion, ConnectOptions, EvalParts, Session};

/// How long a blocking call sleeps without the GIL before it checks for signals.
const SIGNAL_SLICE: Duration = Duration::from_millis(100);

/// A log record as Python receives it: level, timestamp in µs, message, fields.
type LogTuple = (u8, u64, String, Vec<(String, String)>);

/// Longest wait a timeout can ask for (about 30 years): "forever" for any caller.
const LONGEST_WAIT_S: f64 = 1e9;

/// Output bytes handed to Python per `read_output` call.
const OUTPUT_BATCH: usize = 4 * 1024 * 1024;

/// The one place a [`ClientError`] becomes a Python exception: the class of
/// the same name in `pyproxy._errors`, called with the message.
fn to_pyerr(py: Python<'_>, err: ClientError) -> PyErr {
    let message = err.to_string();
    let class = err.python_class();
    if class == "ValueError" {
        return PyValueError::new_err(message);
    }
    let built = py
        .import("pyproxy._errors")
        .and_then(|m| m.getattr(class))
        .and_then(|cls| cls.call1((message.clone(),)));
    match built {
        Ok(exc) => PyErr::from_value(exc),
        Err(_) => PyRuntimeError::new_err(format!("{class}: {message}")),
    }
}

/// Seconds from Python (None: forever) to a duration; negative means "do not wait".
fn seconds(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_nan() => Err(PyValueError::new_err("timeout must be a number, not NaN")),
        Some(t) if t.is_infinite() && t > 0.0 => Ok(None),
        // Clamped so that `Instant::now() + timeout` can never overflow.
        Some(t) => Ok(Some(Duration::from_secs_f64(t.clamp(0.0, LONGEST_WAIT_S)))),
    }
}

/// Runs `step` without the GIL in slices of at most [`SIGNAL_SLICE`] until it
/// returns `Some` or `timeout` passes, checking for signals between slices.
fn blocking<T: Send>(
    py: Python<'_>,
    timeout: Option<Duration>,
    mut step: impl FnMut(Duration) -> Option<T> + Send,
) -> PyResult<Option<T>> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let slice = match deadline {
            None => SIGNAL_SLICE,
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .min(SIGNAL_SLICE),
        };
        if let Some(v) = py.detach(|| step(slice)) {
            return Ok(Some(v));
        }
        py.check_signals()?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(None);
        }
    }
}

/// A connected PyProxy session: two TCP streams and the one native thread
/// that reads them. Use `pyproxy.PyProxySession`; this is its engine.
#[pyclass(frozen, name = "Connection", module = "pyproxy._native")]
struct PyConnection {
    inner: Arc<Session>,
}

/// A field of an EVAL as Python handed it: one `bytes`, or pieces held
/// through the buffer protocol (which keeps each exporter alive and, for a
/// `bytearray`, unresizable until the frame is written).
enum Pieces<'py> {
    Bytes(Bound<'py, PyBytes>),
    Buffers(Vec<PyBuffer<u8>>),
}

impl<'py> Pieces<'py> {
    fn extract(obj: &Bound<'py, PyAny>) -> PyResult<Pieces<'py>> {
        if let Ok(b) = obj.cast::<PyBytes>() {
            return Ok(Pieces::Bytes(b.clone()));
        }
        let list = obj.cast::<PyList>().map_err(|_| {
            PyValueError::new_err("an atom field is bytes or a list of bytes-like pieces")
        })?;
        let mut out = Vec::with_capacity(list.len());
        for item in list.iter() {
            let buf = PyBuffer::<u8>::get(&item)?;
            if !buf.is_c_contiguous() {
                return Err(PyValueError::new_err(
                    "an atom field's piece is not contiguous",
                ));
            }
            out.push(buf);
        }
        Ok(Pieces::Buffers(out))
    }

    fn slices(&self) -> Vec<&[u8]> {
        match self {
            Pieces::Bytes(b) => vec![b.as_bytes()],
            Pieces::Buffers(bufs) => bufs
                .iter()
                .map(|b| {
                    // SAFETY: a C-contiguous buffer of `len_bytes` bytes that stays
                    // exported (so valid and not resized) while `self` lives.
                    unsafe { std::slice::from_raw_parts(b.buf_ptr().cast::<u8>(), b.len_bytes()) }
                })
                .collect(),
        }
    }
}

/// How an atom ended, still undecoded: the pickled value, or the parts of a
/// remote exception. `pyproxy` unpickles it in the thread that asks.
#[pyclass(frozen, name = "Outcome", module = "pyproxy._native")]
struct PyOutcome {
    /// True when the atom raised or failed; `pickled` is then the exception, if it pickled.
    #[pyo3(get)]
    is_exception: bool,
    /// The pickled value or exception (may be None for an exception that did not
    /// pickle): `bytes`, or for a large value a read-only bytes-like `Value`.
    #[pyo3(get)]
    pickled: Option<Py<PyAny>>,
    /// A value's out-of-band buffers, as read-only bytes-like `Value`s, in the
    /// order its pickle takes them (empty for an exception).
    #[pyo3(get)]
    buffers: Vec<Py<PyAny>>,
    /// Failure origin code (0 raised, 1 timeout, 2 cancelled, 3 version mismatch,
    /// 4 worker died, 5 shutdown, 6 server error); 0 for a value.
    #[pyo3(get)]
    origin: u8,
    /// Qualified exception type name, e.g. `builtins.ZeroDivisionError`.
    #[pyo3(get)]
    type_name: String,
    /// `str()` of the remote exception.
    #[pyo3(get)]
    message: String,
    /// The remote traceback as Python formats it.
    #[pyo3(get)]
    traceback: String,
    /// How long the atom ran on the server, in microseconds.
    #[pyo3(get)]
    duration_us: u64,
}

#[pymethods]
impl PyOutcome {
    fn __repr__(&self) -> String {
        if self.is_exception {
            format!(
                "<Outcome exception origin={} {}>",
                self.origin, self.type_name
            )
        } else {
            format!("<Outcome value in {} us>", self.duration_us)
        }
    }
}

/// A wake-up channel for completions: a pipe whose read end (`fileno()`) becomes
/// readable when a watched atom completes, plus the tokens of those atoms.
/// The session thread writes to it without ever taking the GIL.
#[pyclass(frozen, name = "Notifier", module = "pyproxy._native")]
struct PyNotifier {
    inner: Arc<Notifier>,
}

#[pymethods]
impl PyNotifier {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(PyNotifier {
            inner: Arc::new(Notifier::new()?),
        })
    }

    /// The pipe's read end, for `loop.add_reader` or `select`.
    fn fileno(&self) -> i32 {
        self.inner.fileno()
    }

    /// Tokens of watched atoms that completed since the last call; never blocks.
    fn drain(&self) -> Vec<u64> {
        self.inner.drain()
    }

    /// Waits (without the GIL) up to `timeout` seconds (None: forever) for at
    /// least one token, then returns all of them; an empty list on timeout.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<u64>> {
        let n = &self.inner;
        let got = blocking(py, seconds(timeout)?, |slice| {
            let tokens = n.wait(Some(slice)).unwrap_or_default();
            (!tokens.is_empty()).then_some(tokens)
        })?;
        Ok(got.unwrap_or_default())
    }
}

/// Values at least this large reach Python as a [`PyValue`] over the Rust
/// buffer rather than as a copy in a `bytes`.
const VALUE_VIEW_MIN: usize = 64 * 1024;

/// A large pickled value or one of a value's out-of-band buffers, exposed
/// read-only through the buffer protocol straight from the buffer the reader
/// thread filled: Python reads it where it lies, so it is copied once (into the
/// objects it unpickles to).
#[pyclass(frozen, name = "Value", module = "pyproxy._native")]
struct PyValue {
    done: Arc<Completion>,
    /// None: the pickle; `Some(i)`: out-of-band buffer i.
    index: Option<usize>,
}

impl PyValue {
    fn data(&self) -> &[u8] {
        match &*self.done {
            Completion::Result(r) => match (&r.outcome, self.index) {
                (Outcome::Value { pickled, .. }, None) => pickled,
                (Outcome::Value { buffers, .. }, Some(i)) => buffers.get(i).map_or(&[], |b| b),
                (Outcome::Exception(_), _) => &[],
            },
            _ => &[],
        }
    }
}

#[pymethods]
impl PyValue {
    /// # Safety
    /// Called by CPython with a valid `view`.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        if flags & pyo3::ffi::PyBUF_WRITABLE == pyo3::ffi::PyBUF_WRITABLE {
            return Err(pyo3::exceptions::PyBufferError::new_err(
                "a pickled value is read-only",
            ));
        }
        let data = slf.get().data();
        // SAFETY: `data` lives in the Arc this object holds, never changes, and
        // the view holds a reference to this object (FillInfo increfs it).
        let rc = unsafe {
            pyo3::ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                data.as_ptr() as *mut std::os::raw::c_void,
                data.len() as pyo3::ffi::Py_ssize_t,
                1,
                flags,
            )
        };
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.data().len()
    }

    /// A new `bytes` holding a copy (the one copy the client makes of an
    /// out-of-band buffer, into memory advised to use huge pages).
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.copy_into(py, false)
    }

    /// A new `bytearray` holding a copy, as for `to_bytes`.
    fn to_bytearray<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.copy_into(py, true)
    }
}

impl PyValue {
    fn copy_into<'py>(&self, py: Python<'py>, as_bytearray: bool) -> PyResult<Bound<'py, PyAny>> {
        use pyo3::ffi;
        let data = self.data();
        let n = data.len() as ffi::Py_ssize_t;
        // SAFETY: a new object of `n` uninitialised bytes is filled completely
        // before Python sees it; the GIL is held (`py`).
        unsafe {
            let (obj, dst) = if as_bytearray {
                let o = ffi::PyByteArray_FromStringAndSize(std::ptr::null(), n);
                (
                    o,
                    if o.is_null() {
                        std::ptr::null_mut()
                    } else {
                        ffi::PyByteArray_AsString(o)
                    },
                )
            } else {
                let o = ffi::PyBytes_FromStringAndSize(std::ptr::null(), n);
                (
                    o,
                    if o.is_null() {
                        std::ptr::null_mut()
                    } else {
                        ffi::PyBytes_AsString(o)
                    },
                )
            };
            let obj = Bound::from_owned_ptr_or_err(py, obj)?;
            if dst.is_null() {
                return Err(PyErr::fetch(py));
            }
            pyproxy::protocol::buffer::advise_huge_pages(dst.cast::<u8>(), data.len());
            std::ptr::copy_nonoverlapping(data.as_ptr(), dst.cast::<u8>(), data.len());
            Ok(obj)
        }
    }
}

fn outcome(py: Python<'_>, atom: u64, done: &Arc<Completion>) -> PyResult<PyOutcome> {
    match &**done {
        Completion::Result(r) => Ok(match &r.outcome {
            Outcome::Value { pickled, buffers } => PyOutcome {
                is_exception: false,
                pickled: Some(if pickled.len() >= VALUE_VIEW_MIN {
                    Py::new(
                        py,
                        PyValue {
                            done: Arc::clone(done),
                            index: None,
                        },
                    )?
                    .into_any()
                } else {
                    PyBytes::new(py, pickled).into_any().unbind()
                }),
                buffers: (0..buffers.len())
                    .map(|i| {
                        Py::new(
                            py,
                            PyValue {
                                done: Arc::clone(done),
                                index: Some(i),
                            },
                        )
                        .map(Py::into_any)
                    })
                    .collect::<PyResult<_>>()?,
                origin: 0,
                type_name: String::new(),
                message: String::new(),
                traceback: String::new(),
                duration_us: r.duration_us,
            },
            Outcome::Exception(e) => PyOutcome {
                is_exception: true,
                pickled: e
                    .pickled
                    .as_ref()
                    .map(|p| PyBytes::new(py, p).into_any().unbind()),
                buffers: Vec::new(),
                origin: e.origin as u8,
                type_name: e.type_name.clone(),
                message: e.message.clone(),
                traceback: e.traceback.clone(),
                duration_us: r.duration_us,
            },
        }),
        Completion::Refused(e) => Err(to_pyerr(
            py,
            ClientError::AtomRefused {
                atom,
                code: e.code,
                message: e.message.clone(),
            },
        )),
        Completion::Closed(cause) => Err(to_pyerr(
            py,
            ClientError::SessionClosed {
                cause: cause.clone(),
            },
        )),
    }
}

#[pymethods]
impl PyConnection {
    /// Opens a session (both streams, both handshakes) and starts its thread.
    /// Blocks without the GIL for at most `connect_timeout` seconds.
    #[staticmethod]
    #[pyo3(signature = (host, port, *, token, token_source, backend, connect_timeout, implementation, python_version))]
    #[allow(clippy::too_many_arguments)]
    fn open(
        py: Python<'_>,
        host: String,
        port: u16,
        token: Option<String>,
        token_source: String,
        backend: String,
        connect_timeout: f64,
        implementation: String,
        python_version: String,
    ) -> PyResult<PyConnection> {
        let connect_timeout =
            seconds(Some(connect_timeout))?.unwrap_or(Duration::from_secs_f64(LONGEST_WAIT_S));
        let opts = ConnectOptions {
            host,
            port,
            token,
            token_source,
            backend,
            connect_timeout,
            implementation,
            python_version,
        };
        let session = py
            .detach(|| Session::connect(&opts))
            .map_err(|e| to_pyerr(py, e))?;
        Ok(PyConnection {
            inner: Arc::new(session),
        })
    }

    /// The id the server gave this session.
    #[getter]
    fn session_id(&self) -> u64 {
        self.inner.info.session_id
    }

    /// The server's PyProxy version.
    #[getter]
    fn server_version(&self) -> &str {
        &self.inner.info.server_version
    }

    /// The server's Python version, `major.minor.micro`.
    #[getter]
    fn server_python_version(&self) -> &str {
        &self.inner.info.python_version
    }

    /// The backend the session runs on (`subinterp` or `fork`).
    #[getter]
    fn backend(&self) -> &str {
        &self.inner.info.backend
    }

    /// The address actually connected to, `host:port`.
    #[getter]
    fn peer(&self) -> String {
        self.inner.info.peer.to_string()
    }

    /// Largest frame the server accepts, in bytes.
    #[getter]
    fn max_frame(&self) -> u32 {
        self.inner.info.limits.max_frame
    }

    /// Most atoms the session may have queued or running at once.
    #[getter]
    fn max_pipelined(&self) -> u32 {
        self.inner.info.limits.max_pipelined
    }

    /// Timeout the server applies to atoms sent without one, in milliseconds.
    #[getter]
    fn default_timeout_ms(&self) -> Option<u64> {
        self.inner.info.limits.default_timeout_ms
    }

    /// Sends an atom (`kind` 0 source, 1 code, 2 function) and returns its id.
    /// Each of `payload`, `globals` and `locals` is `bytes`, or a list of
    /// C-contiguous bytes-like pieces that the field is the concatenation of
    /// (written to the socket from where they lie, without joining them).
    /// `buffers`: the EVAL's out-of-band buffers (bytes-like, C-contiguous), in
    /// the order the pickles take them; written from where they lie too.
    #[pyo3(signature = (kind, payload, globals=None, locals=None, timeout_ms=None, buffers=None))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        kind: u8,
        payload: &Bound<'_, PyAny>,
        globals: Option<&Bound<'_, PyAny>>,
        locals: Option<&Bound<'_, PyAny>>,
        timeout_ms: Option<u64>,
        buffers: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let kind = AtomKind::from_wire(kind)
            .map_err(|_| PyValueError::new_err(format!("unknown atom kind {kind}")))?;
        let payload = Pieces::extract(payload)?;
        let globals = globals.map(Pieces::extract).transpose()?;
        let locals = locals.map(Pieces::extract).transpose()?;
        let (p, g, l) = (
            payload.slices(),
            globals.as_ref().map(Pieces::slices),
            locals.as_ref().map(Pieces::slices),
        );
        let buffers = match buffers {
            Some(b) => Some(Pieces::extract(b)?),
            None => None,
        };
        let b = buffers.as_ref().map(Pieces::slices).unwrap_or_default();
        let s = &self.inner;
        // A small request only joins the outbox (no I/O): no need to let the
        // GIL go, which cost more than the rest of the call while pipelining.
        let eval = EvalParts {
            kind,
            payload: &p,
            globals: g.as_deref(),
            locals: l.as_deref(),
            timeout_ms,
            buffers: &b,
        };
        match s.queue(&eval) {
            Ok(Some((atom, due))) => {
                if due {
                    py.detach(|| s.send_queued()).map_err(|e| to_pyerr(py, e))?;
                }
                return Ok(atom);
            }
            Ok(None) => {}
            Err(e) => return Err(to_pyerr(py, e)),
        }
        py.detach(|| s.submit_parts(&eval))
            .map_err(|e| to_pyerr(py, e))
    }

    /// Sends `CANCEL` for the atom; True if it had not finished.
    fn cancel(&self, py: Python<'_>, atom: u64) -> PyResult<bool> {
        let s = &self.inner;
        py.detach(|| s.cancel(atom)).map_err(|e| to_pyerr(py, e))
    }

    /// Waits (without the GIL) up to `timeout` seconds for the atom's outcome;
    /// None on timeout. Raises `SessionClosed` if the session died first.
    #[pyo3(signature = (atom, timeout=None))]
    fn wait(&self, py: Python<'_>, atom: u64, timeout: Option<f64>) -> PyResult<Option<PyOutcome>> {
        let s = &self.inner;
        let timeout = seconds(timeout)?;
        // Already answered (a pipelined caller's usual case): no GIL hand-off.
        if let Some(c) = s.completed(atom) {
            return outcome(py, atom, &c).map(Some);
        }
        let done = blocking(py, timeout, |slice| match s.wait(atom, Some(slice)) {
            Ok(None) => None,
            other => Some(other),
        })?;
        match done {
            None => Ok(None),
            Some(Err(e)) => Err(to_pyerr(py, e)),
            Some(Ok(None)) => Ok(None),
            Some(Ok(Some(c))) => outcome(py, atom, &c).map(Some),
        }
    }

    /// True once the atom has an outcome (or its slot was released).
    fn done(&self, atom: u64) -> bool {
        self.inner.is_done(atom)
    }

    /// True while the atom is the session's oldest unfinished one.
    fn running(&self, atom: u64) -> bool {
        self.inner.is_running(atom)
    }

    /// Asks for `token` on `notifier` when the atom completes (at once if it has).
    fn watch(&self, atom: u64, notifier: &PyNotifier, token: u64) {
        self.inner.watch(atom, &notifier.inner, token);
    }

    /// Withdraws every watch of `notifier` on the atom.
    fn unwatch(&self, atom: u64, notifier: &PyNotifier) {
        self.inner.unwatch(atom, &notifier.inner);
    }

    /// Forgets the atom's outcome; its unread output stays for the session's iterator.
    fn release(&self, atom: u64) {
        self.inner.release(atom);
    }

    /// Takes unread output of `atom` (None: of the whole session), waiting up to
    /// `timeout` seconds for some. Returns `(chunks, ended)`, each chunk
    /// `(atom, fd, bytes)` holding whole lines. Raises `SessionClosed` once a
    /// stream cut by the session's death has been read to its end.
    #[pyo3(signature = (atom=None, timeout=None))]
    fn read_output<'py>(
        &self,
        py: Python<'py>,
        atom: Option<u64>,
        timeout: Option<f64>,
    ) -> PyResult<(Bound<'py, PyList>, bool)> {
        let s = &self.inner;
        let got = blocking(py, seconds(timeout)?, |slice| {
            match s.read_output(atom, Some(slice), OUTPUT_BATCH) {
                Ok((chunks, false)) if chunks.is_empty() => None,
                other => Some(other),
            }
        })?;
        let (chunks, ended) = match got {
            None => (Vec::new(), false),
            Some(r) => r.map_err(|e| to_pyerr(py, e))?,
        };
        let items = chunks
            .into_iter()
            .map(|c| (c.atom, c.fd, PyBytes::new(py, &c.data)));
        Ok((PyList::new(py, items)?, ended))
    }

    /// Log records received so far: `(level, timestamp_us, message, [(key, value), ...])`.
    fn logs(&self) -> Vec<LogTuple> {
        self.inner
            .logs()
            .into_iter()
            .map(|l| (l.level, l.timestamp_us, l.message, l.fields))
            .collect()
    }

    /// Ends the session and joins its thread (without the GIL). Idempotent.
    fn close(&self, py: Python<'_>) {
        let s = &self.inner;
        py.detach(|| s.close());
    }

    /// True once the session was closed or died.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Why the session is closed (the `SessionClosed` message), or None while open.
    #[getter]
    fn close_cause(&self) -> Option<String> {
        self.inner.close_cause()
    }

    /// True while the session's native thread is running.
    #[getter]
    fn reader_alive(&self) -> bool {
        self.inner.reader_alive()
    }
}

/// Native half of the PyProxy client. Use the `pyproxy` package instead.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PROTOCOL_VERSION", pyproxy::protocol::PROTOCOL_VERSION)?;
    m.add("CLIENT_NAME", session::CLIENT_NAME)?;
    m.add_class::<PyConnection>()?;
    m.add_class::<PyOutcome>()?;
    m.add_class::<PyValue>()?;
    m.add_class::<PyNotifier>()?;
    Ok(())
}

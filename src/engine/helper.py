"""PyProxy engine helper: runs atoms inside one sub-interpreter and resets it.

The Rust engine compiles this source into a fresh module object in every
sub-interpreter it creates (one copy per interpreter: no object is ever shared
between interpreters) and calls, with that interpreter's GIL held:

* ``setup(out_fd, err_fd, workdir, preload, environ, wake_fd)`` once, right after creation;
* ``run(kind, payload, globals, locals, take, count)`` for every atom;
* ``reset()`` when a session ends, so that the next session finds the
  interpreter as it was when it was warmed up.

The fork backend (``src/fork``) loads the same source into its zygote's main
interpreter as the module ``_pyproxy_engine``, calls ``setup_process(preload)``
instead of ``setup`` and ``run`` in every worker, so both backends give atoms
the same semantics.

Everything here is written so that it never raises out of ``run`` or
``reset``: failures come back as values.
"""

import ast as _ast
import atexit as _atexit
import builtins as _builtins
import copyreg as _copyreg
import gc as _gc
import io as _io
import linecache as _linecache
import os as _os
import pickle as _pickle
import sys as _sys
import threading as _threading
import traceback as _traceback
import types as _types
import warnings as _warnings

import cloudpickle as _cloudpickle

_HELPER_FILE = "<pyproxy-engine>"
_ATOM_FILE = "<atom>"
_MISSING = object()

# Atom kinds, as on the wire (protocol::AtomKind).
_SOURCE, _CODE, _FUNCTION = 0, 1, 2

_FORK_HINT = (
    " \u2014 PyProxy: this module cannot load in a sub-interpreter; use the fork backend "
    '(PyProxySession(..., backend="fork") or pyproxy-server --backend fork)'
)
_SUBINTERP_REFUSALS = (
    "does not support loading in subinterpreters",
    "more than once per process",
    "not supported in subinterpreters",
    "subinterpreter",
)

_stdout = None
_stderr = None
_stdin = None
_out_fd = -1
_err_fd = -1
_workdir = None
_snap = None
# Set by the engine before setup() (src/engine/dict_watch.rs); None where the
# helper runs without it (the fork backend), and then reset() compares every dict.
_watch_dicts = None
_changed_dicts = None
_atexit_registered = []
_FULL_GC_AFTER = 128


def _open_streams():
    global _stdout, _stderr, _stdin
    # Line-buffered so that a line reaches the pipe as soon as it is printed
    # (and the client within about a millisecond: the pump batches a streaming
    # atom's lines per millisecond, src/engine/output.rs); errors=
    # "backslashreplace" so that no str is unprintable.
    _stdout = _io.TextIOWrapper(
        _io.FileIO(_out_fd, "w", closefd=False),
        encoding="utf-8", errors="backslashreplace", line_buffering=True,
    )
    _stderr = _io.TextIOWrapper(
        _io.FileIO(_err_fd, "w", closefd=False),
        encoding="utf-8", errors="backslashreplace", line_buffering=True,
    )
    _stdin = _io.TextIOWrapper(_io.BytesIO(b""), encoding="utf-8")
    _sys.stdout = _sys.__stdout__ = _stdout
    _sys.stderr = _sys.__stderr__ = _stderr
    _sys.stdin = _sys.__stdin__ = _stdin


def _tracking_register(func, *args, **kwargs):
    # atexit keeps what sessions register for the interpreter's lifetime: track
    # it so that reset() can unregister it (else it piles up under churn).
    _atexit_registered.append(func)
    return _real_atexit_register(func, *args, **kwargs)


_real_atexit_register = _atexit.register


# Standard-library extension modules that refuse isolated sub-interpreters on
# 3.12 (measured on 3.12.1). CPython 3.12 runs a single-phase module's init
# function *before* refusing it, and repeating that corrupts memory (seen with
# _decimal under session churn), so they are refused here before any init runs.
# Packages that have a pure-Python fallback (decimal, datetime, asyncio,
# xml.etree) use it, as they would after CPython's own refusal.
_REFUSED_312 = frozenset({
    "_asyncio", "_ctypes", "_curses", "_curses_panel", "_datetime", "_decimal",
    "_elementtree", "_lsprof", "_testbuffer", "_testcapi", "_testclinic",
    "_testimportmultiple", "_testsinglephase", "_tkinter", "_xxtestfuzz",
    "pyexpat", "readline", "xxlimited_35",
})


class _RefuseSinglePhase:
    """Meta-path finder installed on 3.12 only (see _REFUSED_312)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in _REFUSED_312:
            raise ImportError(
                f"module {name} does not support loading in subinterpreters", name=name
            )
        return None


def setup(out_fd, err_fd, workdir, preload, environ, wake_fd):
    """Points the standard streams at the engine's pipes, makes time.sleep
    interruptible through the wake pipe, imports the preload modules and takes
    the snapshot that reset() restores. `environ` is the process environment
    when the engine started: the environment is process-wide, so an
    interpreter warmed up while a session had changed it must not take that
    change for its baseline."""
    global _out_fd, _err_fd, _workdir, _pristine
    _out_fd, _err_fd, _workdir = out_fd, err_fd, workdir
    _open_streams()
    _install_interruptible_sleep(wake_fd)
    _restore_environ(environ)
    if _sys.version_info[:2] == (3, 12):
        _sys.meta_path.insert(0, _RefuseSinglePhase)
    for name in preload:
        __import__(name)
    _atexit.register = _tracking_register
    _gc.collect()
    _take_snapshot(environ)
    _pristine = True


def _install_interruptible_sleep(wake_fd):
    """Replaces time.sleep with one that a cancel, timeout or shutdown cuts short.

    The engine interrupts an atom by setting KeyboardInterrupt as its thread's
    asynchronous exception, which Python raises at its next bytecode; a thread
    inside C's sleep never gets there until the sleep ends, and in a
    sub-interpreter no signal can cut it short either. This sleep waits on the
    interpreter's wake pipe instead, which the engine writes to right after
    setting the exception: select returns, the loop's next iteration raises.
    A wake-up meant for another thread of the interpreter only costs a loop."""
    import select
    import time

    real_sleep = time.sleep
    monotonic = time.monotonic
    wait = select.select
    read = _os.read
    fds = (wake_fd,)

    def sleep(secs, /):
        if type(secs) not in (int, float) or not 0 <= secs < float("inf"):
            return real_sleep(secs)  # its own TypeError, ValueError or OverflowError
        deadline = monotonic() + secs
        while True:
            left = deadline - monotonic()
            if left <= 0:
                return None
            if wait(fds, (), (), min(left, 3600.0))[0]:
                try:
                    read(wake_fd, 512)
                except BlockingIOError:
                    pass

    sleep.__doc__ = real_sleep.__doc__
    sleep.__module__ = "time"
    time.sleep = sleep


def setup_process(preload):
    """The fork backend's set-up, run once in its zygote before any worker is
    forked: the standard streams write to fds 1 and 2 (which each worker points
    at its own pipes) and the preload modules are imported. Nothing here is
    isolated: the zygote is a whole process, so no import is refused and no
    snapshot is taken (a worker is thrown away, never reset)."""
    global _out_fd, _err_fd
    _out_fd, _err_fd = 1, 2
    _open_streams()
    for name in preload:
        __import__(name)
    _gc.collect()


def _take_snapshot(environ):
    global _snap
    modules = dict(_sys.modules)
    dicts = []
    for module in modules.values():
        d = getattr(module, "__dict__", None)
        if type(d) is dict:
            dicts.append((d, dict(d)))
    watched = None
    if _watch_dicts is not None:
        try:
            watched = [cur for cur, _ in dicts]
            _watch_dicts(watched)
            _changed_dicts(watched)
        except Exception:  # no free dict watcher id (8 per interpreter): compare all
            watched = None
    _snap = {
        "modules": modules,
        "dicts": dicts,
        "watched": watched,
        "path": list(_sys.path),
        "meta_path": list(_sys.meta_path),
        "path_hooks": list(_sys.path_hooks),
        "path_importer_cache": dict(_sys.path_importer_cache),
        "warnings_filters": list(_warnings.filters),
        "dispatch_table": dict(_copyreg.dispatch_table),
        "environ": dict(environ),
        # os.environ's own bytes dict (a CPython detail; None elsewhere): equal
        # to it means os.environ is unchanged, checked without decoding it.
        "environ_data": _environ_data(),
        "recursionlimit": _sys.getrecursionlimit(),
        "switchinterval": _sys.getswitchinterval(),
        "int_max_str_digits": _sys.get_int_max_str_digits(),
        "gc_threshold": _gc.get_threshold(),
        "monitoring_tools": _monitoring_tools(),
    }


def _monitoring_tools():
    mon = getattr(_sys, "monitoring", None)
    if mon is None:
        return {}
    return {i: mon.get_tool(i) for i in range(6)}


def _environ_data():
    data = getattr(_os.environ, "_data", None)
    return dict(data) if type(data) is dict else None


def _restore_environ(env, data=None):
    if data is not None and getattr(_os.environ, "_data", None) == data:
        return
    if dict(_os.environ) != env:
        for k in [k for k in _os.environ if k not in env]:
            del _os.environ[k]
        for k, v in env.items():
            if _os.environ.get(k) != v:
                _os.environ[k] = v


# --- running an atom ---------------------------------------------------------

def _qualname(tp):
    module = getattr(tp, "__module__", None) or "builtins"
    return f"{module}.{getattr(tp, '__qualname__', tp.__name__)}"


def _safe_str(obj):
    try:
        return str(obj)
    except BaseException as e:  # noqa: BLE001 - a broken __str__ must not escape
        return f"<str() failed: {type(e).__name__}>"


# Buffers at least this large travel out of band, after the pickle
# (docs/protocol.md, "Out-of-band buffers"); smaller ones stay in it.
_OOB_MIN = 64 * 1024


def _has_big_buffers(obj, depth=2):
    """Whether `obj` holds a large ``bytes`` or ``bytearray`` near the top (as
    itself, or in a dict, list or tuple two levels down): only then is the value
    pickled with a ``persistent_id`` (a Python call per object). A miss only means
    that buffer is copied into the pickle."""
    t = type(obj)
    if t is bytes or t is bytearray:
        return len(obj) >= _OOB_MIN
    if depth == 0:
        return False
    if t is dict:
        items = obj.values()
    elif t is list or t is tuple:
        items = obj
    else:
        return False
    if len(items) > 1000:
        return True
    return any(_has_big_buffers(v, depth - 1) for v in items)


def _oob_pickler(base):
    class Pickler(base):
        """Sets large ``bytes`` and ``bytearray`` aside as persistent ids (the C
        pickler offers them to no other hook): ``("bytes", i)`` or
        ``("bytearray", i)``, i their index among the message's buffers."""

        def persistent_id(self, obj):
            t = type(obj)
            if (t is bytes or t is bytearray) and len(obj) >= _OOB_MIN:
                self.oob.append(obj)
                return ("bytes" if t is bytes else "bytearray", len(self.oob) - 1)
            return None

    return Pickler


_OobPickler = _oob_pickler(_pickle.Pickler)
_OobCloudPickler = _oob_pickler(_cloudpickle.Pickler)


def _dumps_oob(value, cls, plain):
    buffers = []

    def keep(pb):
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: pickled in band
            return True
        if raw.nbytes < _OOB_MIN:
            return True
        buffers.append(raw)
        return False

    if not _has_big_buffers(value):
        return plain(value, protocol=5, buffer_callback=keep), buffers
    out = _io.BytesIO()
    pickler = cls(out, protocol=5, buffer_callback=keep)
    pickler.oob = buffers
    pickler.dump(value)
    return out.getvalue(), buffers


def _dumps(value):
    """(pickle, buffers): the value pickled with protocol 5, its large buffers
    out of band, in the order the pickle takes them."""
    if type(value) in _IN_BAND:
        return _pickle.dumps(value, 5), []
    try:
        return _dumps_oob(value, _OobPickler, _pickle.dumps)
    except Exception:
        pass
    try:
        return _dumps_oob(value, _OobCloudPickler, _cloudpickle.dumps)
    except Exception as e:
        raise TypeError(
            f"the atom's return value of type {_qualname(type(value))} cannot be pickled: "
            f"{_safe_str(e)}"
        ) from None


# Compiled source atoms by text. Code objects are immutable and every run gets a
# fresh namespace, so running a cached one is indistinguishable from compiling
# anew; compiling was the largest Python cost of a small source atom.
_SOURCE_CACHE = {}
_SOURCE_CACHE_ENTRIES = 256
_SOURCE_CACHE_MAX_TEXT = 16 * 1024


def _compile_source(src):
    """(statements, value): code for the atom's statements (None when the whole
    text is one expression) and for its value (None when it does not end in an
    expression statement)."""
    hit = _SOURCE_CACHE.get(src)
    if hit is not None:
        return hit
    try:
        compiled = (None, compile(src, _ATOM_FILE, "eval", dont_inherit=True))
    except SyntaxError:
        tree = _ast.parse(src, _ATOM_FILE, "exec")
        value = None
        if tree.body and isinstance(tree.body[-1], _ast.Expr):
            expr = _ast.Expression(tree.body.pop().value)
            value = compile(expr, _ATOM_FILE, "eval", dont_inherit=True)
        compiled = (compile(tree, _ATOM_FILE, "exec", dont_inherit=True), value)
    if len(src) <= _SOURCE_CACHE_MAX_TEXT:
        if len(_SOURCE_CACHE) >= _SOURCE_CACHE_ENTRIES:
            del _SOURCE_CACHE[next(iter(_SOURCE_CACHE))]
        _SOURCE_CACHE[src] = compiled
    return compiled


def _run_source(src, ns, loc):
    # Registered so that tracebacks show the atom's lines.
    _linecache.cache[_ATOM_FILE] = (len(src), None, src.splitlines(True), _ATOM_FILE)
    statements, value = _compile_source(src)
    if statements is not None:
        exec(statements, ns, loc)
    return eval(value, ns, loc) if value is not None else None


# Functions rebuilt from their pickle, by the pickle's bytes. Unpickling a
# cloudpickled function (a code object, a globals dict, cloudpickle's
# _function_setstate) was most of a small function atom's cost here. Only a
# function made entirely of immutable values (see _function_parts) is kept, and
# every call gets a new function object with a new globals dict, new closure
# cells and new keyword defaults, so a call can change nothing the next one
# sees: the same as unpickling the same bytes again. reset() empties it, so
# nothing a session patched (cloudpickle itself, say) outlives the session.
_FUNCTION_CACHE = {}
# Functions first loaded while the interpreter was pristine: by the first atom
# after setup or a reset that left no thread of the session running, before any
# of that atom's other pickles. Nothing a session did can have shaped them —
# they are what their bytes give in the warm snapshot's state, as in any
# session — so reset() keeps them, and a new session's first function atom
# (W5) is not unpickled anew.
_PRISTINE_FUNCTIONS = {}
# True from setup() or such a reset() until the next atom starts.
_pristine = False
_FUNCTION_CACHE_ENTRIES = 256
_FUNCTION_CACHE_MAX_PICKLE = 16 * 1024
_IMMUTABLE = frozenset({type(None), bool, int, float, complex, str, bytes})
# Values that pickle in band and never fail (a large `bytes` may go out of
# band): most atoms return one, and `_dumps`'s general path costs ~0.8 µs more.
_IN_BAND = _IMMUTABLE - {bytes}
_FunctionType = _types.FunctionType


def _immutable(value, depth=3):
    t = type(value)
    if t in _IMMUTABLE:
        return True
    if t is tuple and depth > 0:
        return all(_immutable(v, depth - 1) for v in value)
    return False


def _function_parts(fn):
    """What a copy of `fn` is made from, when every part of it is immutable (a
    copy then behaves exactly as a fresh unpickle of the same bytes), else None."""
    if type(fn) is not _FunctionType or fn.__dict__:
        return None
    try:
        if fn.__annotations__:  # evaluated on access from 3.14 on, and may raise
            return None
    except Exception:
        return None
    if getattr(fn, "__type_params__", ()):
        return None
    g = fn.__globals__
    for k, v in g.items():
        if type(k) is not str or not (_immutable(v) or k == "__builtins__"):
            return None
    defaults, kwdefaults, closure = fn.__defaults__, fn.__kwdefaults__, fn.__closure__
    if defaults is not None and not _immutable(defaults):
        return None
    if kwdefaults is not None and not all(
        type(k) is str and _immutable(v) for k, v in kwdefaults.items()
    ):
        return None
    cells = None
    if closure is not None:
        cells = []
        for cell in closure:
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                value = _MISSING
            if value is not _MISSING and not _immutable(value):
                return None
            cells.append(value)
        cells = tuple(cells)
    if kwdefaults is not None:
        kwdefaults = dict(kwdefaults)  # not the dict this (first) call's function holds
    return (fn.__code__, dict(g), fn.__name__, defaults, kwdefaults, cells,
            fn.__qualname__, fn.__module__, fn.__doc__)


def _function_from_parts(parts):
    code, g, name, defaults, kwdefaults, cells, qualname, module, doc = parts
    closure = None
    if cells is not None:
        closure = tuple(_types.CellType() if v is _MISSING else _types.CellType(v) for v in cells)
    fn = _FunctionType(code, dict(g), name, defaults, closure)
    fn.__qualname__ = qualname
    fn.__module__ = module
    fn.__doc__ = doc
    if kwdefaults is not None:
        fn.__kwdefaults__ = dict(kwdefaults)
    return fn


def _cached_function(payload):
    """The cached parts of the function pickled as `payload`; None if not cached,
    False if it was found not to be copyable."""
    if type(payload) is not bytes:
        return None
    parts = _FUNCTION_CACHE.get(payload)
    if parts is None:
        parts = _PRISTINE_FUNCTIONS.get(payload)
    return parts


def _load_function(payload, taken, pristine):
    if type(payload) is not bytes:
        return taken.loads(payload)
    parts = _cached_function(payload)
    if parts:
        return _function_from_parts(parts)
    before = taken._next
    fn = taken.loads(payload)
    # A pickle that took out-of-band buffers depends on more than its bytes.
    if parts is None and taken._next == before and len(payload) <= _FUNCTION_CACHE_MAX_PICKLE:
        cache = _PRISTINE_FUNCTIONS if pristine else _FUNCTION_CACHE
        if len(cache) >= _FUNCTION_CACHE_ENTRIES:
            del cache[next(iter(cache))]
        # False remembers a function that cannot be copied: not checked again.
        cache[payload] = _function_parts(fn) or False
    return fn


class _OobUnpickler(_pickle.Unpickler):
    def persistent_load(self, pid):
        return self.oob.persistent_load(pid)


class _Buffers:
    """The `count` out-of-band buffers of one message, taken in order by its
    pickles: a persistent id ``("bytes", i)`` or ``("bytearray", i)`` takes
    buffer i, which must be the next one, as that type; a ``NEXT_BUFFER`` opcode
    takes the next one as a ``bytearray`` (writable, as protocol 5 gives it to
    numpy). ``take(i, as_bytearray)`` makes the object (the engine's copies the
    frame's bytes once; the fork worker's hands over what it read)."""

    def __init__(self, take, count):
        self._fetch = take
        self._count = count
        self._next = 0

    def _take(self, as_bytearray):
        i = self._next
        if i >= self._count:
            raise _pickle.UnpicklingError(
                f"the pickle takes more out-of-band buffers than the {self._count} sent"
            )
        self._next = i + 1
        return self._fetch(i, as_bytearray)

    def persistent_load(self, pid):
        if type(pid) is tuple and len(pid) == 2 and pid[1] == self._next:
            if pid[0] == "bytes":
                return self._take(False)
            if pid[0] == "bytearray":
                return self._take(True)
        raise _pickle.UnpicklingError(f"unknown persistent id {pid!r}")

    def __iter__(self):
        return self

    def __next__(self):
        return self._take(True)

    def loads(self, data):
        if not self._count:
            return _pickle.loads(data)
        u = _OobUnpickler(_io.BytesIO(data), buffers=self)
        u.oob = self
        return u.load()

    def finish(self):
        if self._next != self._count:
            raise _pickle.UnpicklingError(
                f"{self._count} out-of-band buffers were sent, the pickles took {self._next}"
            )


def _run(kind, payload, gbytes, lbytes, take, count):
    global _pristine
    # The function's pickle is loaded pristine only if nothing of the session's
    # ran before it: not an earlier atom, nor this atom's globals or locals.
    pristine = _pristine and gbytes is None and lbytes is None
    _pristine = False
    if kind == _FUNCTION and gbytes is None and lbytes is None and not count:
        # The common function atom, already cached: a fresh copy, called.
        parts = _cached_function(payload)
        if parts:
            return _function_from_parts(parts)()
    ns = {"__builtins__": _builtins, "__name__": "__main__"}
    taken = _Buffers(take, count)
    g = taken.loads(gbytes) if gbytes is not None else None
    loc = taken.loads(lbytes) if lbytes is not None else None
    fn = code = None
    if kind == _CODE:
        code = taken.loads(payload)
    elif kind == _FUNCTION:
        fn = _load_function(payload, taken, pristine)
    taken.finish()
    del taken, take
    if g is not None:
        ns.update(g)
    if kind == _SOURCE:
        return _run_source(payload.decode("utf-8"), ns, loc)
    if kind == _CODE:
        return eval(code, ns, loc)
    if kind == _FUNCTION:
        # A function carries its own globals; the atom's globals are added to them.
        fg = getattr(fn, "__globals__", None)
        if g is not None and type(fg) is dict:
            fg.update(g)
        return fn()
    raise ValueError(f"unknown atom kind {kind}")


# Set by a fork worker whose address space is limited (--worker-memory): a
# MemoryError there says so, and stays a MemoryError.
_MEMORY_LIMIT_HINT = None


def _names_memory_limit(e):
    text = _safe_str(e)
    _set_message(e, f"{text} ({_MEMORY_LIMIT_HINT})" if text else _MEMORY_LIMIT_HINT)


def _set_message(e, message):
    """Makes `message` what str(e) gives, keeping e's type (and further args)."""
    try:
        if isinstance(e, ImportError):
            e.msg = message
        e.args = (message,) + tuple(e.args[1:])
    except Exception:
        pass


def _names_fork_backend(e):
    """If the import failed because the module refuses sub-interpreters, says so
    in the exception's message (the chain is searched: packages re-raise)."""
    seen = set()
    cur = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = _safe_str(cur)
        if any(marker in text for marker in _SUBINTERP_REFUSALS):
            break
        cur = cur.__cause__ or cur.__context__
    else:
        return
    _set_message(e, _safe_str(e) + _FORK_HINT)


def _exception_result(e):
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == _HELPER_FILE:
        tb = tb.tb_next
    try:
        e = e.with_traceback(tb)
    except Exception:
        pass
    if isinstance(e, ImportError):
        _names_fork_backend(e)
    elif isinstance(e, MemoryError) and _MEMORY_LIMIT_HINT:
        _names_memory_limit(e)
    try:
        text = "".join(_traceback.format_exception(type(e), e, tb))
    except BaseException:  # noqa: BLE001
        text = f"{_qualname(type(e))}: {_safe_str(e)}\n"
    pickled = None
    for dumps in (_pickle.dumps, _cloudpickle.dumps):
        try:
            data = dumps(e, protocol=5)
            _pickle.loads(data)  # an exception that pickles but cannot be rebuilt is useless
        except BaseException:  # noqa: BLE001
            continue
        pickled = data
        break
    return (1, _qualname(type(e)), _safe_str(e), text, pickled)


def _flush():
    out, err = _sys.stdout, _sys.stderr
    if out is _stdout and err is _stderr:
        streams = (out, err)  # the usual case, without building a set per atom
    else:
        streams = {id(s): s for s in (out, err, _stdout, _stderr)}.values()
    for stream in streams:
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a closed or odd stream must not fail the atom
            pass


def run(kind, payload, gbytes, lbytes, take=None, count=0):
    """Returns (0, pickled value, [out-of-band buffers]) or (1, type name, message,
    traceback, pickled exception or None). `take(i, as_bytearray)` gives the EVAL's
    out-of-band buffer i as a new ``bytes`` or ``bytearray``; `count` of them."""
    try:
        try:
            return (0, *_dumps(_run(kind, payload, gbytes, lbytes, take, count)))
        except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are results too
            return _exception_result(e)
        finally:
            _linecache.cache.pop(_ATOM_FILE, None)
            _flush()
    except BaseException as e:  # noqa: BLE001 - an interrupt may land in the handlers above
        return (1, _qualname(type(e)), _safe_str(e), "", None)


# --- resetting between sessions ----------------------------------------------

def _restore_dict(cur, snap):
    # dict equality is a C loop that short-cuts identical values, so the common
    # case (nothing changed) is cheap. A value replaced by an equal one is left.
    try:
        if cur == snap:
            return
    except Exception:  # an odd __eq__ of a value the session stored
        pass
    for k in [k for k in cur if k not in snap]:
        del cur[k]
    for k, v in snap.items():
        if cur.get(k, _MISSING) is not v:
            cur[k] = v


def _restore_list(cur, snap):
    if len(cur) != len(snap) or any(a is not b for a, b in zip(cur, snap)):
        cur[:] = snap


def reset():
    """Restores the warm snapshot. Returns the number of Python threads that the
    session left running (they keep running: the engine logs them)."""
    global _pristine
    s = _snap
    _flush()
    if _stdout.closed or _stderr.closed:
        old = (_stdout, _stderr, _stdin)
        _open_streams()
        for _, d in s["dicts"]:
            for k in ("stdout", "__stdout__", "stderr", "__stderr__", "stdin", "__stdin__"):
                if d.get(k, _MISSING) in old:
                    d[k] = {"stdout": _stdout, "__stdout__": _stdout, "stderr": _stderr,
                            "__stderr__": _stderr, "stdin": _stdin, "__stdin__": _stdin}[k]

    for func in _atexit_registered:
        _atexit.unregister(func)
    _atexit_registered.clear()

    modules = _sys.modules
    snap_modules = s["modules"]
    for name in [n for n in modules if n not in snap_modules]:
        modules.pop(name, None)
    for name, module in snap_modules.items():
        if modules.get(name, _MISSING) is not module:
            modules[name] = module
    watched = s["watched"]
    if watched is None:
        for cur, snap in s["dicts"]:
            _restore_dict(cur, snap)
    else:
        # Only the dicts the session changed; comparing all ~90 cost ~300 µs.
        dicts = s["dicts"]
        for i in _changed_dicts(watched):
            _restore_dict(*dicts[i])
        _changed_dicts(watched)  # the changes the restores just made

    _restore_list(_sys.path, s["path"])
    _restore_list(_sys.meta_path, s["meta_path"])
    _restore_list(_sys.path_hooks, s["path_hooks"])
    _restore_dict(_sys.path_importer_cache, s["path_importer_cache"])
    _restore_list(_warnings.filters, s["warnings_filters"])
    mutated = getattr(_warnings, "_filters_mutated", None)
    if mutated is not None:
        mutated()
    _restore_dict(_copyreg.dispatch_table, s["dispatch_table"])
    _linecache.clearcache()
    _FUNCTION_CACHE.clear()

    _restore_environ(s["environ"], s["environ_data"])
    if _workdir is not None and _os.getcwd() != _workdir:
        _os.chdir(_workdir)

    _sys.setrecursionlimit(s["recursionlimit"])
    _sys.setswitchinterval(s["switchinterval"])
    _sys.set_int_max_str_digits(s["int_max_str_digits"])
    _sys.settrace(None)
    _sys.setprofile(None)
    mon = getattr(_sys, "monitoring", None)
    if mon is not None:
        for i, name in s["monitoring_tools"].items():
            if mon.get_tool(i) != name:
                for event_tool in (i,):
                    try:
                        mon.set_events(event_tool, 0)
                        mon.free_tool_id(event_tool)
                    except Exception:
                        pass
    _gc.enable()
    _gc.set_threshold(*s["gc_threshold"])
    # The session's namespaces and functions are young cycles: collect the young
    # generations now (~2 µs) and everything once _FULL_GC_AFTER young collections
    # have run since the last full one: one per reset, more for a session that
    # allocated a lot. A full collection costs ~2.5-3 ms and sessions may be
    # waiting for resets (W7: 1,000 of them, one after another on the pool
    # thread); CPython's own thresholds still collect the old generation of a
    # session that allocates much. W7's wall, eight alternated pairs: a full
    # collection every 32nd reset 0.70-0.80 s, every 128th 0.63-0.79 s.
    _gc.collect(2 if _gc.get_count()[2] >= _FULL_GC_AFTER else 1)

    main = _threading.main_thread()
    running = sum(
        1 for t in _threading.enumerate()
        if t is not main and not isinstance(t, _threading._DummyThread)
    )
    # A thread the session left running can still change anything.
    _pristine = running == 0
    return running

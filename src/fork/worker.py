"""PyProxy fork backend: the loop every worker process runs.

The zygote loads this module (as ``_pyproxy_fork_worker``) next to the
engine's helper (``_pyproxy_engine``, ``src/engine/helper.py``) and calls
``prepare(preload)`` once. Each forked worker calls ``serve(3)``: fd 3 is its
control socket to the server, fds 1 and 2 are pipes the server reads. Atoms
run through the helper's ``run``, so both backends give them the same
semantics. The message format is ``src/fork/wire.rs``'s: a ``u32`` big-endian
length of what follows, a tag byte, the body; an ATOM or a value RESULT ends
with the lengths of its out-of-band buffers, whose bytes follow it.

SIGINT is ignored while the worker waits and turned into KeyboardInterrupt
only while an atom runs, so the server's interrupt (cancel, timeout) can never
kill the loop between atoms.
"""

import os as _os
import resource as _resource  # here, in the zygote: a worker under --user may not read the stdlib
import signal as _signal
import socket as _socket
import struct as _struct

import _pyproxy_engine as _helper

_INIT, _ATOM, _READY, _RESULT = 1, 2, 3, 4
_LEN = _struct.Struct(">I")
_fflush = None


def prepare(preload):
    """In the zygote, before any fork: streams, cloudpickle, preload modules."""
    global _fflush
    _helper.setup_process(list(preload))
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.fflush.argtypes = [ctypes.c_void_p]
        _fflush = libc.fflush
    except Exception:  # noqa: BLE001 - without ctypes, C stdio is flushed at exit only
        _fflush = None
    _warm_up()


def _warm_up():
    """Runs one function atom, made here, through the helper as a session's first
    atom would run: in the zygote it does the first-use work of that path (caches,
    lazily built objects) once for every worker; in a worker, which runs it while
    it waits to be taken, it makes private the copy-on-write pages the path writes
    (reference counts), which a session's first atom paid for before (0.87-0.96 ms
    for a no-op function atom then, 0.58-0.59 ms with this)."""
    fn = eval("lambda: None", {"__name__": "__main__", "__builtins__": __builtins__})
    payload = _helper._cloudpickle.dumps(fn, protocol=5)
    _helper.run(2, payload, None, None, None, 0)
    _helper._FUNCTION_CACHE.pop(payload, None)


def _flush_c():
    # C code (printf) buffers fully when stdout is a pipe: hand its bytes to the
    # pipe before the result, so they belong to the atom that wrote them.
    if _fflush is not None:
        _fflush(None)


def _read_exact(fd, n):
    parts = []
    while n:
        chunk = _os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _recv(fd):
    head = _read_exact(fd, 4)
    if head is None:
        return None
    (length,) = _LEN.unpack(head)
    body = _read_exact(fd, length)
    if body is None or not body:
        return None
    return body[0], body[1:]


# Set by the zygote: read_bytes(fd, n), native, straight into a new bytes
# (huge pages when large); None at end of stream.
_read_bytes = None


def _read_buffer(fd, n):
    """`n` bytes as one ``bytes`` object the kernel fills directly (no join)."""
    if _read_bytes is not None:
        return _read_bytes(fd, n)
    sock = _socket.socket(fileno=_os.dup(fd))
    try:
        data = sock.recv(n, _socket.MSG_WAITALL) if n else b""
    finally:
        sock.close()
    if len(data) == n:
        return data
    rest = _read_exact(fd, n - len(data))  # interrupted: finish the slow way
    return None if rest is None else data + rest


def _taker(buffers):
    """`take(i, as_bytearray)` for the helper: the ``bytes`` read from the socket
    as they are (no copy), or a ``bytearray`` copy of one."""

    def take(i, as_bytearray):
        b = buffers[i]
        buffers[i] = None
        return bytearray(b) if as_bytearray else b

    return take


def _send(fd, tag, body, buffers=()):
    """The message, then each buffer from where it lies (vectored writes)."""
    parts = [memoryview(_LEN.pack(len(body) + 1) + bytes((tag,)) + body)]
    parts += [memoryview(b).cast("B") for b in buffers if len(b)]
    while parts:
        n = _os.writev(fd, parts[:64])
        while n and n >= len(parts[0]):
            n -= len(parts[0])
            parts.pop(0)
        if n:
            parts[0] = parts[0][n:]


def _opt(view, pos):
    if view[pos] == 0:
        return None, pos + 1
    (n,) = _LEN.unpack_from(view, pos + 1)
    start = pos + 5
    return bytes(view[start:start + n]), start + n


def _decode_atom(body):
    """(kind, globals, locals, payload, buffer lengths)."""
    view = memoryview(body)
    kind = view[0]
    g, pos = _opt(view, 1)
    loc, pos = _opt(view, pos)
    (n,) = _LEN.unpack_from(view, pos)
    payload = bytes(view[pos + 4:pos + 4 + n])
    pos += 4 + n
    (count,) = _LEN.unpack_from(view, pos)
    lengths = [_LEN.unpack_from(view, pos + 4 + 4 * i)[0] for i in range(count)]
    return kind, g, loc, payload, lengths


def _text(s):
    b = s.encode("utf-8", "backslashreplace")
    return _LEN.pack(len(b)) + b


def _encode_result(r):
    if r[0] == 0:
        _, pickled, buffers = r
        parts = [b"\x00", _LEN.pack(len(pickled)), pickled, _LEN.pack(len(buffers))]
        parts += [_LEN.pack(memoryview(b).nbytes) for b in buffers]
        return b"".join(parts)
    _, type_name, message, traceback, pickled = r
    parts = [b"\x01", _text(type_name), _text(message), _text(traceback)]
    if pickled is None:
        parts.append(b"\x00")
    else:
        parts += [b"\x01", _LEN.pack(len(pickled)), pickled]
    return b"".join(parts)


def _init(cwd):
    if cwd:
        try:
            _os.chdir(cwd)
        except OSError as e:
            return f"cannot enter {cwd.decode(errors='replace')}: {e}".encode()
    return b""


def _ignore_sigint():
    # signal.signal() first runs the handlers of signals already caught: a SIGINT
    # that lands just after the atom returned raises here, and must not end the worker.
    while True:
        try:
            _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
            return
        except KeyboardInterrupt:
            pass


def serve(fd, env=None):
    """Runs atoms from the control socket until the server closes it. `env`:
    entries to set first (the --user's HOME, USER, LOGNAME)."""
    if env:
        _os.environ.update(env)
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    limit = _resource.getrlimit(_resource.RLIMIT_AS)[0]
    if limit != _resource.RLIM_INFINITY:
        _helper._MEMORY_LIMIT_HINT = (
            f"the worker's address space is limited to {limit >> 20} MiB (RLIMIT_AS, --worker-memory)"
        )
    _warm_up()
    while True:
        msg = _recv(fd)
        if msg is None:
            break
        tag, body = msg
        if tag == _INIT:
            _send(fd, _READY, _init(body))
        elif tag == _ATOM:
            kind, g, loc, payload, lengths = _decode_atom(body)
            buffers = []
            for n in lengths:
                b = _read_buffer(fd, n)
                if b is None:
                    return
                buffers.append(b)
            try:
                _signal.signal(_signal.SIGINT, _signal.default_int_handler)
                r = _helper.run(kind, payload, g, loc, _taker(buffers), len(buffers))
            except KeyboardInterrupt:
                # The interrupt landed outside run's own handlers.
                r = (1, "builtins.KeyboardInterrupt", "", "", None)
            finally:
                _ignore_sigint()
            _flush_c()
            _send(fd, _RESULT, _encode_result(r), r[2] if r[0] == 0 else ())
            del r, buffers
    _helper._flush()
    _flush_c()

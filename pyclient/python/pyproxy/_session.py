"""PyProxySession: the Python face of one session (two TCP streams, one native thread).

This module does what needs Python — parsing the address, finding the token,
pickling atoms with cloudpickle in the caller's thread, splitting output into
lines — and leaves the streams to ``pyproxy._native.Connection``.
"""

from __future__ import annotations

import io
import os
import pickle
import platform
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle  # type: ignore[import-untyped]

from . import _fncache, _native
from ._errors import PyProxyError, SessionClosed
from ._future import PyProxyFuture

__all__ = ["PyProxySession", "LogRecord", "Address"]

Address = str | tuple[str, int]

_SOURCE, _CODE, _FUNCTION = 0, 1, 2
# Sent in every HELLO; looked up once (platform.python_version() cost ~10 µs
# on a cold session open, W5).
_IMPLEMENTATION = sys.implementation.name
_PYTHON_VERSION = platform.python_version()
_PICKLE_PROTOCOL = 5
_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", "TRACE")


@dataclass(frozen=True)
class LogRecord:
    """A server log record about the session (see :meth:`PyProxySession.logs`)."""

    level: str
    """``CRITICAL``, ``ERROR``, ``WARNING``, ``INFO``, ``DEBUG`` or ``TRACE``."""
    time: float
    """When the server logged it, in seconds since the Unix epoch."""
    message: str
    """The record's message."""
    fields: dict[str, str] = field(default_factory=dict)
    """The record's key/value pairs (e.g. ``atom``, ``duration_ms``)."""


# Buffers at least this large (a bytes or bytearray value, a numpy array's data)
# travel out of band, after the pickles (docs/protocol.md, "Out-of-band buffers").
_OUT_OF_BAND_MIN = 64 * 1024


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle; large buffers leave only through ``buffer_callback``."""


class _BigPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle that sets large ``bytes`` and ``bytearray`` aside as persistent
    ids ``("bytes", i)``/``("bytearray", i)``, i their index among the EVAL's
    buffers (the C pickler consults ``persistent_id`` for every object, but no
    other hook for these two types). A Python call per pickled object costs a
    few µs for a small atom, so it is used only when :func:`_has_big_bytes`
    finds large buffers where they usually are."""

    def __init__(self, *args: Any, oob: list[Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.oob = oob

    def persistent_id(self, obj: Any) -> tuple[str, int] | None:
        t = type(obj)
        if (t is bytes or t is bytearray) and len(obj) >= _OUT_OF_BAND_MIN:
            self.oob.append(obj)
            return ("bytes" if t is bytes else "bytearray", len(self.oob) - 1)
        return None


def _has_big_bytes(obj: Any, depth: int = 2) -> bool:
    """Whether `obj` holds a large ``bytes`` or ``bytearray`` near the top: as
    itself, a value of a dict, list or tuple (two levels down), or a function's
    closure cell, default or referenced global. A miss only means that buffer is
    copied in band."""
    t = type(obj)
    if t is bytes or t is bytearray:
        return len(obj) >= _OUT_OF_BAND_MIN
    if depth == 0:
        return False
    if t is dict:
        items: Any = obj.values()
    elif t is list or t is tuple:
        items = obj
    elif t is types.FunctionType:
        code = obj.__code__
        items = list(obj.__defaults__ or ())
        for cell in obj.__closure__ or ():
            try:
                items.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        g = obj.__globals__
        items += [g[n] for n in code.co_names if n in g]
    else:
        return False
    if len(items) > 1000:
        return True  # too many to look at cheaply: let the pickler check each
    return any(_has_big_bytes(v, depth - 1) for v in items)


def _dumps(obj: Any, oob: list[Any]) -> bytes:
    """Pickles `obj` (protocol 5, cloudpickle) for an EVAL field. Its large buffers
    are appended to `oob`, the EVAL's out-of-band buffers, which the native layer
    writes to the socket from where they lie: ``bytes`` and ``bytearray`` as
    persistent ids, other buffers (numpy arrays' data) through protocol 5's
    ``buffer_callback`` (``NEXT_BUFFER``). Fields must be pickled in wire order
    (globals, locals, payload): the pickles take the buffers in that order."""

    def keep(pb: pickle.PickleBuffer) -> bool:
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: pickle copies it in band
            return True
        if raw.nbytes < _OUT_OF_BAND_MIN:
            return True
        oob.append(raw)
        return False

    out = io.BytesIO()
    if _has_big_bytes(obj):
        pickler: Any = _BigPickler(out, protocol=_PICKLE_PROTOCOL, buffer_callback=keep, oob=oob)
    else:
        pickler = _Pickler(out, protocol=_PICKLE_PROTOCOL, buffer_callback=keep)
    pickler.dump(obj)
    return out.getvalue()


def _parse_address(address: Address) -> tuple[str, int]:
    if isinstance(address, tuple):
        return str(address[0]), int(address[1])
    if not isinstance(address, str):
        raise TypeError(f"address must be 'host:port' or (host, port), not {type(address).__name__}")
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise ValueError(f"address must look like 'host:port' (e.g. 'localhost:9000'), got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


def _find_token(token: str | None, port: int) -> tuple[str | None, str]:
    """The token and where it came from; or None and where the client looked."""
    if token is not None:
        return token, "the token= argument"
    env = os.environ.get("PYPROXY_TOKEN")
    if env:
        return env.strip(), "the PYPROXY_TOKEN environment variable"
    home = Path(os.environ.get("PYPROXY_HOME") or Path.home() / ".pyproxy")
    path = home / "tokens" / str(port)
    try:
        text = path.read_text().strip()
    except OSError as e:
        reason = "does not exist" if isinstance(e, FileNotFoundError) else f"is unreadable: {e.strerror}"
        return None, f"no token= argument, PYPROXY_TOKEN is not set, and {path} {reason}"
    if not text:
        return None, f"no token= argument, PYPROXY_TOKEN is not set, and {path} is empty"
    return text, str(path)


class PyProxySession:
    """A session with a PyProxy server: send atoms, receive their output and results.

    ``PyProxySession("localhost:9000").connect()`` opens the session's two TCP
    streams (main-stream and output-stream) and starts its one native background
    thread, which never takes the GIL. Like a TCP stream, a session cannot be
    reopened once closed or dead; open a new one.

    `address` is ``"host:port"`` or ``(host, port)``. `token` defaults to the
    ``PYPROXY_TOKEN`` environment variable, else the file
    ``$PYPROXY_HOME/tokens/<port>`` (``PYPROXY_HOME`` defaults to ``~/.pyproxy``)
    that the server writes. `backend` asks for ``"subinterp"`` or ``"fork"``
    (None: the server's default). `connect_timeout` bounds connect plus handshake.
    Usable as a context manager (connects on entry if needed, closes on exit).
    """

    def __init__(
        self,
        address: Address,
        *,
        token: str | None = None,
        backend: str | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self._host, self._port = _parse_address(address)
        self._token = token
        self._backend = backend or ""
        self._connect_timeout = connect_timeout
        self._conn: _native.Connection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        if self._conn is None:
            state = "not connected"
        else:
            state = f"session_id={self._conn.session_id} " + ("closed" if self._conn.closed else "open")
        return f"<PyProxySession {self._host}:{self._port} {state}>"

    def connect(self) -> PyProxySession:
        """Opens both streams and completes the handshake (GIL released); returns self.

        Raises :class:`ConnectFailed`, :class:`AuthError`, :class:`VersionMismatch`,
        :class:`ProtocolError` (not a PyProxy server) or :class:`SessionRefused`
        (the server refused the session or one of its two connections, e.g. an
        unknown backend, ``--max-sessions`` or ``--max-conns-per-peer``; the
        message carries the server's reason). A session that was ever connected
        cannot connect again: this raises :class:`PyProxyError`.
        """
        with self._lock:
            if self._conn is not None:
                raise PyProxyError(
                    f"{self!r} was already connected; sessions are never reopened — "
                    f"create a new PyProxySession"
                )
            token, source = _find_token(self._token, self._port)
            self._conn = _native.Connection.open(
                self._host,
                self._port,
                token=token,
                token_source=source,
                backend=self._backend,
                connect_timeout=self._connect_timeout,
                implementation=_IMPLEMENTATION,
                python_version=_PYTHON_VERSION,
            )
        return self

    def _connection(self) -> _native.Connection:
        conn = self._conn
        if conn is None:
            raise PyProxyError("this PyProxySession is not connected; call connect() first")
        return conn

    @property
    def session_id(self) -> int | None:
        """The id the server assigned to this session (None before connect)."""
        return None if self._conn is None else self._conn.session_id

    @property
    def backend(self) -> str | None:
        """The backend the session runs on, as the server reported it (None before connect)."""
        return None if self._conn is None else self._conn.backend

    @property
    def server_python_version(self) -> str | None:
        """The server's Python version, ``major.minor.micro`` (None before connect)."""
        return None if self._conn is None else self._conn.server_python_version

    @property
    def closed(self) -> bool:
        """True once the session was closed or died (False before connect)."""
        return self._conn is not None and self._conn.closed

    @property
    def close_reason(self) -> str | None:
        """Why the session is closed — the :class:`SessionClosed` message — or None while open."""
        return None if self._conn is None else self._conn.close_cause

    def eval(
        self,
        atom: str | types.CodeType | Callable[[], Any],
        locals: Mapping[str, Any] | None = None,
        globals: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> PyProxyFuture:
        """Sends an atom to run on the server and returns its :class:`PyProxyFuture`.

        `atom` is Python source text (its value is that of the final expression, as
        in a notebook), a code object, or a callable called with no arguments.
        Code objects and callables are pickled with cloudpickle here, in the calling
        thread, so functions from ``__main__``, closures and lambdas work; they need
        the server's Python major.minor. `globals` and `locals` are pickled likewise.
        `timeout` (seconds) interrupts the atom on the server (:class:`AtomTimeout`).
        Does not wait for the atom; raises :class:`SessionClosed` if the session is gone.
        """
        conn = self._connection()
        if isinstance(atom, str):
            kind = _SOURCE
        elif isinstance(atom, types.CodeType):
            kind = _CODE
        elif callable(atom):
            kind = _FUNCTION
        else:
            raise TypeError(f"an atom is source text, a code object or a callable, not {type(atom).__name__}")
        # In wire order: the pickles take the out-of-band buffers in this order.
        oob: list[Any] = []
        g = None if globals is None else _dumps(dict(globals), oob)
        loc = None if locals is None else _dumps(locals, oob)
        if kind == _SOURCE:
            payload = atom.encode("utf-8")  # type: ignore[union-attr]
        elif kind == _FUNCTION:
            payload = _fncache.pickled_function(atom, oob, _dumps)  # type: ignore[arg-type]
        else:
            payload = _dumps(atom, oob)
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, got {timeout}")
        # An infinite (or absurdly long) timeout is no timeout.
        timeout_ms = None if timeout is None or timeout >= 1e15 else max(1, round(timeout * 1000))
        atom_id = conn.submit(kind, payload, g, loc, timeout_ms, oob)
        return PyProxyFuture(conn, atom_id, timeout)

    def output(
        self, future: PyProxyFuture | None = None, *, timeout: float | None = None
    ) -> Iterator[tuple[int, str]]:
        """Iterates over output lines as ``(fd, line)``: fd 1 (stdout) or 2 (stderr), the
        line without its newline, decoded as UTF-8 (undecodable bytes backslash-escaped).

        With `future`: that atom's lines; the iterator ends once the atom is done and
        every line it wrote has been yielded. Without: the lines of every atom of the
        session as they arrive, until the session is closed. Each line is delivered
        once, to whichever of the two kinds of iterator reads it first. Unread lines of
        an atom whose future was garbage-collected are dropped, unless ``output()``
        without a future was called before on this session. Waiting
        releases the GIL. If the session dies, the lines already received are
        yielded, then :class:`SessionClosed` is raised. `timeout` bounds the whole
        iteration (``TimeoutError`` when it passes).
        """
        conn = self._connection()
        atom = None
        if future is not None:
            if future._conn is not conn:
                raise ValueError(f"{future!r} belongs to another session than {self!r}")
            atom = future.atom_id
        return self._lines(conn, atom, future, timeout)

    @staticmethod
    def _lines(
        conn: _native.Connection, atom: int | None, future: PyProxyFuture | None, timeout: float | None
    ) -> Iterator[tuple[int, str]]:
        # `future` is held so the atom's slot lives as long as the iterator.
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            chunks, ended = conn.read_output(atom, left)
            for _atom, fd, data in chunks:
                lines = data.split(b"\n")
                lines.pop()  # every line ends in "\n": the last piece is empty
                for line in lines:
                    yield fd, line.decode("utf-8", "backslashreplace")
            if ended:
                return
            if not chunks and left == 0.0:
                what = f"atom {atom}" if atom is not None else "the session"
                raise TimeoutError(f"no more output from {what} within {timeout}s")

    def logs(self) -> list[LogRecord]:
        """The server's log records about this session received so far (the last 10,000)."""
        return [
            LogRecord(_LEVELS[level] if level < len(_LEVELS) else str(level), ts / 1e6, message, dict(fields))
            for level, ts, message, fields in self._connection().logs()
        ]

    def close(self) -> None:
        """Ends the session: sends ``CLOSE``, fails pending futures with
        :class:`SessionClosed`, and joins the native thread. Idempotent; a no-op
        before connect."""
        conn = self._conn
        if conn is not None:
            conn.close()

    def __enter__(self) -> PyProxySession:
        if self._conn is None:
            self.connect()
        elif self._conn.closed:
            raise SessionClosed(self._conn.close_cause or f"{self!r} is closed")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

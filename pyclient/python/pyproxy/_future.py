"""PyProxyFuture and the ``concurrent.futures`` vocabulary around it.

A future is an atom id on a native connection. The session's native thread
stores the atom's outcome as bytes and never takes the GIL; this module
decodes it in whichever thread asks (``wait``/``result``/``exception``).

Completion reaches Python code through ``_native.Notifier`` pipes that the
native thread writes to:

* ``await future`` watches a per-event-loop notifier with ``loop.add_reader``:
  no extra thread.
* ``add_done_callback`` callbacks run on one lazily started daemon thread,
  ``pyproxy-callbacks``, which waits on its notifier with the GIL released.
  (``concurrent.futures`` runs callbacks in the completing thread; here that
  thread is native and never runs Python.) A callback added to a future that
  is already done runs at once in the calling thread, as in
  ``concurrent.futures``.
* ``pyproxy.wait`` and ``pyproxy.as_completed`` use a notifier of their own.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import pickle
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION
from typing import Any, NamedTuple

from . import _native
from ._errors import PyProxyError, RemoteError, exception_from_outcome


class _OobUnpickler(pickle.Unpickler):
    oob: _Buffers

    def persistent_load(self, pid: Any) -> Any:
        return self.oob.persistent_load(pid)


class _Buffers:
    """A RESULT's out-of-band buffers, taken in order by its pickle (the
    reverse of :func:`_dumps`): a persistent id ``("bytes", i)`` or
    ``("bytearray", i)`` takes buffer i, which must be the next one, as that
    type; ``NEXT_BUFFER`` takes the next one as a ``bytearray``. Each is copied
    once, from the read-only native buffer it arrived in."""

    def __init__(self, views: list[Any]) -> None:
        self._views = views
        self._next = 0

    def _take(self, as_bytearray: bool) -> Any:
        i = self._next
        if i >= len(self._views):
            raise pickle.UnpicklingError(
                f"the pickle takes more out-of-band buffers than the {len(self._views)} received"
            )
        self._next = i + 1
        view = self._views[i]
        if type(view) is _native.Value:  # one copy, made natively (huge pages when large)
            return view.to_bytearray() if as_bytearray else view.to_bytes()
        return bytearray(view) if as_bytearray else bytes(view)

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is tuple and len(pid) == 2 and pid[1] == self._next:
            if pid[0] == "bytes":
                return self._take(False)
            if pid[0] == "bytearray":
                return self._take(True)
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")

    def __iter__(self) -> _Buffers:
        return self

    def __next__(self) -> bytearray:
        return self._take(True)  # type: ignore[no-any-return]

    def loads(self, data: Any) -> Any:
        if not self._views:
            return pickle.loads(data)
        u = _OobUnpickler(io.BytesIO(data), buffers=self)
        u.oob = self
        value = u.load()
        if self._next != len(self._views):
            raise pickle.UnpicklingError(
                f"{len(self._views)} out-of-band buffers were received, the pickle took {self._next}"
            )
        return value

__all__ = [
    "PyProxyFuture",
    "wait",
    "as_completed",
    "DoneAndNotDoneFutures",
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
]

_log = logging.getLogger("pyproxy")
_PENDING, _VALUE, _FAILED = "pending", "value", "failed"


class PyProxyFuture:
    """The eventual outcome of one atom sent with :meth:`PyProxySession.eval`.

    Behaves like ``concurrent.futures.Future``: :meth:`wait` (alias
    :meth:`result`), :meth:`exception`, :meth:`done`, :meth:`running`,
    :meth:`cancel`, :meth:`add_done_callback`, and ``await future``. Create
    futures with ``eval``, not directly.
    """

    __slots__ = (
        "_conn",
        "_atom",
        "_timeout",
        "_lock",
        "_state",
        "_value",
        "_exc",
        "_callbacks",
        "_cancel_requested",
        "__weakref__",
    )

    def __init__(self, conn: _native.Connection, atom: int, timeout: float | None) -> None:
        self._conn = conn
        self._atom = atom
        self._timeout = timeout
        self._lock = threading.Lock()
        self._state = _PENDING
        self._value: Any = None
        self._exc: BaseException | None = None
        self._callbacks: list[Callable[[PyProxyFuture], object]] = []
        self._cancel_requested = False

    @property
    def atom_id(self) -> int:
        """The atom's id within its session (increasing from 1)."""
        return self._atom

    @property
    def session_id(self) -> int:
        """The id of the session the atom was sent on."""
        return self._conn.session_id

    def __repr__(self) -> str:
        state = self._state if self._state != _PENDING else ("finished" if self.done() else "pending")
        return f"<PyProxyFuture session={self._conn.session_id} atom={self._atom} state={state}>"

    def __del__(self) -> None:
        # The native table keeps the outcome until the future is gone.
        try:
            self._conn.release(self._atom)
        except Exception:
            pass

    def done(self) -> bool:
        """True once the atom finished: returned, raised, was cancelled, or its session died."""
        return self._state != _PENDING or self._conn.done(self._atom)

    def running(self) -> bool:
        """True while the atom is the session's oldest unfinished one (running, or about to).

        A session runs its atoms one at a time, in the order they were sent.
        """
        return self._state == _PENDING and self._conn.running(self._atom)

    def cancelled(self) -> bool:
        """True if the atom finished by being cancelled."""
        from ._errors import AtomCancelled

        return self.done() and isinstance(self.exception(timeout=0), AtomCancelled)

    def cancel(self) -> bool:
        """Asks the server to cancel the atom (``CANCEL``): a queued atom is dropped, a
        running one interrupted. Returns True if the atom had not finished; the future
        then completes with :class:`pyproxy.AtomCancelled` (a
        ``concurrent.futures.CancelledError``) unless the atom finished first.
        """
        if self.done():
            return False
        sent = self._conn.cancel(self._atom)
        if sent:
            self._cancel_requested = True
        return sent

    def _resolve(self, timeout: float | None) -> None:
        """Decodes the outcome into this future, waiting up to `timeout` (GIL released)."""
        if self._state != _PENDING:
            return
        state: str
        value: Any
        exc: BaseException | None
        try:
            outcome = self._conn.wait(self._atom, timeout)
        except PyProxyError as e:
            state, value, exc = _FAILED, None, e
        else:
            if outcome is None:
                raise TimeoutError(
                    f"atom {self._atom} of session {self._conn.session_id} is still running "
                    f"after waiting {timeout}s; wait longer, or cancel() it"
                )
            state, value, exc = self._decode(outcome)
        with self._lock:
            if self._state == _PENDING:
                self._state, self._value, self._exc = state, value, exc

    def _decode(self, outcome: _native.Outcome) -> tuple[str, Any, BaseException | None]:
        if outcome.is_exception:
            return _FAILED, None, exception_from_outcome(outcome, self._atom, self._timeout)
        assert outcome.pickled is not None
        try:
            return _VALUE, _Buffers(outcome.buffers).loads(outcome.pickled), None
        except Exception as e:
            err = RemoteError(
                f"atom {self._atom} returned a value that does not unpickle here ({e!r}); "
                f"import the modules its type needs in this process, or return plain data"
            )
            err.__cause__ = e
            return _FAILED, None, err

    def wait(self, timeout: float | None = None) -> Any:
        """Waits up to `timeout` seconds (None: without limit) with the GIL released and
        returns the atom's value, or raises its exception (re-raised as its own type,
        with the remote traceback as ``__cause__``). Raises ``TimeoutError`` if the
        atom is still running after `timeout`.
        """
        self._resolve(timeout)
        if self._exc is not None:
            raise self._exc
        return self._value

    def result(self, timeout: float | None = None) -> Any:
        """Same as :meth:`wait` (the ``concurrent.futures`` name)."""
        return self.wait(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Waits like :meth:`wait` and returns the atom's exception, or None if it returned."""
        self._resolve(timeout)
        return self._exc

    def add_done_callback(self, fn: Callable[[PyProxyFuture], object]) -> None:
        """Calls ``fn(future)`` once the atom finishes.

        If it already has, ``fn`` runs now in this thread. Otherwise it runs on the
        ``pyproxy-callbacks`` daemon thread (started on first use), never on the
        session's native thread. Exceptions from ``fn`` are logged to the
        ``pyproxy`` logger and otherwise ignored.
        """
        with self._lock:
            if not self.done():
                self._callbacks.append(fn)
                first = len(self._callbacks) == 1
            else:
                first = None
        if first is None:
            _call(fn, self)
        elif first:
            _dispatcher().watch(self)

    def _run_callbacks(self) -> None:
        with self._lock:
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            _call(fn, self)

    def __await__(self) -> Generator[Any, None, Any]:
        """``await future``: waits on the running loop without blocking it; cancelling
        the awaiting task cancels the atom."""
        if not self.done():
            loop = asyncio.get_running_loop()
            waiter = _loop_waiter(loop)
            done = waiter.watch(self)
            try:
                yield from done.__await__()
            except asyncio.CancelledError:
                waiter.forget(self)
                self.cancel()
                raise
        return self.wait()


def _call(fn: Callable[[PyProxyFuture], object], fut: PyProxyFuture) -> None:
    try:
        fn(fut)
    except Exception:
        _log.exception("exception calling callback for %r", fut)


class _Dispatcher:
    """Runs done-callbacks on one daemon thread that sleeps in native code, GIL released."""

    def __init__(self) -> None:
        self._notifier = _native.Notifier()
        self._tokens = itertools.count(1)
        self._futures: dict[int, PyProxyFuture] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pyproxy-callbacks", daemon=True)
        self._thread.start()

    def watch(self, fut: PyProxyFuture) -> None:
        with self._lock:
            token = next(self._tokens)
            self._futures[token] = fut
        fut._conn.watch(fut._atom, self._notifier, token)

    def _run(self) -> None:
        while True:
            for token in self._notifier.wait(None):
                with self._lock:
                    fut = self._futures.pop(token, None)
                if fut is not None:
                    fut._run_callbacks()


_dispatcher_lock = threading.Lock()
_dispatcher_instance: _Dispatcher | None = None


def _dispatcher() -> _Dispatcher:
    global _dispatcher_instance
    with _dispatcher_lock:
        if _dispatcher_instance is None:
            _dispatcher_instance = _Dispatcher()
        return _dispatcher_instance


class _LoopWaiter:
    """One notifier per event loop, watched with ``add_reader``: completions wake the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._notifier = _native.Notifier()
        self._tokens = itertools.count(1)
        self._waiting: dict[int, tuple[PyProxyFuture, asyncio.Future[None]]] = {}
        loop.add_reader(self._notifier.fileno(), self._ready)
        self._loop = weakref.ref(loop)

    def watch(self, fut: PyProxyFuture) -> asyncio.Future[None]:
        loop = self._loop()
        assert loop is not None
        done: asyncio.Future[None] = loop.create_future()
        token = next(self._tokens)
        self._waiting[token] = (fut, done)
        fut._conn.watch(fut._atom, self._notifier, token)
        return done

    def forget(self, fut: PyProxyFuture) -> None:
        for token, (f, _) in list(self._waiting.items()):
            if f is fut:
                del self._waiting[token]
        fut._conn.unwatch(fut._atom, self._notifier)

    def _ready(self) -> None:
        for token in self._notifier.drain():
            entry = self._waiting.pop(token, None)
            if entry is not None and not entry[1].done():
                entry[1].set_result(None)


_loop_waiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWaiter] = weakref.WeakKeyDictionary()


def _loop_waiter(loop: asyncio.AbstractEventLoop) -> _LoopWaiter:
    waiter = _loop_waiters.get(loop)
    if waiter is None:
        waiter = _loop_waiters[loop] = _LoopWaiter(loop)
    return waiter


class DoneAndNotDoneFutures(NamedTuple):
    """What :func:`wait` returns: the futures that finished and those that did not."""

    done: set[PyProxyFuture]
    not_done: set[PyProxyFuture]


class _Watch:
    """Watches many futures on a private notifier; withdraws every watch on exit."""

    def __init__(self, futures: Iterable[PyProxyFuture]) -> None:
        self.notifier = _native.Notifier()
        self.by_token: dict[int, PyProxyFuture] = {}
        for token, fut in enumerate(futures):
            self.by_token[token] = fut
            fut._conn.watch(fut._atom, self.notifier, token)

    def next_done(self, timeout: float | None) -> list[PyProxyFuture]:
        return [self.by_token[t] for t in self.notifier.wait(timeout) if t in self.by_token]

    def close(self) -> None:
        for fut in self.by_token.values():
            fut._conn.unwatch(fut._atom, self.notifier)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def wait(
    fs: Iterable[PyProxyFuture], timeout: float | None = None, return_when: str = ALL_COMPLETED
) -> DoneAndNotDoneFutures:
    """Waits (GIL released) for the futures, like ``concurrent.futures.wait``.

    `return_when` is ``FIRST_COMPLETED``, ``FIRST_EXCEPTION`` or ``ALL_COMPLETED``.
    Returns ``(done, not_done)`` when the condition holds or `timeout` seconds pass.
    """
    if return_when not in (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION):
        raise ValueError(f"return_when must be ALL_COMPLETED, FIRST_COMPLETED or FIRST_EXCEPTION, not {return_when!r}")
    fs = set(fs)
    deadline = None if timeout is None else time.monotonic() + timeout
    done = {f for f in fs if f.done()}

    def satisfied() -> bool:
        if len(done) == len(fs):
            return True
        if return_when == FIRST_COMPLETED:
            return bool(done)
        if return_when == FIRST_EXCEPTION:
            return any(f.exception(timeout=0) is not None for f in done)
        return False

    if not satisfied():
        watch = _Watch(fs - done)
        try:
            while not satisfied():
                left = _remaining(deadline)
                if left == 0.0:
                    break
                done.update(watch.next_done(left))
        finally:
            watch.close()
    return DoneAndNotDoneFutures(done, fs - done)


def as_completed(fs: Iterable[PyProxyFuture], timeout: float | None = None) -> Iterator[PyProxyFuture]:
    """Yields the futures as they finish, like ``concurrent.futures.as_completed``.

    Raises ``TimeoutError`` if some are unfinished `timeout` seconds after the call.
    """
    fs = set(fs)
    deadline = None if timeout is None else time.monotonic() + timeout
    finished = [f for f in fs if f.done()]
    pending = fs.difference(finished)
    yield from finished
    if not pending:
        return
    watch = _Watch(pending)
    try:
        while pending:
            left = _remaining(deadline)
            if left == 0.0:
                raise TimeoutError(f"{len(pending)} (of {len(fs)}) futures unfinished after {timeout}s")
            for f in watch.next_done(left):
                if f in pending:
                    pending.discard(f)
                    yield f
    finally:
        watch.close()

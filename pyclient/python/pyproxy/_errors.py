"""PyProxy's exceptions, and the turning of a remote failure into one.

Every exception PyProxy raises on its own account derives from
:class:`PyProxyError`; each message says what happened and what to do. A remote
exception that unpickles is re-raised as its own type (never rewritten), with
the remote traceback attached as ``__cause__``, the way
``concurrent.futures.ProcessPoolExecutor`` does.

The native module raises the classes here by name (``pyproxy._native`` builds
them in exactly one place); :func:`exception_from_outcome` is the one place a
remote failure becomes an exception.
"""

from __future__ import annotations

import concurrent.futures
import pickle
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._native import Outcome

__all__ = [
    "PyProxyError",
    "ConnectFailed",
    "AuthError",
    "ProtocolError",
    "SessionRefused",
    "SessionClosed",
    "AtomTimeout",
    "AtomCancelled",
    "VersionMismatch",
    "RemoteError",
    "WorkerDied",
    "RemoteTraceback",
]


class PyProxyError(Exception):
    """Base class of every error PyProxy raises on its own account."""


class ConnectFailed(PyProxyError, ConnectionError):
    """No session could be opened: nothing listens there, or the handshake timed out."""


class AuthError(PyProxyError):
    """The token was missing or refused, or the server could not prove it knows it."""


class ProtocolError(PyProxyError):
    """The peer sent bytes this protocol version does not allow."""


class SessionRefused(PyProxyError):
    """The server refused the session or one of its connections (unknown backend,
    too many sessions, too many connections from this address, ...); the message
    carries the server's reason and error code."""


class SessionClosed(PyProxyError, ConnectionError):
    """The session is closed or died; the message names the cause. Sessions are never reopened."""


class AtomTimeout(PyProxyError, TimeoutError):
    """The atom ran past its ``timeout=`` and was interrupted on the server."""


class AtomCancelled(PyProxyError, concurrent.futures.CancelledError):
    """The atom was cancelled (``future.cancel()``) before it finished."""


class VersionMismatch(PyProxyError):
    """Client and server versions (protocol, or Python for pickled code) do not match."""


class RemoteError(PyProxyError):
    """A remote failure that could not be re-raised as its own type.

    Also raised when the server could not run an atom at all. ``type_name`` is
    the remote exception's qualified type name, ``remote_traceback`` its traceback.
    """

    type_name: str
    remote_traceback: str

    def __init__(self, message: str, type_name: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class WorkerDied(PyProxyError):
    """The process running the atom died (fork backend): killed, crashed or out of memory."""


class RemoteTraceback(Exception):
    """Carries the server-side traceback; set as ``__cause__`` of a re-raised remote exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


# Failure origins, as the wire numbers them (docs/protocol.md, RESULT).
RAISED, TIMEOUT, CANCELLED, VERSION_MISMATCH, WORKER_DIED, SHUTDOWN, SERVER_ERROR = range(7)


def exception_from_outcome(outcome: Outcome, atom: int, timeout: float | None) -> BaseException:
    """The exception to raise for a failed atom's outcome, with the remote traceback attached."""
    what = f"{outcome.type_name}: {outcome.message}" if outcome.type_name else outcome.message
    exc: BaseException
    origin = outcome.origin
    if origin == RAISED:
        exc = _unpickle_exception(outcome) or RemoteError(
            f"atom {atom} raised {what} (the exception did not unpickle here, so it is "
            f"wrapped; see .remote_traceback)",
            outcome.type_name,
            outcome.traceback,
        )
    elif origin == TIMEOUT:
        limit = f"its timeout of {timeout:g}s" if timeout is not None else "the server's default timeout"
        exc = AtomTimeout(
            f"atom {atom} ran past {limit} and was interrupted; pass a larger timeout= "
            f"to eval() or make the atom faster"
        )
    elif origin == CANCELLED:
        exc = AtomCancelled(f"atom {atom} was cancelled before it finished")
    elif origin == VERSION_MISMATCH:
        advice = "" if "source" in outcome.message else (
            "; pickled code and functions need the same Python major.minor on both sides: "
            "use the matching Python, or send source text instead"
        )
        exc = VersionMismatch(f"atom {atom} was refused: {outcome.message}{advice}")
    elif origin == WORKER_DIED:
        exc = WorkerDied(
            f"the process running atom {atom} died: {outcome.message}. Check the server "
            f"log and the workers' limits (--worker-memory, --worker-cpu); the session "
            f"itself is still usable"
        )
    elif origin == SHUTDOWN:
        exc = SessionClosed(
            f"atom {atom} did not run to completion because the session or server is "
            f"ending: {outcome.message}; open a new PyProxySession"
        )
    else:
        exc = RemoteError(
            f"the server could not run atom {atom}: {what}", outcome.type_name, outcome.traceback
        )
    if outcome.traceback:
        exc.__cause__ = RemoteTraceback(outcome.traceback)
    return exc


def _unpickle_exception(outcome: Outcome) -> BaseException | None:
    if outcome.pickled is None:
        return None
    try:
        exc = pickle.loads(outcome.pickled)
    except Exception:
        return None
    return exc if isinstance(exc, BaseException) else None

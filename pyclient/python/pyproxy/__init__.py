"""PyProxy: run Python remotely from Python.

Open a :class:`PyProxySession` to a ``pyproxy-server``, send atoms (source
text, code objects or callables) with :meth:`PyProxySession.eval`, read their
output with :meth:`PyProxySession.output` and their results from the returned
:class:`PyProxyFuture`::

    from pyproxy import PyProxySession

    with PyProxySession("localhost:9000") as session:
        future = session.eval("print('hi'); 6 * 7")
        for fd, line in session.output(future):
            print(line)
        print(future.wait())  # 42

Each connected session owns exactly one native background thread that never
takes the GIL; see ``docs/client.md`` for the threading contract.
"""

from . import _native
from ._errors import (
    AtomCancelled,
    AtomTimeout,
    AuthError,
    ConnectFailed,
    ProtocolError,
    PyProxyError,
    RemoteError,
    RemoteTraceback,
    SessionClosed,
    SessionRefused,
    VersionMismatch,
    WorkerDied,
)
from ._future import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    DoneAndNotDoneFutures,
    PyProxyFuture,
    as_completed,
    wait,
)
from ._session import LogRecord, PyProxySession

PROTOCOL_VERSION: int = _native.PROTOCOL_VERSION
"""The PyProxy wire protocol version this client speaks."""

__all__ = [
    "PROTOCOL_VERSION",
    "PyProxySession",
    "PyProxyFuture",
    "LogRecord",
    "wait",
    "as_completed",
    "DoneAndNotDoneFutures",
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
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

"""Large payloads through the real server: 64 MiB arguments (globals, closures,
locals) and return values arrive intact and keep their types, on both backends.
The client writes large buffers to the socket from where they lie (spliced into
an in-band pickle, see pyproxy._session._dumps) and hands large values to
pickle.loads as a view over the native buffer; these tests pin the results."""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import pytest

from pyproxy import PyProxySession
from pyproxy._session import _dumps

MIB = 1 << 20


def open_session(server, backend: str) -> PyProxySession:
    s = PyProxySession(server.address, token=server.token, backend=backend)
    s.connect()
    return s


def digest(b) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.mark.parametrize("backend", ["subinterp", "fork"])
def test_a_64_mib_bytes_argument_and_value_arrive_intact(server, backend):
    blob = os.urandom(64 * MIB)
    with open_session(server, backend) as s:
        # As a global of source text.
        got = s.eval("import hashlib; (type(data).__name__, len(data), hashlib.sha256(data).hexdigest())",
                     globals={"data": blob}).result(timeout=120)
        assert got == ("bytes", len(blob), digest(blob))

        # As a closure variable of a function atom.
        def closure():
            import hashlib

            return hashlib.sha256(blob).hexdigest()

        assert s.eval(closure).result(timeout=120) == digest(blob)

        # As a local, next to small values that must keep their identity.
        small = [1, 2, 3]
        got = s.eval("(len(data), pair[0] is pair[1], pair[0])",
                     locals={"data": blob, "pair": (small, small)}).result(timeout=120)
        assert got == (len(blob), True, small)

        # 64 MiB out as the return value.
        value = s.eval("bytes(range(256)) * (256 * 1024)").result(timeout=120)
        assert type(value) is bytes and value == bytes(range(256)) * (256 * 1024)
        # The value is the caller's to keep after the next atom reuses everything.
        assert s.eval("5").result(timeout=60) == 5
        assert len(value) == 64 * MIB and value[:3] == b"\x00\x01\x02"


def test_a_large_bytearray_argument_stays_a_mutable_bytearray(server):
    data = bytearray(os.urandom(8 * MIB))
    with open_session(server, "subinterp") as s:
        got = s.eval("data[0] = 7; (type(data).__name__, bytes(data[:1]), len(data))",
                     globals={"data": data}).result(timeout=60)
    assert got == ("bytearray", b"\x07", len(data))


def test_numpy_arrays_round_trip_on_the_fork_backend(server):
    arr = np.arange(4 * MIB, dtype=np.float64)  # 32 MiB: arr and strided fit one frame
    strided = np.arange(4 * MIB, dtype=np.int32).reshape(2048, 2048).T  # not contiguous
    with open_session(server, "fork") as s:

        def double():
            return arr * 2, strided.copy(), float(arr[-1])

        doubled, back, last = s.eval(double).result(timeout=120)
    assert doubled.dtype == np.float64 and doubled.shape == arr.shape
    assert np.array_equal(doubled, arr * 2)
    assert np.array_equal(back, strided)
    assert last == float(arr[-1])


def test_dumps_pieces_join_to_a_plain_pickle_that_any_unpickler_reads():
    blob = os.urandom(2 * MIB)
    arr = np.arange(MIB, dtype=np.float64).reshape(1024, 1024)
    # Enough small values that the pickler starts several frames.
    obj = {"a": blob, "b": blob, "arr": arr, "t": arr.T, "ba": bytearray(blob),
           **{f"k{i}": os.urandom(3000) for i in range(100)}}
    pieces = _dumps(obj)
    assert isinstance(pieces, list)
    data = b"".join(bytes(p) for p in pieces)
    for loads in (pickle.loads, pickle._loads):  # the C and the pure-Python unpickler
        back = loads(data)
        assert back.keys() == obj.keys()
        assert back["a"] == blob and back["b"] == blob and type(back["ba"]) is bytearray
        assert np.array_equal(back["arr"], arr) and np.array_equal(back["t"], arr.T)
        assert all(back[f"k{i}"] == obj[f"k{i}"] for i in range(100))
    # Small objects stay one bytes object, exactly what cloudpickle writes.
    assert isinstance(_dumps({"x": 1}), bytes)

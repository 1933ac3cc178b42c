"""Large payloads through the real server: 64 MiB arguments (globals, closures,
locals) and return values arrive intact and keep their types, on both backends.
Large buffers travel out of band after the pickles (docs/protocol.md), written
to the socket from where they lie; these tests pin types and contents."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from pyproxy import PyProxySession
from pyproxy._future import _Buffers
from pyproxy._session import _OUT_OF_BAND_MIN, _dumps

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


def test_dumps_sets_large_buffers_aside_and_the_loader_takes_them_back_in_order():
    blob = os.urandom(2 * MIB)
    arr = np.arange(MIB, dtype=np.float64).reshape(1024, 1024)
    obj = {"a": blob, "b": blob, "arr": arr, "t": arr.T, "ba": bytearray(blob),
           **{f"k{i}": os.urandom(3000) for i in range(100)}}
    oob: list = []
    data = _dumps(obj, oob)
    assert len(data) < MIB  # the large parts are out of band: a, b (again), arr, t (F-contiguous), ba
    assert len(oob) == 5
    back = _Buffers([memoryview(b) for b in oob]).loads(data)
    assert back.keys() == obj.keys()
    assert back["a"] == blob and type(back["a"]) is bytes and type(back["ba"]) is bytearray
    assert np.array_equal(back["arr"], arr) and np.array_equal(back["t"], arr.T)
    assert back["arr"].flags.writeable
    assert all(back[f"k{i}"] == obj[f"k{i}"] for i in range(100))
    # Small objects stay in band; a buffer just under the threshold too.
    assert _dumps({"x": 1, "y": b"x" * (_OUT_OF_BAND_MIN - 1)}, oob) and len(oob) == 5
    # A loader given too few or too many buffers refuses.
    with pytest.raises(pickle.UnpicklingError):
        _Buffers([memoryview(b) for b in oob[:4]]).loads(data)
    with pytest.raises(pickle.UnpicklingError):
        _Buffers([memoryview(b) for b in oob + [b"x"]]).loads(data)


@pytest.mark.parametrize("backend", ["subinterp", "fork"])
def test_several_large_buffers_nested_in_containers_keep_their_types(server, backend):
    a, b = os.urandom(3 * MIB), os.urandom(MIB)
    ba = bytearray(os.urandom(2 * MIB))
    at = b"t" * _OUT_OF_BAND_MIN  # exactly the threshold: out of band
    under = b"u" * (_OUT_OF_BAND_MIN - 1)
    g = {"d": {"a": a, "l": [b, (ba, at)]}, "under": under}
    with open_session(server, backend) as s:
        got = s.eval(
            "import hashlib\n"
            "x, y, (z, w) = d['a'], d['l'][0], d['l'][1]\n"
            "z[0] = 1\n"
            "[(type(v).__name__, hashlib.sha256(v).hexdigest()) for v in (x, y, z, w, under)]",
            globals=g, locals={"also": b}).result(timeout=120)
        ba2 = bytearray(ba)
        ba2[0] = 1
        assert got == [(type(v).__name__, digest(v)) for v in (a, b, ba2, at, under)]
        # And back: the same structure as the value.
        back = s.eval("d", globals=g).result(timeout=120)
        assert back == g["d"] and type(back["l"][1][0]) is bytearray
        assert type(back["a"]) is bytes and type(back["l"][1][1]) is bytes
        # A large buffer in a raised exception's args: it travels in band, and works.
        def boom():
            raise ValueError(a[:2 * MIB])

        with pytest.raises(ValueError) as e:
            s.eval(boom).result(timeout=120)
        assert e.value.args[0] == a[:2 * MIB]
        # A large bytearray out.
        out = s.eval("bytearray(b'z' * (4 << 20))").result(timeout=60)
        assert type(out) is bytearray and out == bytearray(b"z" * (4 << 20))


@pytest.mark.parametrize("backend", ["subinterp", "fork"])
def test_a_function_atom_takes_its_buffers_after_those_of_its_globals(server, backend):
    # The pickles take the EVAL's buffers in wire order: globals, then the function.
    g = os.urandom(MIB)
    mine = bytearray(os.urandom(2 * MIB))

    def f():
        import hashlib

        return [(type(v).__name__, hashlib.sha256(v).hexdigest()) for v in (mine, shared)]  # noqa: F821

    with open_session(server, backend) as s:
        got = s.eval(f, globals={"shared": g}).result(timeout=60)
    assert got == [("bytearray", digest(mine)), ("bytes", digest(g))]


THP_PROBE = """
def _thp_eligible(addr):
    eligible, inside = None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= addr < end
            elif inside and head == "THPeligible:":
                eligible = int(line.split()[1])
    return eligible
big = bytes(16 << 20)
_thp_eligible(id(big) + (8 << 20))
"""


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


@pytest.mark.skipif(_thp_mode() != "madvise", reason="needs THP in madvise mode to tell advised memory apart")
@pytest.mark.parametrize("backend", ["subinterp", "fork"])
def test_large_buffers_an_atom_allocates_may_use_huge_pages(server, backend):
    # The server wraps CPython's raw allocator so that allocations of 4 MiB and
    # more are advised for huge pages (src/engine/huge_alloc.rs): a 64 MiB value
    # costs ~9 ms of page faults instead of ~30. A plain Python process gets no
    # such advice, which is what makes the test able to fail. (Not this one: the
    # client advises the large values it makes, and the heap may hand that
    # advised memory out again.)
    plain = subprocess.run(
        [sys.executable, "-c", THP_PROBE + "\nprint(_thp_eligible(id(big) + (8 << 20)))"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert plain.stdout.strip() == "0", "a plain Python process's allocations should not be advised"
    with open_session(server, backend) as s:
        assert s.eval(THP_PROBE).result(timeout=60) == 1

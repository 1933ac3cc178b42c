"""The client's API against the real pyproxy-server: atoms, output, exceptions,
futures, asyncio, callbacks, wait/as_completed, cancel, timeout, tokens.

Every test runs over both backends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

import pyproxy
from pyproxy import (
    AtomCancelled,
    AtomTimeout,
    AuthError,
    ConnectFailed,
    PyProxyError,
    PyProxySession,
    RemoteError,
    RemoteTraceback,
    SessionClosed,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["subinterp", "fork"])
def backend(request):
    return request.param


@pytest.fixture
def connect(server, backend):
    """connect(**kwargs) -> a connected session on `server`; all are closed after the test."""
    opened: list[PyProxySession] = []

    def open_session(**kwargs) -> PyProxySession:
        kwargs.setdefault("token", server.token)
        kwargs.setdefault("backend", backend)
        s = PyProxySession(server.address, **kwargs).connect()
        opened.append(s)
        return s

    yield open_session
    for s in opened:
        s.close()


@pytest.fixture
def session(connect) -> PyProxySession:
    return connect()


def test_concept_example_runs(server, monkeypatch, capsys):
    # The concept document's example, with only the address pointed at this test's server
    # (`make demo` runs it verbatim on port 9000). No token argument: it comes from the env.
    source = (ROOT / "integration" / "concept_example.py").read_text()
    assert source.count('"localhost:9000"') == 5
    monkeypatch.setenv("PYPROXY_TOKEN", server.token)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(source.replace("localhost:9000", f"localhost:{server.port}"), "concept_example.py", "exec"), namespace)
    out = capsys.readouterr().out
    assert out.splitlines() == ["hello world", "output =  5"]
    for s in namespace["py_proxy_pool"]:
        assert not s.closed
        s.close()


def test_source_atom_value_and_output(session):
    f = session.eval("import sys\nprint('out')\nprint('err', file=sys.stderr)\n6 * 7")
    assert list(session.output(f)) == [(1, "out"), (2, "err")]
    assert f.wait() == 42
    assert f.result() == 42 and f.exception() is None and f.done() and not f.running()


def test_output_keeps_each_fds_order_and_ends_with_the_atom(session):
    f = session.eval(
        "import sys\n"
        "for i in range(3000):\n"
        "    print(i)\n"
        "    print(-i, file=sys.stderr)\n"
    )
    lines = list(session.output(f, timeout=30))
    assert [int(l) for fd, l in lines if fd == 1] == list(range(3000))
    assert [int(l) for fd, l in lines if fd == 2] == [-i for i in range(3000)]
    # Regression: the iterator ended on END_OF_OUTPUT while RESULT (other stream) was still on its way.
    assert f.done(), "output(future) ends only once the atom is done"


def test_output_decodes_with_backslashreplace_and_keeps_empty_lines(session):
    f = session.eval("import sys\nsys.stdout.buffer.write(b'a\\xffb\\n\\n')\nsys.stdout.flush()")
    assert list(session.output(f)) == [(1, "a\\xffb"), (1, "")]


def test_final_line_without_newline_is_delivered(session):
    # Regression: a final line without a newline used to reach the client unterminated and be lost.
    f = session.eval("print('partial', end='')")
    assert list(session.output(f, timeout=10)) == [(1, "partial")]


def test_long_line_is_split_and_nothing_is_lost(session):
    f = session.eval("import sys\nsys.stdout.write('x' * 200_000 + '\\nend\\n')")
    lines = list(session.output(f, timeout=30))
    assert "".join(line for _, line in lines[:-1]) == "x" * 200_000
    assert len(lines) > 2, "a 200 kB line is sent in pieces of at most max_line bytes"
    assert lines[-1] == (1, "end")


def test_callables_from_main_closures_and_lambdas(session):
    factor = 3

    def closure():
        print("in closure")
        return [factor * i for i in range(4)]

    f1 = session.eval(closure, locals=None, globals=None)
    f2 = session.eval(lambda: factor**2)
    assert f1.wait(10) == [0, 3, 6, 9]
    assert f2.wait(10) == 9
    assert list(session.output(f1)) == [(1, "in closure")]


def test_code_objects_and_namespaces(session):
    code = compile("a * b", "<test>", "eval")
    assert session.eval(code, globals={"a": 6}, locals={"b": 7}).wait(10) == 42
    assert session.eval("x + y", globals={"x": 1}, locals={"y": 2}).wait(10) == 3


def test_remote_exception_is_reraised_as_its_type_with_remote_traceback(session):
    def fails():
        raise KeyError("missing-key")

    with pytest.raises(KeyError) as info:
        session.eval(fails).wait(10)
    assert info.value.args == ("missing-key",)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "fails" in cause.tb and "KeyError" in cause.tb

    with pytest.raises(ZeroDivisionError) as info:
        session.eval("1 / 0").wait(10)
    assert "1 / 0" in info.value.__cause__.tb


def test_exception_that_does_not_unpickle_here_becomes_remote_error(session):
    # Its __init__ needs two arguments but pickles one, so unpickling it raises TypeError.
    f = session.eval(
        "class TwoArgs(Exception):\n"
        "    def __init__(self, a, b):\n"
        "        super().__init__(a)\n"
        "raise TwoArgs('x', 'y')"
    )
    err = f.exception(10)
    assert isinstance(err, RemoteError), repr(err)
    assert "TwoArgs" in err.type_name and "TwoArgs" in err.remote_traceback and "TwoArgs" in str(err)
    assert isinstance(err.__cause__, RemoteTraceback)


def test_unpicklable_return_value_is_an_exception_not_a_dead_session(session):
    with pytest.raises(TypeError):
        session.eval("import threading\nthreading.Lock()").wait(10)
    assert session.eval("1").wait(10) == 1


def test_timeout_interrupts_the_atom(session):
    f = session.eval("while True:\n    pass", timeout=0.3)
    err = f.exception(20)
    assert isinstance(err, AtomTimeout) and isinstance(err, TimeoutError)
    assert "0.3s" in str(err)
    assert session.eval("2").wait(10) == 2, "the session survives a timeout"


def test_timeout_and_cancel_cut_a_sleep_short(session):
    # Regression: on the sub-interpreter backend time.sleep ran to its end before the
    # interrupt landed, holding an executor thread for its whole length.
    started = time.monotonic()
    err = session.eval("import time\ntime.sleep(60)", timeout=0.3).exception(20)
    assert isinstance(err, AtomTimeout)
    running = session.eval("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    assert next(iter(session.output(running, timeout=10))) == (1, "sleeping")
    assert running.cancel() is True
    assert isinstance(running.exception(20), AtomCancelled)
    assert time.monotonic() - started < 10
    assert session.eval("import time\ntime.sleep(0.2)\n'slept'").wait(10) == "slept"


def test_the_line_after_a_burst_of_output_arrives_while_the_atom_still_runs(session):
    # The server batches a streaming atom's lines (it lets the pipes fill for a
    # moment after a small read); the last line before a long pause must still
    # reach the client during the pause, not when the atom ends.
    running = session.eval(
        "import time\n"
        "for i in range(2000):\n"
        "    print(f'burst {i}')\n"
        "print('last before the pause')\n"
        "time.sleep(60)\n"
    )
    lines = session.output(running, timeout=15)
    seen = [next(lines) for _ in range(2001)]
    assert seen[-1] == (1, "last before the pause")
    assert seen[:-1] == [(1, f"burst {i}") for i in range(2000)]
    assert not running.done()
    assert running.cancel() is True
    assert isinstance(running.exception(20), AtomCancelled)


def test_wait_with_timeout_raises_and_leaves_the_atom_running(session):
    f = session.eval("import time\ntime.sleep(0.6)\n'late'")
    with pytest.raises(TimeoutError):
        f.wait(timeout=0.05)
    assert not f.done()
    assert f.wait(10) == "late"


def test_cancel_running_and_queued_atoms(session):
    running = session.eval("while True:\n    pass")
    queued = session.eval("'never'")
    deadline = time.monotonic() + 5
    while not running.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert running.running() and not queued.running()
    assert queued.cancel() is True
    assert running.cancel() is True
    for f in (running, queued):
        err = f.exception(20)
        assert isinstance(err, AtomCancelled) and isinstance(err, concurrent.futures.CancelledError)
        assert f.cancelled()
    done = session.eval("3")
    assert done.wait(10) == 3
    assert done.cancel() is False, "a finished atom cannot be cancelled"


def test_await_under_asyncio(session):
    async def main():
        fs = [session.eval(f"import time\ntime.sleep({d})\n{d}") for d in (0.2, 0.1, 0.0)]
        return await asyncio.gather(*fs)

    assert asyncio.run(main()) == [0.2, 0.1, 0.0]


def test_await_does_not_block_the_event_loop(session):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        value = await session.eval("import time\ntime.sleep(0.5)\n'ok'")
        t.cancel()
        return value, ticks

    value, ticks = asyncio.run(main())
    assert value == "ok"
    assert ticks >= 20, f"the loop ticked only {ticks} times while awaiting"


def test_add_done_callback_runs_off_the_native_thread(session):
    seen = []
    fired = threading.Event()

    def cb(fut):
        seen.append((fut.result(), threading.current_thread().name))
        fired.set()

    f = session.eval("import time\ntime.sleep(0.2)\n'v'")
    f.add_done_callback(cb)
    assert fired.wait(10)
    assert seen == [("v", "pyproxy-callbacks")]
    # On a finished future the callback runs at once, in the caller's thread.
    f.add_done_callback(cb)
    assert seen[-1] == ("v", threading.current_thread().name)


def test_wait_and_as_completed(connect):
    a, b = connect(), connect()
    slow = a.eval("import time\ntime.sleep(0.8)\n'slow'")
    fast = b.eval("'fast'")
    done, not_done = pyproxy.wait([slow, fast], timeout=10, return_when=pyproxy.FIRST_COMPLETED)
    assert fast in done and slow in not_done
    done, not_done = pyproxy.wait([slow, fast], timeout=10)
    assert done == {slow, fast} and not not_done

    fs = [a.eval("import time\ntime.sleep(0.4)\n1"), b.eval("2")]
    assert [f.wait() for f in pyproxy.as_completed(fs, timeout=10)] == [2, 1]

    stuck = a.eval("import time\ndeadline = time.time() + 2\nwhile time.time() < deadline:\n    pass")
    with pytest.raises(TimeoutError):
        list(pyproxy.as_completed([stuck], timeout=0.1))
    failing = b.eval("1/0")
    done, _ = pyproxy.wait([stuck, failing], timeout=10, return_when=pyproxy.FIRST_EXCEPTION)
    assert failing in done and stuck not in done


def test_session_output_without_future_ends_when_the_session_closes(session):
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(session.output()))
    reader.start()
    f1 = session.eval("print('a')")
    f2 = session.eval("print('b')")
    f1.wait(10)
    f2.wait(10)
    deadline = time.monotonic() + 5
    while len(lines) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    session.close()
    reader.join(5)
    assert not reader.is_alive()
    assert lines == [(1, "a"), (1, "b")]


def test_logs_are_records(session):
    session.eval("1").wait(10)
    deadline = time.monotonic() + 5
    while not any(r.message == "client connected" for r in session.logs()) and time.monotonic() < deadline:
        time.sleep(0.01)
    records = session.logs()
    assert records and all(r.level in ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", "TRACE") for r in records)
    assert abs(records[0].time - time.time()) < 60


def test_session_lifecycle(server, session):
    assert session.session_id and not session.closed
    with pytest.raises(PyProxyError, match="never reopened"):
        session.connect()
    f = session.eval("while True:\n    pass")
    session.close()
    session.close()
    assert session.closed and "closed by this client" in session.close_reason
    with pytest.raises(SessionClosed) as info:
        f.wait(5)
    assert isinstance(info.value, ConnectionError)
    with pytest.raises(SessionClosed):
        session.eval("1")
    with pytest.raises(PyProxyError, match="connect"):
        PyProxySession(server.address).eval("1")


def test_context_manager_and_tuple_address(server):
    with PyProxySession((server.host, server.port), token=server.token) as s:
        assert s.eval("'ctx'").wait(10) == "ctx"
    assert s.closed


def test_token_from_environment_and_wrong_token(server, monkeypatch):
    monkeypatch.setenv("PYPROXY_TOKEN", server.token)
    with PyProxySession(server.address) as s:
        assert s.eval("1").wait(10) == 1
    with pytest.raises(AuthError, match="refused the token"):
        PyProxySession(server.address, token="not-the-token").connect()


def test_token_file_written_by_the_server(start_server, monkeypatch, tmp_path):
    srv = start_server(token="")  # no PYPROXY_TOKEN: the server generates one and writes its file
    monkeypatch.delenv("PYPROXY_TOKEN", raising=False)
    monkeypatch.setenv("PYPROXY_HOME", str(srv.home))
    with PyProxySession(srv.address) as s:
        assert s.eval("'file'").wait(10) == "file"
    monkeypatch.setenv("PYPROXY_HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(AuthError) as info:
        PyProxySession(srv.address).connect()
    assert str(tmp_path / "elsewhere" / "tokens" / str(srv.port)) in str(info.value)


def test_nothing_listening_is_connect_failed():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectFailed) as info:
        PyProxySession(f"127.0.0.1:{port}", token="t", connect_timeout=2).connect()
    assert isinstance(info.value, ConnectionError) and "is running" in str(info.value)


def test_bad_addresses_are_rejected_early():
    with pytest.raises(ValueError):
        PyProxySession("no-port")
    with pytest.raises(TypeError):
        PyProxySession(9000)  # type: ignore[arg-type]


def test_pipelined_atoms_complete_in_order(session):
    fs = [session.eval(f"{i} * 2") for i in range(200)]
    assert [f.wait(30) for f in fs] == [i * 2 for i in range(200)]
    assert [f.atom_id for f in fs] == sorted(f.atom_id for f in fs)


def test_env_is_not_needed_when_token_given(server, monkeypatch):
    monkeypatch.delenv("PYPROXY_TOKEN", raising=False)
    monkeypatch.setenv("PYPROXY_HOME", os.devnull)
    with PyProxySession(server.address, token=server.token) as s:
        assert s.eval("5").wait(10) == 5


def test_atom_larger_than_the_servers_frame_limit_is_refused_before_sending(start_server):
    srv = start_server(max_frame=64 * 1024)
    with PyProxySession(srv.address, token=srv.token) as s:
        with pytest.raises(ValueError, match="more than the 65536 bytes"):
            s.eval("len(data)", globals={"data": b"x" * 100_000})
        assert s.eval("len(data)", globals={"data": b"x" * 1000}).wait(10) == 1000


def test_unknown_backend_is_refused_with_the_reason(server):
    with pytest.raises(pyproxy.SessionRefused, match="UNSUPPORTED_BACKEND"):
        PyProxySession(server.address, token=server.token, backend="nonsense").connect()


def test_session_iterator_sees_atoms_whose_futures_were_dropped(session):
    lines = session.output(timeout=20)
    first = session.eval("print('first')")
    assert next(lines) == (1, "first")
    first.wait(10)
    del first
    session.eval("print('fire and forget')")  # future dropped at once
    assert next(lines) == (1, "fire and forget")


_MAIN_FUNCTIONS = (
    "x = 1\n"
    "def read_x():\n    return x\n"
    "def append(acc=[]):\n    acc.append(1)\n    return len(acc)\n"
    "items = [1]\n"
    "def count():\n    return len(items)\n"
    "def default(v=1):\n    return v\n"
    "def keyword(*, v=1):\n    return v\n"
    "def counter():\n"
    "    n = 0\n"
    "    def get():\n        return n\n"
    "    def put(v):\n        nonlocal n\n        n = v\n"
    "    return get, put\n"
    "def bump():\n    global x\n    x += 1\n    return x\n"
    "def incrementer():\n"
    "    n = 0\n"
    "    def inc():\n        nonlocal n\n        n += 1\n        return n\n"
    "    return inc\n"
)


def _main_namespace() -> dict:
    # Functions whose __module__ is __main__, as in a script or notebook: cloudpickle
    # pickles them by value, and the client may reuse such a pickle.
    ns: dict = {"__name__": "__main__"}
    exec(_MAIN_FUNCTIONS, ns)
    return ns


def test_repeated_function_atoms_keep_their_meaning(session):
    # The client reuses a function's pickle while nothing it was made from changed;
    # every call must still see the current globals, defaults and closure cells.
    ns = _main_namespace()
    read_x = ns["read_x"]
    assert [session.eval(read_x).wait(10) for _ in range(3)] == [1, 1, 1]
    ns["x"] = 2
    assert session.eval(read_x).wait(10) == 2
    ns["x"] = "three"
    assert session.eval(read_x).wait(10) == "three"
    ns["x"] = [4]
    assert session.eval(read_x).wait(10) == [4]
    ns["x"].append(5)
    assert session.eval(read_x).wait(10) == [4, 5]
    del ns["x"]
    with pytest.raises(NameError):
        session.eval(read_x).wait(10)
    assert [session.eval(ns["append"]).wait(10) for _ in range(3)] == [1, 1, 1]
    count = ns["count"]
    assert session.eval(count).wait(10) == 1
    ns["items"].append(2)
    assert session.eval(count).wait(10) == 2
    default, keyword = ns["default"], ns["keyword"]
    assert session.eval(default).wait(10) == 1 and session.eval(keyword).wait(10) == 1
    default.__defaults__ = (9,)
    keyword.__kwdefaults__ = {"v": 8}
    assert session.eval(default).wait(10) == 9 and session.eval(keyword).wait(10) == 8
    get, put = ns["counter"]()
    assert session.eval(get).wait(10) == 0
    put(7)
    assert session.eval(get).wait(10) == 7
    default.__code__ = read_x.__code__
    ns["x"] = 10
    assert session.eval(default).wait(10) == 10


def test_a_function_atom_changes_nothing_the_next_call_of_the_same_pickle_sees(session):
    # The same pickle again (the client reuses it, the server rebuilds the function
    # from what it kept): a global the atom rebinds and a closure cell it changes
    # start from the pickled values every time.
    ns = _main_namespace()
    assert [session.eval(ns["bump"]).wait(10) for _ in range(3)] == [2, 2, 2]
    inc = ns["incrementer"]()
    assert [session.eval(inc).wait(10) for _ in range(3)] == [1, 1, 1]
    assert [session.eval(ns["keyword"]).wait(10) for _ in range(2)] == [1, 1]
    assert session.eval(ns["bump"], globals={"x": 41}).wait(10) == 42
    assert session.eval(ns["bump"]).wait(10) == 2


def test_a_function_pickle_is_reused_only_while_its_inputs_are_unchanged():
    from pyproxy import _fncache

    ns = _main_namespace()
    calls = []
    made = []

    def dumps(fn, oob):
        calls.append(fn)
        made.append(cloudpickle.dumps(fn, protocol=5))
        return made[-1]

    def calls_result(calls, before):
        assert len(calls) == before + 1, f"pickled {len(calls) - before} times, not once"
        return made[-1]

    read_x, count = ns["read_x"], ns["count"]
    oob: list = []
    first = _fncache.pickled_function(read_x, oob, dumps)
    assert _fncache.pickled_function(read_x, oob, dumps) is first and len(calls) == 1
    ns["x"] = 1000
    assert _fncache.pickled_function(read_x, oob, dumps) is not first and len(calls) == 2
    # A mutable global: pickled afresh every time.
    _fncache.pickled_function(count, oob, dumps)
    _fncache.pickled_function(count, oob, dumps)
    assert len(calls) == 4

    # Every other input of the pickle, changed one at a time: pickled again once each.
    default = ns["default"]

    def set_attr(name, value):
        return lambda: setattr(default, name, value)

    changes = [
        set_attr("__name__", "renamed"),
        set_attr("__qualname__", "Renamed"),
        set_attr("__doc__", "documented"),
        set_attr("__defaults__", (2,)),
        set_attr("__kwdefaults__", {"k": 1}),
        set_attr("__kwdefaults__", {"k": 2}),
        set_attr("__kwdefaults__", None),
        lambda: ns.__setitem__("__file__", "script.py"),
        lambda: ns.__setitem__("__package__", "pkg"),
        set_attr("__code__", read_x.__code__),  # now also reads the global x
        lambda: ns.__setitem__("x", 1001),
    ]
    _fncache.pickled_function(default, oob, dumps)
    for change in changes:
        before = len(calls)
        change()
        assert _fncache.pickled_function(default, oob, dumps) is calls_result(calls, before)
        assert _fncache.pickled_function(default, oob, dumps) is calls_result(calls, before)
    # A function attribute: cloudpickle pickles it too, so no reuse while it is set.
    default.note = "x"
    before = len(calls)
    _fncache.pickled_function(default, oob, dumps)
    _fncache.pickled_function(default, oob, dumps)
    assert len(calls) == before + 2
    calls_before_closure = len(calls)
    get, put = ns["counter"]()
    _fncache.pickled_function(get, oob, dumps)
    _fncache.pickled_function(get, oob, dumps)
    put(5)
    _fncache.pickled_function(get, oob, dumps)
    assert len(calls) == calls_before_closure + 2

    # A pickle that sent a buffer out of band refers to it by position: never reused.
    def dumps_with_buffer(fn, oob):
        oob.append(b"buffer")
        return dumps(fn, oob)

    ns["x"] = 2000
    before = len(calls)
    _fncache.pickled_function(read_x, oob, dumps_with_buffer)
    _fncache.pickled_function(read_x, oob, dumps_with_buffer)
    assert len(calls) == before + 2


def test_repeated_source_atoms_keep_their_meaning(session):
    # The server compiles a source text once; every run must still get a fresh
    # namespace, fresh mutable defaults and the globals of that call.
    counter = "x = globals().get('x', 0) + 1\nx"
    assert [session.eval(counter).wait(10) for _ in range(3)] == [1, 1, 1]
    defaults = "def f(acc=[]):\n    acc.append(1)\n    return len(acc)\nf() + f()"
    assert [session.eval(defaults).wait(10) for _ in range(3)] == [3, 3, 3]
    assert [session.eval("g * 2", globals={"g": g}).wait(10) for g in (1, 5, 7)] == [2, 10, 14]
    with pytest.raises(NameError):
        session.eval("g * 2").wait(10)


def test_an_atom_sent_behind_a_running_one_runs_without_a_wait(session, tmp_path):
    # The second atom waits in the client until the first one's result arrives;
    # nothing here waits on a future, and it must run all the same.
    marker = tmp_path / "ran"
    first = session.eval("import time\ntime.sleep(0.3)\n1")
    second = session.eval(f"open({str(marker)!r}, 'w').close()\n2")
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists(), "the queued atom never ran"
    assert first.wait(10) == 1 and second.wait(10) == 2

"""The client's threading contract, proved against the real pyproxy-server:

* each connected session adds exactly one thread, and closing it removes it;
* that thread never needs the GIL: an atom completes while Python holds the GIL;
* a dead server fails pending futures with SessionClosed within a second.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import pyproxy
from pyproxy import PyProxySession, SessionClosed


def task_count() -> int:
    return len(os.listdir("/proc/self/task"))


def thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread exited between the listing and the read (ESRCH)
    return names


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_one_native_thread_per_session_released_on_close(server):
    base = task_count()
    sessions = []
    for i in range(1, 4):
        sessions.append(PyProxySession(server.address, token=server.token).connect())
        assert task_count() == base + i, "connect() adds exactly one thread"
    # Work, including output, starts no further thread.
    fs = [s.eval("print('x')\n1") for s in sessions]
    assert [f.wait(10) for f in fs] == [1, 1, 1]
    assert [list(s.output(f)) for s, f in zip(sessions, fs)] == [[(1, "x")]] * 3
    assert task_count() == base + 3
    for i, s in enumerate(sessions, 1):
        s.close()
        assert task_count() == base + 3 - i, "close() joins the session's thread"


def test_a_session_dropped_without_close_releases_its_thread(server):
    base = task_count()
    s = PyProxySession(server.address, token=server.token).connect()
    assert s.eval("1").wait(10) == 1
    assert task_count() == base + 1
    del s
    gc.collect()
    assert task_count() == base


def test_no_thread_is_started_before_callbacks_are_used(server):
    # In a fresh interpreter, so no earlier test has started the callback thread.
    script = textwrap.dedent(
        f"""
        import os, threading, pyproxy
        base = len(os.listdir("/proc/self/task"))
        s = pyproxy.PyProxySession({server.address!r}, token={server.token!r}).connect()
        assert s.eval("1").wait(10) == 1
        assert len(os.listdir("/proc/self/task")) == base + 1
        done = threading.Event()
        f = s.eval("import time\\ntime.sleep(0.3)")
        assert not f.done()  # else the callback would run at once, here
        f.add_done_callback(lambda f: done.set())
        assert done.wait(10)
        names = sorted(t.name for t in threading.enumerate())
        assert names == ["MainThread", "pyproxy-callbacks"], names
        assert len(os.listdir("/proc/self/task")) == base + 2
        s.close()
        assert len(os.listdir("/proc/self/task")) == base + 1
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"


def test_atom_completes_while_the_main_thread_holds_the_gil(server):
    s = PyProxySession(server.address, token=server.token).connect()
    try:
        atom = "for i in range(200_000):\n    print(i)\n'printed'"
        # Calibrate: how long the atom takes here with nobody holding the GIL. On a
        # loaded machine hold the GIL longer, so the test measures the client, not the load.
        start = time.monotonic()
        warm = s.eval(atom)
        assert warm.wait(60) == "printed"
        free_run = time.monotonic() - start
        assert sum(1 for _ in s.output(warm)) == 200_000
        hold = max(2, int(3 * free_run) + 1)

        f = s.eval(atom)
        libc = ctypes.PyDLL(None)  # PyDLL: the call keeps the GIL for its whole duration
        libc.sleep.argtypes = [ctypes.c_uint]
        start = time.monotonic()
        libc.sleep(hold)
        assert time.monotonic() - start >= hold - 0.1
        # The first thing Python does with the GIL back: the future must already be complete.
        assert f.done(), f"not complete after {hold}s with the GIL held (free run: {free_run:.2f}s)"
        assert f.wait(0) == "printed"
        lines = list(s.output(f, timeout=30))
        assert len(lines) == 200_000
        assert lines[0] == (1, "0") and lines[-1] == (1, "199999")
    finally:
        s.close()


def test_server_killed_mid_atom_fails_pending_futures_within_a_second(server):
    s = PyProxySession(server.address, token=server.token).connect()
    native = f"pyproxy-{s.session_id}"  # the session thread's name in /proc/self/task/*/comm
    assert wait_until(lambda: native in thread_names(), 2)
    running = s.eval("import sys, time\nprint('started', flush=True)\ntime.sleep(60)")
    queued = s.eval("'never runs'")
    lines = s.output(running)
    assert next(lines) == (1, "started")
    server.proc.kill()
    start = time.monotonic()
    for f in (running, queued):
        with pytest.raises(SessionClosed) as info:
            f.wait(5)
        assert "closed" in str(info.value)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0, f"pending futures failed after {elapsed:.3f}s"
    with pytest.raises(SessionClosed):
        next(lines)
    assert s.closed and s.close_reason
    assert wait_until(lambda: native not in thread_names(), 2), "the dead session's thread exited by itself"
    with pytest.raises(SessionClosed):
        s.eval("1")
    s.close()
    server.proc.wait(5)


def test_server_shutdown_fails_pending_futures_with_the_reason(server):
    s = PyProxySession(server.address, token=server.token).connect()
    f = s.eval("while True:\n    pass")
    assert wait_until(f.running, 5)
    server.signal(signal.SIGTERM)
    err = f.exception(30)
    assert isinstance(err, SessionClosed), repr(err)
    assert wait_until(lambda: s.closed, 10), "the server's shutdown ends the session"
    s.close()


def test_server_shutdown_fails_queued_and_unstarted_atoms_as_session_closed(server):
    # SIGTERM right behind the sends: whichever step each atom reached (held,
    # queued, waiting for an interpreter, running), its future fails with
    # SessionClosed, never a server error, and none is left pending.
    s = PyProxySession(server.address, token=server.token).connect()
    fs = [s.eval("while True:\n    pass")] + [s.eval("1") for _ in range(3)]
    server.signal(signal.SIGTERM)
    for f in fs:
        err = f.exception(30)
        assert isinstance(err, SessionClosed), repr(err)
    s.close()


@pytest.fixture
def sigint_raises():
    """Python's own SIGINT handler, whatever this process inherited: a shell starts a
    background job with SIGINT ignored, and Python then never installs its handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_interrupts_a_blocking_wait(server, sigint_raises):
    # wait() sleeps without the GIL; it must still let KeyboardInterrupt through promptly.
    with PyProxySession(server.address, token=server.token) as s:
        f = s.eval("while True:\n    pass")
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            f.wait()
        assert time.monotonic() - start < 1.0
        timer.join()
        assert f.cancel()


def test_sessions_are_independent(server):
    # One session dying (closed by its user) leaves another untouched.
    a = PyProxySession(server.address, token=server.token).connect()
    b = PyProxySession(server.address, token=server.token).connect()
    slow = b.eval("import time\ntime.sleep(0.3)\n'b'")
    a.close()
    assert slow.wait(10) == "b"
    assert pyproxy.wait([b.eval("1")], timeout=10).not_done == set()
    b.close()


def test_atoms_sent_behind_a_running_one_run_while_the_main_thread_holds_the_gil(server):
    # Atoms submitted while an earlier one is unanswered wait in the client and
    # go out when that one's result arrives: the session thread sends them, so
    # they run while this thread keeps the GIL and calls nothing.
    with PyProxySession(server.address, token=server.token) as s:
        first = s.eval("import time\ntime.sleep(0.2)\n1")
        rest = [s.eval(str(i)) for i in range(2, 50)]
        libc = ctypes.PyDLL(None)
        libc.sleep.argtypes = [ctypes.c_uint]
        libc.sleep(2)
        assert first.done() and all(f.done() for f in rest), "queued atoms were not sent"
        assert [f.wait(0) for f in [first, *rest]] == list(range(1, 50))


def test_threads_submitting_small_and_large_atoms_to_one_session(server, tmp_path):
    # Small atoms may wait in the client's queue while a large one is written
    # from its caller's memory: each atom must still run exactly once, and in
    # the order of the ids they were given, whichever thread sent it.
    log = tmp_path / "order"
    big = bytes(range(256)) * 4096  # 1 MiB: travels out of band
    record = f"open({str(log)!r}, 'a').write(tag + ' ')\n"
    with PyProxySession(server.address, token=server.token) as s:
        futures: list = []
        lock = threading.Lock()

        def submit(t):
            for i in range(120):
                tag = f"{t}-{i}"
                if i % 40 == 7:
                    f = s.eval(record + "len(blob)", globals={"blob": big, "tag": tag})
                else:
                    f = s.eval(record + f"{t * 1000 + i}", globals={"tag": tag})
                with lock:
                    futures.append((tag, f))

        threads = [threading.Thread(target=submit, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for tag, f in futures:
            t, i = map(int, tag.split("-"))
            assert f.wait(60) == (len(big) if i % 40 == 7 else t * 1000 + i)
        by_id = sorted(futures, key=lambda tf: tf[1].atom_id)
        ids = [f.atom_id for _, f in by_id]
        assert ids == list(range(ids[0], ids[0] + 480))
    assert log.read_text().split() == [tag for tag, _ in by_id]

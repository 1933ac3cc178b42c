"""The fork backend against the real server: a worker process per session, fd-level
output capture, crash isolation, limits, cancel and timeout by signal, sandbox
directories, user switching, reaping, shutdown."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import pyproxy
from conftest import PYTHON_ENV, SERVER_BIN
from pyproxy import AtomCancelled, AtomTimeout, PyProxySession, WorkerDied


def open_session(server, backend="fork", **kwargs) -> PyProxySession:
    s = PyProxySession(server.address, token=server.token, backend=backend, **kwargs)
    s.connect()
    return s


def process_table() -> dict[int, tuple[str, int]]:
    """pid -> (state letter, parent pid) of every process, read in one pass over /proc.

    A process may end while we read; it is left out rather than read again later, so callers
    work on one snapshot and never on a pid that is gone.
    """
    table: dict[int, tuple[str, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces or parentheses; the fields after its last ")" do not.
        rest = stat[stat.rindex(")") + 2:].split()
        table[int(entry)] = (rest[0], int(rest[1]))
    return table


def descendants(pid: int) -> dict[int, str]:
    """pid -> state letter of every process below `pid`."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for p, (_, ppid) in table.items():
        children.setdefault(ppid, []).append(p)
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found[c] = table[c][0]
            todo.append(c)
    return found


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture
def request_cleanup():
    todo = []
    yield todo
    for f in todo:
        f()


@pytest.fixture
def fork(server):
    s = open_session(server)
    yield s
    s.close()


def test_welcome_reports_the_sessions_backend_and_the_default_follows_the_flag(start_server):
    srv = start_server(backend="fork")
    with PyProxySession(srv.address, token=srv.token) as s:
        assert s.backend == "fork"
        assert s.eval("import os; os.getpid()").result(timeout=10) != srv.proc.pid
    with PyProxySession(srv.address, token=srv.token, backend="subinterp") as s:
        assert s.backend == "subinterp"
        assert s.eval("import os; os.getpid()").result(timeout=10) == srv.proc.pid


def test_an_unknown_backend_is_refused_naming_the_available_ones(server):
    with pytest.raises(pyproxy.SessionRefused) as e:
        open_session(server, backend="threads")
    assert "`subinterp`" in str(e.value) and "`fork`" in str(e.value)


def test_c_level_and_subprocess_output_is_captured_in_order_with_print(fork):
    f = fork.eval(
        "import ctypes, os, sys\n"
        "libc = ctypes.CDLL(None)\n"
        "print('1 print')\n"
        "os.write(1, b'2 os.write\\n')\n"
        "libc.printf(b'3 printf\\n'); libc.fflush(None)\n"
        "libc.puts(b'4 puts'); libc.fflush(None)\n"
        "os.system('echo 5 echo')\n"
        "print('6 print')\n"
        "os.write(2, b'err via fd 2\\n')\n"
        "libc.printf(b'7 printf without fflush\\n')\n"
        "'done'\n"
    )
    lines = list(fork.output(f, timeout=20))
    assert f.result(timeout=10) == "done"
    assert [l for fd, l in lines if fd == 1] == [
        "1 print", "2 os.write", "3 printf", "4 puts", "5 echo", "6 print",
        "7 printf without fflush",
    ]
    assert [l for fd, l in lines if fd == 2] == ["err via fd 2"]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of `pid` and all its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_atom_that_closes_its_stdout_leaves_the_server_idle(server, fork):
    # Silencing a noisy library by pointing fd 1 at /dev/null ends the stdout pipe
    # (its one writer is gone): the session must stop polling it, not spin on EOF.
    silence = "import os; os.dup2(os.open(os.devnull, os.O_WRONLY), 1)"
    assert fork.eval(silence).result(timeout=10) == 1
    before = cpu_seconds(server.proc.pid)
    f = fork.eval("import os, time; time.sleep(1); os.write(2, b'still here\\n'); 'done'")
    assert f.result(timeout=10) == "done"
    used = cpu_seconds(server.proc.pid) - before
    assert used < 0.3, f"the server used {used:.2f} s of CPU while the atom slept 1 s"
    # Its other stream still arrives, and later atoms of the session run.
    assert list(fork.output(f, timeout=10)) == [(2, "still here")]
    g = fork.eval("import sys; print('lost'); sys.stderr.write('kept\\n'); 7")
    assert g.result(timeout=10) == 7
    assert list(fork.output(g, timeout=10)) == [(2, "kept")]


@pytest.mark.parametrize("backend", ["subinterp", "fork"])
def test_value_exception_and_output_order_on_both_backends(server, backend):
    with open_session(server, backend=backend) as s:
        f = s.eval("for i in range(200): print(i)\n6 * 7")
        assert [int(l) for _, l in s.output(f, timeout=20)] == list(range(200))
        assert f.result(timeout=10) == 42
        with pytest.raises(ZeroDivisionError):
            s.eval("1 / 0").result(timeout=10)
        assert s.eval(lambda: [1, 2, 3]).result(timeout=10) == [1, 2, 3]


def test_a_segfault_and_an_os_exit_leave_ten_other_sessions_intact(server):
    others = [open_session(server) for _ in range(10)]
    crasher = open_session(server)
    try:
        futures = [
            (i, s.eval(
                f"import time\n"
                f"for k in range(40):\n"
                f"    print('s{i}', k)\n"
                f"    time.sleep(0.01)\n"
                f"{i} * 1000\n"
            ))
            for i, s in enumerate(others)
        ]
        pid_before = crasher.eval("import os; os.getpid()").result(timeout=10)
        with pytest.raises(WorkerDied) as segv:
            crasher.eval("import ctypes; ctypes.string_at(0)").result(timeout=20)
        assert "signal 11 (SIGSEGV)" in str(segv.value)
        assert f"worker pid {pid_before}" in str(segv.value)
        f = crasher.eval("print('before exit'); import os; os._exit(3)")
        with pytest.raises(WorkerDied) as exited:
            f.result(timeout=20)
        assert "exited with code 3" in str(exited.value)
        assert list(crasher.output(f, timeout=10)) == [(1, "before exit")]
        pid_after = crasher.eval("import os; os.getpid()").result(timeout=20)
        assert pid_after not in (pid_before,)
        for i, fut in futures:
            assert fut.result(timeout=30) == i * 1000
            s = others[i]
            assert list(s.output(fut, timeout=10)) == [(1, f"s{i} {k}") for k in range(40)]
    finally:
        for s in others + [crasher]:
            s.close()


def test_a_memory_limit_hit_is_reported_clearly(start_server):
    srv = start_server(worker_memory="200M")
    with open_session(srv) as s:
        # Still a MemoryError (so `except MemoryError` works), saying what limited it.
        with pytest.raises(MemoryError) as e:
            s.eval("b = bytearray(1 << 30)").result(timeout=30)
        assert "--worker-memory" in str(e.value) and "200 MiB" in str(e.value), e.value
        with pytest.raises(MemoryError, match=r"^plain \(the worker's address space is limited"):
            s.eval("raise MemoryError('plain')").result(timeout=30)
        assert s.eval("len(bytearray(1 << 20))").result(timeout=10) == 1 << 20


def test_worker_cpu_ends_a_spinning_worker_with_sigxcpu_naming_the_limit(start_server):
    srv = start_server(worker_cpu=1)
    with open_session(srv) as s:
        with pytest.raises(WorkerDied, match=r"SIGXCPU.*1 s of CPU time --worker-cpu allows"):
            s.eval("while True:\n    pass").result(timeout=30)
        # The next atom gets a fresh worker, with its own second.
        assert s.eval("6 * 7").result(timeout=10) == 42


def test_a_worker_that_dies_takes_what_its_atoms_started_with_it(server):
    # A child of the worker (os.fork) inherits its control socket and pipes. When
    # the worker dies, the atom must still fail at once, and the child must end.
    with open_session(server) as s:
        child = s.eval(
            "import os, time\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    time.sleep(600)\n"
            "    os._exit(0)\n"
            "pid"
        ).result(timeout=10)
        assert Path(f"/proc/{child}").exists()
        with pytest.raises(WorkerDied, match="SIGKILL"):
            s.eval("import os, signal; os.kill(os.getpid(), signal.SIGKILL)").result(timeout=20)
        assert wait_for(lambda: not Path(f"/proc/{child}").exists(), timeout=10), child
        # A process started with subprocess ends when the session closes.
        sleeper = s.eval("import subprocess; subprocess.Popen(['sleep', '600']).pid").result(timeout=10)
        assert Path(f"/proc/{sleeper}").exists()
    assert wait_for(lambda: not Path(f"/proc/{sleeper}").exists(), timeout=10), sleeper


def test_numpy_works_on_fork_and_names_fork_on_subinterp(server):
    # numpy is in integration/requirements.txt, so the server's venv has it.
    with open_session(server) as s:
        assert s.eval("import numpy; int(numpy.arange(10).sum())").result(timeout=60) == 45
    with open_session(server, backend="subinterp") as s:
        with pytest.raises(ImportError) as e:
            s.eval("import numpy").result(timeout=60)
        assert "fork backend" in str(e.value)


def test_timeout_and_cancel_interrupt_sleep_promptly_and_keep_the_worker(fork):
    pid = fork.eval("import os; os.getpid()").result(timeout=10)
    t = time.monotonic()
    with pytest.raises(AtomTimeout):
        fork.eval("import time; time.sleep(60)", timeout=0.5).result(timeout=20)
    assert time.monotonic() - t < 5
    f = fork.eval("import time; time.sleep(60)")
    time.sleep(0.3)
    t = time.monotonic()
    assert f.cancel()
    with pytest.raises(AtomCancelled):
        f.result(timeout=20)
    assert time.monotonic() - t < 5
    # SIGINT became KeyboardInterrupt: the same worker goes on.
    assert fork.eval("import os; os.getpid()").result(timeout=10) == pid


def test_an_atom_that_ignores_sigint_is_killed_after_the_grace(start_server):
    srv = start_server(kill_grace=0.5)
    with open_session(srv) as s:
        pid = s.eval("import os; os.getpid()").result(timeout=10)
        t = time.monotonic()
        with pytest.raises(AtomTimeout):
            s.eval(
                "import signal, time\n"
                "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                "time.sleep(60)\n",
                timeout=0.5,
            ).result(timeout=20)
        assert time.monotonic() - t < 5
        assert s.eval("import os; os.getpid()").result(timeout=10) != pid


def test_sandbox_dir_is_the_cwd_and_is_removed_when_the_session_ends(start_server, tmp_path):
    root = tmp_path / "sandboxes"
    root.mkdir()
    srv = start_server(sandbox_dir=root)
    s = open_session(srv)
    cwd = Path(s.eval("import os; open('note.txt', 'w').write('x'); os.getcwd()").result(timeout=10))
    assert cwd.parent == root.resolve() and (cwd / "note.txt").exists()
    other = open_session(srv)
    assert other.eval("import os; os.getcwd()").result(timeout=10) != str(cwd)
    other.close()
    s.close()
    assert wait_for(lambda: not any(root.iterdir()), timeout=10), list(root.iterdir())


@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs the server to run as root")
def test_user_runs_atoms_as_that_user_in_its_sandbox(start_server, request_cleanup):
    import shutil
    import tempfile

    nobody = pwd.getpwnam("nobody")
    # pytest's tmp_path is private to root; nobody must be able to reach its sandbox.
    root = Path(tempfile.mkdtemp(prefix="pyproxy-sandboxes-", dir="/tmp"))
    root.chmod(0o755)
    request_cleanup.append(lambda: shutil.rmtree(root, ignore_errors=True))
    srv = start_server(user="nobody", sandbox_dir=root)
    with open_session(srv) as s:
        uid, gid, wrote = s.eval(
            "import os; open('f', 'w').write('x'); (os.getuid(), os.getgid(), os.stat('f').st_uid)"
        ).result(timeout=10)
        assert (uid, gid, wrote) == (nobody.pw_uid, nobody.pw_gid, nobody.pw_uid)
        # Its child processes too. (Only what the zygote imported, or what the user
        # can read, imports: here Python lives under /root, which nobody cannot read.)
        f = s.eval("import os; os.system('id -u')")
        assert list(s.output(f, timeout=10)) == [(1, str(nobody.pw_uid))]
    # The sub-interpreter backend runs in the server process, as the server's user,
    # and the server says so when it starts (--backends fork leaves it out).
    with open_session(srv, backend="subinterp") as s:
        assert s.eval("import os; os.getuid()").result(timeout=10) == 0
    assert "pass --backends fork" in srv.log_text()


def test_backends_fork_runs_only_isolated_sessions(start_server):
    srv = start_server(backends="fork")
    with open_session(srv, backend=None) as s:
        # A session that names no backend gets the one that runs.
        assert s.eval("import os; os.getpid()").result(timeout=10) != srv.proc.pid
    with pytest.raises(pyproxy.SessionRefused, match="not available on this server; it runs `fork`"):
        open_session(srv, backend="subinterp")
    log = srv.log_text()
    assert "engine started" not in log and "fork zygote ready" in log
    assert "pass --backends fork" not in log
    # A default that is left out is a usage error.
    r = subprocess.run(
        [str(SERVER_BIN), "--listen", "127.0.0.1:0", "--backends", "fork", "--backend", "subinterp"],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2 and "--backend subinterp is not among --backends fork" in r.stderr, r


def test_the_servers_token_is_not_in_a_workers_environment(start_server):
    # The server takes its token from PYPROXY_TOKEN here. A worker under --user runs
    # with less privilege than the server: had it the token, an atom could open a
    # sub-interpreter session and run code as the server's user.
    srv = start_server(env={"PYPROXY_KEEP_ME": "yes"})
    with open_session(srv) as s:
        seen = s.eval("import os; ('PYPROXY_TOKEN' in os.environ, os.environ.get('PYPROXY_KEEP_ME'))")
        assert seen.result(timeout=10) == (False, "yes")
        # Nor in what the worker starts.
        f = s.eval("import os; os.system('env')")
        lines = [line for _, line in s.output(f, timeout=10)]
        assert "PYPROXY_KEEP_ME=yes" in lines
        assert not [line for line in lines if line.startswith("PYPROXY_TOKEN=")]
        # Nor in the environment block the process started with.
        block = s.eval("open('/proc/self/environ', 'rb').read()").result(timeout=10)
        assert srv.token.encode() not in block


@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs the server to run as root")
def test_a_worker_that_cannot_start_fails_the_first_atom_saying_why(start_server, request_cleanup):
    import shutil
    import tempfile

    # Only root may enter this directory: a worker running as nobody cannot enter its
    # session's sandbox below it, so no worker can start for the session.
    root = Path(tempfile.mkdtemp(prefix="pyproxy-sandboxes-", dir="/tmp"))
    root.chmod(0o700)
    request_cleanup.append(lambda: shutil.rmtree(root, ignore_errors=True))
    srv = start_server(user="nobody", sandbox_dir=root)
    with open_session(srv) as s:
        with pytest.raises(pyproxy.RemoteError, match="the worker did not start") as e:
            s.eval("1 + 1").result(timeout=30)
        assert "Permission denied" in str(e.value) or "PermissionError" in str(e.value), e.value
        assert str(e.value).startswith("the server could not run atom 1: ") and str(e.value).count("could not run") == 1, e.value
        # The session stays usable: each atom tries again, and says so again.
        with pytest.raises(pyproxy.RemoteError, match="the worker did not start"):
            s.eval("2 + 2").result(timeout=30)
    # The sub-interpreter backend is not affected.
    with open_session(srv, backend="subinterp") as s:
        assert s.eval("1 + 1").result(timeout=10) == 2


def test_user_without_root_or_unknown_user_is_refused(start_server):
    from conftest import SERVER_BIN
    import subprocess

    p = subprocess.run(
        [str(SERVER_BIN), "--listen", "127.0.0.1:0", "--user", "no-such-user-pyproxy"],
        capture_output=True, text=True, timeout=30,
    )
    assert p.returncode == 2
    assert ("no such user" in p.stderr) if os.geteuid() == 0 else ("root" in p.stderr)


def test_workers_are_reaped_and_closed_sessions_end_their_workers(server):
    sessions = [open_session(server) for _ in range(5)]
    pids = [s.eval("import os; os.getpid()").result(timeout=10) for s in sessions]
    with pytest.raises(WorkerDied):
        sessions[0].eval("import os; os._exit(1)").result(timeout=10)
    sessions[1].eval("import subprocess; subprocess.Popen(['sleep', '0.1']); None").result(timeout=10)
    for s in sessions:
        s.close()

    def settled():
        procs = descendants(server.proc.pid)
        return all(p not in procs for p in pids) and "Z" not in procs.values()

    assert wait_for(settled, timeout=10), descendants(server.proc.pid)
    # Left: the zygote and its warm worker.
    assert len(descendants(server.proc.pid)) <= 2


def test_sigterm_with_fork_atoms_running_exits_0_leaving_no_process(start_server):
    srv = start_server(shutdown_grace=0.5, kill_grace=0.5)
    sessions = [open_session(srv) for _ in range(3)]
    futures = [s.eval("import time; time.sleep(60)") for s in sessions]
    time.sleep(0.5)
    procs = descendants(srv.proc.pid)
    assert len(procs) >= 4  # the zygote, a warm worker and three workers
    t = time.monotonic()
    assert srv.stop(signal.SIGTERM, timeout=15) == 0
    assert time.monotonic() - t < 10
    for f in futures:
        with pytest.raises(pyproxy.PyProxyError):
            f.result(timeout=10)
    left = [pid for pid in procs if Path(f"/proc/{pid}").exists()]
    assert not left, left
    for s in sessions:
        s.close()


def test_many_atoms_many_sessions_in_parallel(server):
    sessions = [open_session(server) for _ in range(8)]
    try:
        results: dict[int, list] = {}

        def run(i, s):
            results[i] = [s.eval(f"{i} + {k}").result(timeout=30) for k in range(50)]

        threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == {i: [i + k for k in range(50)] for i in range(8)}
    finally:
        for s in sessions:
            s.close()


def test_a_replacement_zygote_resolves_relative_paths_as_the_server_did(start_server, tmp_path):
    # The server starts in tmp_path, then moves into --workdir; the replacement zygote
    # parses the same command line and must find w and boxes where the server found them.
    (tmp_path / "w").mkdir()
    (tmp_path / "boxes").mkdir()
    srv = start_server(workdir="w", sandbox_dir="boxes")
    with open_session(srv) as s:
        zygote = s.eval("import os; os.getppid()").result(timeout=10)
    # An fd a sub-interpreter atom left inheritable in the server is not the new zygote's.
    marker = tmp_path / "marker"
    marker.write_text("x")
    with open_session(srv, backend="subinterp") as s:
        s.eval(f"import os; fd = os.open({str(marker)!r}, os.O_RDONLY); os.set_inheritable(fd, True); fd").result(timeout=10)
    os.kill(zygote, signal.SIGKILL)
    assert wait_for(lambda: "zygote died" in srv.log_text(), timeout=10), srv.log_text()

    def opened():
        try:
            return open_session(srv)
        except pyproxy.SessionRefused:
            return None

    sessions: list = []
    assert wait_for(lambda: sessions.append(opened()) or sessions[-1] is not None, timeout=20), srv.log_text()
    with sessions[-1] as s:
        ppid, cwd = s.eval("import os; (os.getppid(), os.getcwd())").result(timeout=10)
    assert ppid != zygote
    assert Path(cwd).parent == (tmp_path / "boxes").resolve(), cwd
    held = [os.readlink(f) for f in Path(f"/proc/{ppid}/fd").iterdir()]
    assert str(marker) not in held, held
    assert Path(f"/proc/{ppid}/cmdline").read_bytes().split(b"\0")[0] == str(SERVER_BIN).encode()
    assert "fork zygote restarted" in srv.log_text()


def test_a_zygote_environment_outside_a_server_is_refused(tmp_path):
    env = dict(os.environ, PYPROXY_ZYGOTE_FD="3", PYPROXY_HOME=str(tmp_path))
    r = subprocess.run(
        [str(SERVER_BIN), "--listen", "127.0.0.1:0", "--python-env", str(PYTHON_ENV)],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2
    assert "was not started by pyproxy-server as its zygote" in r.stderr
    assert r.stdout == ""


def zygotes_of(srv) -> list[int]:
    """The server's direct children: its zygotes. Workers are the zygotes' children."""
    return sorted(p for p, (_, ppid) in process_table().items() if ppid == srv.proc.pid)


def test_a_dead_zygote_is_replaced_and_its_sessions_carry_on(start_server):
    srv = start_server()
    with open_session(srv) as old_session:
        zygote = old_session.eval("import os; os.getppid()").result(timeout=10)
        assert zygotes_of(srv) == [zygote]
        with open_session(srv) as busy:
            running = busy.eval("import time; print('started', flush=True); time.sleep(30)")
            assert next(iter(busy.output(running, timeout=10))) == (1, "started")
            os.kill(zygote, signal.SIGKILL)
            # The atom that was running fails, saying what happened.
            with pytest.raises(WorkerDied, match="zygote"):
                running.result(timeout=10)
        assert wait_for(lambda: "zygote died" in srv.log_text(), timeout=10), srv.log_text()
        # Its workers die with it (PR_SET_PDEATHSIG); the sub-interpreter backend never notices.
        with open_session(srv, backend="subinterp") as s:
            assert s.eval("1 + 1").result(timeout=10) == 2

        # Until the replacement is ready a fork session is refused, saying why.
        def open_fork():
            try:
                return open_session(srv)
            except pyproxy.SessionRefused as e:
                assert "zygote" in str(e) and "restart" in str(e), e
                return None

        opened: list = []
        assert wait_for(lambda: opened.append(open_fork()) or opened[-1] is not None, timeout=20), srv.log_text()
        # Each refused open is one line in the server's log, not one per layer that saw it.
        assert srv.log_text().count("is being restarted") == opened.count(None), srv.log_text()
        with opened[-1] as s:
            new_zygote = s.eval("import os; os.getppid()").result(timeout=10)
        assert new_zygote != zygote and zygotes_of(srv) == [new_zygote]
        assert "fork zygote restarted" in srv.log_text()
        # The session whose worker died gets a worker of the new zygote for its next atom.
        assert old_session.eval("import os; os.getppid()").result(timeout=10) == new_zygote
    # And shutdown ends the replacement and its workers as it ends the first zygote.
    left = descendants(srv.proc.pid)
    assert new_zygote in left
    assert srv.stop() == 0
    assert wait_for(lambda: not [p for p in left if Path(f"/proc/{p}").exists()], timeout=10), left
    assert "fork zygote stopped" in srv.log_text()

"""The real `pyproxy-server` process: command line, token file, signals and
shutdown."""

from __future__ import annotations

import os
import pickle
import signal
import stat
import subprocess
import time

import pytest

import wire


@pytest.fixture(autouse=True)
def _close_connections():
    yield
    wire.close_all()
from conftest import PYTHON_ENV, SERVER_BIN


def run_bin(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([str(SERVER_BIN), *args], capture_output=True, text=True, timeout=timeout, env=full_env)


def test_help_documents_defaults_and_token_path():
    p = run_bin("--help")
    assert p.returncode == 0
    for needle in ("--listen", "127.0.0.1:9000", "--no-auth", "--token-file", "PYPROXY_TOKEN",
                   "$PYPROXY_HOME/tokens/<port>", "--shutdown-grace", "--attach-timeout", "--max-frame"):
        assert needle in p.stdout, needle


def test_no_auth_on_a_non_loopback_address_is_refused():
    p = run_bin("--no-auth", "--listen", "0.0.0.0:0", "--python-env", str(PYTHON_ENV))
    assert p.returncode == 2
    assert "loopback" in p.stderr
    assert "listening" not in p.stdout


def test_an_unknown_default_backend_is_refused_naming_both():
    p = run_bin("--backend", "threads", "--listen", "127.0.0.1:0")
    assert p.returncode == 2
    assert "subinterp" in p.stderr and "fork" in p.stderr


def test_no_auth_on_loopback_needs_no_proof(start_server):
    server = start_server(no_auth=True)
    c = wire.Conn(server.host, server.port)
    ch = c.read_kind(wire.CHALLENGE)
    assert ch.decoded["auth_required"] is False
    c.send(wire.hello(None, ch.decoded["server_nonce"]))
    assert c.read().kind == wire.WELCOME


def test_random_token_is_written_private_and_removed_at_shutdown(start_server):
    server = start_server(token="")  # no PYPROXY_TOKEN: the server makes one up
    path = server.home / "tokens" / str(server.port)
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    token = path.read_text().strip()
    assert len(token) == 64
    s = wire.open_session(server.host, server.port, token)
    lines, res = s.run(1, "1+1")
    assert pickle.loads(res.decoded["value"]) == 2
    s.close()
    assert token not in server.log_text()
    assert server.stop() == 0
    assert not path.exists(), "the token file is removed at a clean shutdown"


def test_token_file_flag(start_server, tmp_path):
    tf = tmp_path / "tok"
    tf.write_text("  file-token\n")
    server = start_server(token="", token_file=tf)
    s = wire.open_session(server.host, server.port, "file-token")
    s.close()
    assert not (server.home / "tokens" / str(server.port)).exists(), "a given token is not written out"


def test_sigterm_with_an_atom_running_says_goodbye_and_exits_0(start_server):
    server = start_server(shutdown_grace=10)
    s = wire.open_session(server.host, server.port, server.token)
    s.main.send(wire.eval_frame(1, "import time\nprint('started', flush=True)\ntime.sleep(1.0)\nprint('finished')\n'done'"))
    first = s.out.read_kind(wire.OUTPUT, skip=(wire.LOG,))
    assert first.decoded["data"] == b"started\n"
    server.signal(signal.SIGTERM)
    seen = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            f = s.out.read(deadline - time.monotonic())
        except wire.Closed:
            break
        seen.append(f)
    kinds = [f.name for f in seen]
    assert "GOODBYE" in kinds, kinds
    goodbye = seen[-1]
    assert goodbye.kind == wire.GOODBYE, "GOODBYE is the last frame before the streams close"
    assert "shutting down" in goodbye.decoded["reason"]
    # The running atom finished within the grace period: all output, then its result.
    assert any(f.kind == wire.OUTPUT and f.decoded["data"] == b"finished\n" for f in seen), kinds
    assert any(f.kind == wire.END_OF_OUTPUT and f.request_id == 1 for f in seen), kinds
    res = s.main.read_kind(wire.RESULT)
    assert res.request_id == 1 and pickle.loads(res.decoded["value"]) == "done"
    assert s.main.is_closed()
    server.proc.wait(20)
    assert server.proc.returncode == 0, server.log_text()
    assert "server stopped" in server.log_text()
    assert server.stop() == 0


def test_sigint_with_idle_sessions_exits_0_quickly(start_server):
    server = start_server()
    sessions = [wire.open_session(server.host, server.port, server.token) for _ in range(3)]
    idle = wire.Conn(server.host, server.port)  # mid-handshake
    started = time.monotonic()
    assert server.stop(signal.SIGINT) == 0
    assert time.monotonic() - started < 8
    for s in sessions:
        assert s.main.is_closed(1)
    idle.close()


def test_debug_traces_teardown_steps(start_server):
    server = start_server(env={"PYPROXY_DEBUG": "1"})
    s = wire.open_session(server.host, server.port, server.token)
    s.close()
    deadline = time.monotonic() + 5
    while "5 wait for session threads" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.log_text()
    steps = [line for line in log.splitlines() if "teardown" in line]
    assert len(steps) == 5, steps
    assert server.stop() == 0


def test_log_level_debug_writes_debug_records_and_info_does_not(start_server):
    # slog compiles debug records out of release builds unless told otherwise;
    # --log-level debug must still show them.
    def records(server, wanted: str) -> str:
        s = wire.open_session(server.host, server.port, server.token)
        s.close()
        deadline = time.monotonic() + 5
        while wanted not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        return server.log_text()

    debug = start_server(log_level="debug")
    assert "interpreter created" in records(debug, "interpreter created")
    info = start_server()
    log = records(info, "session ended")
    assert "session ended" in log and "interpreter created" not in log

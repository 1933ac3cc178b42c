"""Shared support for the integration tests: start the real `pyproxy-server`
binary on a free loopback port and tear it down with a bounded wait.

Environment (set by `make test-python`):
  PYPROXY_SERVER       path of the server binary (default: target/release/pyproxy-server)
  PYPROXY_PYTHON_ENV   virtual environment the server's interpreters import from (default: .venv)
"""

from __future__ import annotations

import os
import re
import secrets
import signal as signals
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER_BIN = Path(os.environ.get("PYPROXY_SERVER", ROOT / "target" / "release" / "pyproxy-server"))
PYTHON_ENV = Path(os.environ.get("PYPROXY_PYTHON_ENV", ROOT / ".venv"))
LISTENING = re.compile(r"pyproxy-server listening on (\S+):(\d+)")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


class Server:
    """A running `pyproxy-server` process started for a test."""

    def __init__(self, tmp_path: Path, flags: dict, env: dict | None = None, token: str | None = None):
        self.token = token if token is not None else secrets.token_hex(16)
        self.log_path = tmp_path / f"server-{secrets.token_hex(4)}.log"
        self.home = tmp_path / "pyproxy-home"
        args = [str(SERVER_BIN), "--listen", "127.0.0.1:0", "--python-env", str(PYTHON_ENV)]
        for name, value in flags.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is False or value is None:
                continue
            elif isinstance(value, (list, tuple)):
                for v in value:
                    args += [flag, str(v)]
            else:
                args += [flag, str(value)]
        full_env = dict(os.environ)
        full_env.pop("VIRTUAL_ENV", None)
        full_env["PYPROXY_HOME"] = str(self.home)
        if self.token:
            full_env["PYPROXY_TOKEN"] = self.token
        else:
            full_env.pop("PYPROXY_TOKEN", None)
        full_env.update(env or {})
        self.args = args
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._log, env=full_env, cwd=str(tmp_path)
        )
        self.host, self.port = self._wait_listening()
        self.address = f"{self.host}:{self.port}"

    def _wait_listening(self) -> tuple[str, int]:
        found: list[tuple[str, int]] = []

        def read_stdout():
            for raw in self.proc.stdout:
                m = LISTENING.search(raw.decode(errors="replace"))
                if m and not found:
                    found.append((m.group(1), int(m.group(2))))

        reader = threading.Thread(target=read_stdout, daemon=True)
        reader.start()
        self._reader = reader
        deadline = time.monotonic() + START_TIMEOUT
        while not found:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"pyproxy-server exited with {self.proc.returncode} before listening:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"pyproxy-server did not report listening in {START_TIMEOUT}s:\n{self.log_text()}")
            time.sleep(0.01)
        return found[0]

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def rss_kb(self) -> int:
        """Resident set size of the server process, in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("VmRSS not found")

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signals.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Stops the server with `sig` and returns its exit code (kills it past `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                text = self.log_text()
                self.kill()
                raise AssertionError(f"pyproxy-server did not stop within {timeout}s of {sig!r}:\n{text}")
        self._close_files()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_files()

    def _close_files(self) -> None:
        # The stdout reader ends at EOF, which follows the process's exit; closing the
        # pipe under a thread still reading it would raise in that thread.
        self._reader.join(5)
        if self.proc.stdout and not self.proc.stdout.closed and not self._reader.is_alive():
            self.proc.stdout.close()
        if not self._log.closed:
            self._log.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # A failing test's report carries the log of every server it started, so a CI
    # failure shows what the server saw.
    report = yield
    if report.failed:
        for s in getattr(item, "_pyproxy_servers", ()):
            report.sections.append((f"pyproxy-server {s.address} log ({report.when})", s.log_text()))
    return report


@pytest.fixture
def start_server(request, tmp_path):
    """Factory: start_server(token=..., env={...}, **flags) -> Server. Every server is stopped after the test."""
    started: list[Server] = []
    request.node._pyproxy_servers = started

    def start(*, token: str | None = None, env: dict | None = None, **flags) -> Server:
        if not SERVER_BIN.exists():
            pytest.fail(f"{SERVER_BIN} is missing: run `make build` first")
        s = Server(tmp_path, flags, env=env, token=token)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.stop()
        else:
            s._close_files()


@pytest.fixture
def server(start_server) -> Server:
    """A server with default flags and a random token (in `server.token`)."""
    return start_server()

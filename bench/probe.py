"""Decomposes PyProxy's figures for docs/performance.md: the same atoms driven
through the real server by a raw-socket client (integration/wire.py, no
pyproxy client library), so server time and client-library time separate.

    bench/.venv/bin/python bench/probe.py [--iters N] [--atoms N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))
sys.path.insert(0, str(HERE))

import cloudpickle  # noqa: E402
import wire  # noqa: E402
from run import PyProxyServer, pct  # noqa: E402


def noop():
    # Defined here, not imported: cloudpickle sends __main__ functions by value,
    # while run.noop would go by reference and fail to import on the server.
    return 5


def ok(f) -> bool:
    """A RESULT whose outcome is a value (not an exception)."""
    return f.kind == wire.RESULT and f.payload[9] == 0


def print_lines(n):
    pad = "x" * 46
    for i in range(n):
        print(f"line {i:08d} {pad}")


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, context switches) of every thread of `pid` so far."""
    import os

    ticks = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.endswith("ctxt_switches:") or "ctxt_switches" in line:
                    switches += int(line.split()[1])
        except OSError:
            pass
    return cpu, switches


class Phase:
    """Prints the server's CPU time and context switches per atom over a block."""

    def __init__(self, srv, label: str, atoms: int, perf: str | None = None):
        self.srv, self.label, self.atoms = srv, label, atoms
        self.perf = perf[1] if perf and perf[0] == label else None

    def __enter__(self):
        import subprocess

        self.p = None
        if self.perf:
            self.p = subprocess.Popen(
                ["perf", "record", "-e", "cpu-clock", "-F", "4000", "-g", "-p", str(self.srv.proc.pid), "-o", self.perf],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
        self.before = proc_stats(self.srv.proc.pid)
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import signal

        dt = time.perf_counter() - self.t
        cpu, sw = proc_stats(self.srv.proc.pid)
        if self.p:
            self.p.send_signal(signal.SIGINT)
            self.p.wait(30)
        print(
            f"  server during {self.label}: {1e6 * (cpu - self.before[0]) / self.atoms:.1f} µs CPU and "
            f"{(sw - self.before[1]) / self.atoms:.1f} context switches per atom; wall {1e6 * dt / self.atoms:.1f} µs per atom"
        )


def read_big(conn: wire.Conn) -> tuple[int, int]:
    """Reads one frame into a preallocated buffer (wire.Conn.read is quadratic on 64 MiB)."""
    import struct

    while len(conn.buf) < 4:
        conn.buf += conn.sock.recv(65536)
    (length,) = struct.unpack(">I", conn.buf[:4])
    body = bytearray(length)
    have = conn.buf[4:]
    body[: len(have)] = have
    view, got = memoryview(body), len(have)
    conn.buf = b""
    conn.sock.settimeout(120)
    while got < length:
        got += conn.sock.recv_into(view[got:], length - got)
    global LAST_DURATION_US
    LAST_DURATION_US = int.from_bytes(body[9:17], "big")
    return body[0], length


LAST_DURATION_US = 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--atoms", type=int, default=20000)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--server-flag", action="append", default=[])
    ap.add_argument("--perf", help="perf record the server during one phase into this file")
    ap.add_argument("--perf-phase", default="W2 source", help="which phase --perf records")
    a = ap.parse_args()
    import datetime
    import platform

    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"probe.py {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, Python {platform.python_version()}, load average {load}")
    perf = (a.perf_phase, a.perf) if a.perf else None
    srv = PyProxyServer("--max-pipelined", str(a.atoms + 10), *a.server_flag)
    host, port = srv.address.rsplit(":", 1)
    try:
        s = wire.open_session(host, int(port), srv.token)
        fn = cloudpickle.dumps(noop, protocol=5)
        for label, kind, payload in (("source '5'", wire.SOURCE, "5"), ("function noop", wire.FUNCTION, fn)):
            times = []
            for i in range(200):
                s.main.send(wire.eval_frame(i + 1 + (0 if kind == wire.SOURCE else 10**6), payload, kind=kind))
                s.main.read()
            with Phase(srv, "W1 " + label, a.iters, perf):
              for i in range(200, a.iters + 200):
                t = time.perf_counter_ns()
                s.main.send(wire.eval_frame(i + 1 + (0 if kind == wire.SOURCE else 10**6), payload, kind=kind))
                f = s.main.read()
                times.append((time.perf_counter_ns() - t) / 1e3)
                assert ok(f), f
            print(f"W1 raw-socket {label}: p50 {statistics.median(times):.1f} µs, p99 {pct(times, 0.99):.1f} µs")
        # W2, server only: one session, every EVAL sent before any RESULT is read.
        frames = b"".join(wire.eval_frame(2 * 10**6 + i, "5") for i in range(a.atoms))
        with Phase(srv, "W2 source", a.atoms, perf):
          t = time.perf_counter()
          s.main.send(frames)
          for _ in range(a.atoms):
              assert ok(s.main.read())
          dt = time.perf_counter() - t
        print(f"W2 raw-socket, 1 session, source '5' pipelined: {a.atoms / dt:,.0f} atoms/s")
        frames = b"".join(wire.eval_frame(3 * 10**6 + i, fn, kind=wire.FUNCTION) for i in range(a.atoms))
        with Phase(srv, "W2 function", a.atoms, perf):
          t = time.perf_counter()
          s.main.send(frames)
          for _ in range(a.atoms):
              assert ok(s.main.read())
          dt = time.perf_counter() - t
        print(f"W2 raw-socket, 1 session, function pipelined: {a.atoms / dt:,.0f} atoms/s")
        t = time.perf_counter()
        for _ in range(a.atoms):
            cloudpickle.dumps(noop, protocol=5)
        print(f"client: cloudpickle.dumps(noop) {1e6 * (time.perf_counter() - t) / a.atoms:.1f} µs each")
        # W4 out, server only: RESULT of 64 MiB, read by a plain socket loop.
        size = a.mib << 20
        for _ in range(2):
          with Phase(srv, "W4 out", 1, perf):
            t = time.perf_counter()
            s.main.send(wire.eval_frame(4 * 10**6, f"bytes({size})"))
            kind, length = read_big(s.main)
            dt = time.perf_counter() - t
        print(f"W4 out raw-socket: {size / dt / 1e6:,.0f} MB/s ({length:,} byte frame, kind {kind:#x}); "
              f"the atom itself ran {LAST_DURATION_US / 1e3:.0f} ms of {dt * 1e3:.0f} ms")
        g = cloudpickle.dumps({"data": bytes(size)}, protocol=5)
        frame = wire.eval_frame(5 * 10**6, "len(data)", globals_=g)
        for _ in range(2):
          with Phase(srv, "W4 in", 1, perf):
            t = time.perf_counter()
            s.main.send(frame)
            kind, length = read_big(s.main)
            dt = time.perf_counter() - t
        print(f"W4 in raw-socket: {size / dt / 1e6:,.0f} MB/s; the atom itself ran {LAST_DURATION_US / 1e3:.0f} ms of {dt * 1e3:.0f} ms")
        # W3 through the real client: server CPU and switches per line.
        sess = srv.session()
        n = 200_000
        for _ in range(2):
          with Phase(srv, "W3", n, perf):
            t = time.perf_counter()
            f = sess.eval(lambda: print_lines(n))
            got = sum(1 for _ in sess.output(future=f))
            f.wait()
            dt = time.perf_counter() - t
        print(f"W3 client: {got / dt:,.0f} lines/s")
        # W5: where a session open goes (30 open/run/close cycles, 50 ms apart).
        import pyproxy

        conn_ms, first_ms, close_ms = [], [], []
        with Phase(srv, "W5", 30, perf):
            for _ in range(30):
                time.sleep(0.05)
                t0 = time.perf_counter()
                s5 = pyproxy.PyProxySession(srv.address, token=srv.token).connect()
                t1 = time.perf_counter()
                s5.eval("5").wait()
                t2 = time.perf_counter()
                s5.close()
                t3 = time.perf_counter()
                conn_ms.append(1e3 * (t1 - t0))
                first_ms.append(1e3 * (t2 - t1))
                close_ms.append(1e3 * (t3 - t2))
        print(
            f"W5 medians: connect {statistics.median(conn_ms):.2f} ms, first atom {statistics.median(first_ms):.2f} ms, "
            f"close {statistics.median(close_ms):.2f} ms (server CPU and switches above include the 50 ms pauses)"
        )
        # Server cost by atom kind, pipelined on one session (5,000 each, or --atoms).
        kinds = [
            ("source '5'", wire.SOURCE, b"5"),
            ("code object '5'", wire.CODE, cloudpickle.dumps(compile("5", "<a>", "eval"), protocol=5)),
            ("function by reference", wire.FUNCTION, cloudpickle.dumps(time.time, protocol=5)),
            ("function by value (noop)", wire.FUNCTION, fn),
        ]
        for i, (label, kind, payload) in enumerate(kinds):
            n = min(5000, a.atoms)
            frames = b"".join(wire.eval_frame(10**7 * (i + 1) + j, payload, kind=kind) for j in range(n))
            with Phase(srv, "kind " + label, n, perf):
                t = time.perf_counter()
                s.main.send(frames)
                for _ in range(n):
                    f = s.main.read()
                    assert ok(f), f
                dt = time.perf_counter() - t
            print(f"atom kind {label}: {n / dt:,.0f} atoms/s pipelined")
    finally:
        wire.close_all()
        srv.stop()


if __name__ == "__main__":
    main()

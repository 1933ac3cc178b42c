"""PyProxy measured against its peers, side by side, in one run (issue 7).

Run it through ``bench/run.sh`` (which builds and installs what it needs) or, once
bench/.venv exists, as ``bench/.venv/bin/python bench/run.py [flags]``.

Each peer runs in a child process of its own (``run.py --child PEER``) so one
peer's threads, caches and servers never share an interpreter with the next
peer's measurement. The parent gathers the children's JSON, computes the
PyProxy-to-peer ratios and writes bench/results/latest.{md,json}.

Workloads (see docs/performance.md for what each measures and why):
  W1 round trip of a no-op returning 5 (p50, p99 µs)
  W2 20,000 no-op atoms over 2 sessions/workers, pipelined (atoms/s)
  W3 one atom printing 200,000 ~60-byte lines, until the client holds them all in order (lines/s)
  W4 64 MiB in as an argument, 64 MiB out as the return value (MB/s each)
  W5 open a new session and run one no-op (ms)
  W6 longest stall of the client's main thread (1 ms sleep ticker) while W3 runs, and idle (ms)
  W7 1,000 concurrent sessions each running one atom: wall time (s) and server peak RSS (MiB)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PINGPONG = ROOT / "target" / "release" / "pingpong"
SERVER = ROOT / "target" / "release" / "pyproxy-server"
SERVER_ENV = ROOT / ".venv"

PEERS = ["pyproxy", "pyproxy_fork", "floor", "processpool", "rpyc", "execnet", "jupyter", "dask", "pyro5"]
# PyProxy itself, on either backend: not peers, so never in a peer comparison.
OURS = ("pyproxy", "pyproxy_fork", "floor")
WORKLOADS = ["w1", "w2", "w3", "w4", "w5", "w6", "w7"]
FLOOR_BW_REPS = 30
LINE_PAD = "x" * 46  # "line 00000000 " + 46 = 60 characters, 61 bytes with "\n"
MIB = 1 << 20


class NotApplicable(Exception):
    """A peer cannot do a workload; the message becomes the table's footnote."""


# --------------------------------------------------------------------------- helpers


def noop():
    return 5


def noop_arg(_i):
    return 5


def make_bytes(n):
    return bytes(n)


def print_lines(n):
    pad = "x" * 46
    for i in range(n):
        print(f"line {i:08d} {pad}")


def expected_line(i: int) -> str:
    return f"line {i:08d} {LINE_PAD}"


def check_lines(lines: list[str], n: int, who: str) -> None:
    if len(lines) != n:
        raise AssertionError(f"{who}: got {len(lines)} lines, expected {n}")
    for i in (0, n // 2, n - 1):
        if lines[i] != expected_line(i):
            raise AssertionError(f"{who}: line {i} is {lines[i]!r}")
    if any(lines[i] != expected_line(i) for i in range(n)):
        raise AssertionError(f"{who}: lines out of order or damaged")


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round((len(s) - 1) * p))]


def timed_loop(call, iters: int, seconds: float, warmup: int) -> list[float]:
    """Times `call` up to `iters` times or `seconds`, whichever ends first; µs each."""
    for _ in range(warmup):
        call()
    out = []
    end = time.perf_counter() + seconds
    gc.disable()
    try:
        for _ in range(iters):
            t = time.perf_counter_ns()
            call()
            out.append((time.perf_counter_ns() - t) / 1e3)
            if time.perf_counter() > end:
                break
    finally:
        gc.enable()
    return out


def w4_reps(cfg):
    """W4's repetitions: at least --w4-reps, then more while --w4-seconds have not
    passed, up to --w4-max-reps. A 64 MiB copy into fresh memory can stall for
    100+ ms in a VM, so a median of 3 is mostly luck for the fast peers; the slow
    ones still stop after the minimum."""
    start = time.perf_counter()
    i = 0
    while i < cfg.w4_reps or (i < cfg.w4_max_reps and time.perf_counter() - start < cfg.w4_seconds):
        yield i
        i += 1


def w1_result(times: list[float]) -> dict:
    return {"p50_us": statistics.median(times), "p99_us": pct(times, 0.99), "n": len(times)}


def w2_result(cfg, send, check, atoms: int | None = None, drop: bool = False) -> tuple[dict, object]:
    """W2: times `send(n)`, which sends n no-op atoms over 2 sessions or workers and
    returns what stands for them, and `check(handles)`, which waits for them all and says
    whether each returned 5; atoms/s.

    A round's handles are freed when the next round's have been sent (inside that timer),
    or with `drop` as soon as the timer stops. The last round's come back with the result
    so that a caller can keep them to the end of its run: 20,000 live futures are work
    for every later full garbage collection, in later workloads' timers too."""
    n = cfg.w2_atoms if atoms is None else atoms
    rates = []
    handles = None
    for _ in range(cfg.w2_reps):
        t = time.perf_counter()
        handles = send(n)
        assert check(handles)
        rates.append(n / (time.perf_counter() - t))
        if drop:
            handles = None
    return {"atoms_s": statistics.median(rates), "atoms": n, "n": len(rates)}, handles


def w3_and_w6(cfg, out: dict, w3_once, n: int, who: str) -> list[str] | None:
    """W3, then W6 beside the same `w3_once()` (one atom printing n lines, until the client
    holds them all), for the peers that pass print output back. W3 times w3_once and
    checks the lines after the timer; lines/s. Its last round's lines are returned for
    the caller to keep to the end of its run: a 200,000-line list alive is part of what
    later garbage collections walk, W6's first."""
    lines = None
    if "w3" in cfg.workloads:
        rates = []
        for _ in range(cfg.w3_reps):
            t = time.perf_counter()
            lines = w3_once()
            rates.append(n / (time.perf_counter() - t))
            check_lines(lines, n, who)
        out["w3"] = {"lines_s": statistics.median(rates), "lines": n, "n": len(rates)}
    if "w6" in cfg.workloads:
        out["w6"] = w6(cfg, w3_once)
    return lines


def w4_result(cfg, size: int, send_in, fetch_out, free_out: str = "now") -> dict:
    """W4: times `send_in()`, one `size`-byte argument in (it returns the length the far
    side saw, checked inside the timer), and `fetch_out()`, which returns one `size`-byte
    result; MB/s each way. Freeing 64 MiB takes milliseconds, so where the result is
    freed is the caller's to say: checked and freed inside the timer (`free_out="now"`),
    after the timer stops ("after"), or held until the next round's result has arrived,
    inside that timer ("next")."""
    ins, outs = [], []
    got = None
    for _ in w4_reps(cfg):
        t = time.perf_counter()
        assert send_in() == size
        ins.append(size / (time.perf_counter() - t) / 1e6)
        if free_out == "now":
            t = time.perf_counter()
            assert len(fetch_out()) == size
            outs.append(size / (time.perf_counter() - t) / 1e6)
            continue
        t = time.perf_counter()
        got = fetch_out()
        outs.append(size / (time.perf_counter() - t) / 1e6)
        assert len(got) == size
        if free_out == "after":
            got = None
    return {"in_mb_s": statistics.median(ins), "out_mb_s": statistics.median(outs), "n": len(ins)}


def w5_result(cfg, open_, run, close) -> dict:
    """W5: the idle pause, then times `open_()` (a new session) and `run(session)` (one
    no-op returning 5); `close(session)` runs after the timer. The pause comes before the
    timer starts: it is what makes every open a cold one, not part of its cost."""
    times = []
    for _ in range(cfg.w5_iters):
        time.sleep(cfg.w5_pause)
        t = time.perf_counter()
        s = open_()
        assert run(s) == 5
        times.append((time.perf_counter() - t) * 1e3)
        close(s)
    return {"ms": statistics.median(times), "n": len(times)}


def ticker_while(work) -> float:
    """Runs `work` in a second thread and a 1 ms sleep ticker in this (main) thread;
    returns the longest gap between ticks in ms. With work=None, ticks for 2 s idle."""
    done = threading.Event()
    err: list[BaseException] = []
    # What `work` returns (W3's 200,000 lines) is freed after the ticker stops:
    # freeing it holds the GIL for milliseconds, which is the bench's cost, not
    # the peer's.
    kept: list = []

    def runner():
        try:
            kept.append(work())
        except BaseException as e:  # noqa: BLE001 - reported below
            err.append(e)
        finally:
            done.set()

    if work is None:
        threading.Timer(2.0, done.set).start()
    else:
        threading.Thread(target=runner, daemon=True).start()
    worst = 0.0
    last = time.perf_counter()
    while not done.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        worst = max(worst, now - last)
        last = now
    if err:
        raise err[0]
    return worst * 1e3


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM missing")


def start_listening(args: list[str], pattern: str, env: dict | None = None, timeout: float = 60.0, stderr=None):
    """Starts a server process and returns (proc, first match of `pattern` on its stdout)."""
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=open(stderr, "wb") if stderr else subprocess.DEVNULL,
        env=env,
        preexec_fn=raise_nofile,
        text=True,
    )
    found: list[re.Match] = []
    got = threading.Event()

    def read():
        for line in proc.stdout:
            m = re.search(pattern, line)
            if m and not found:
                found.append(m)
                got.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not got.wait(0.05):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{args[0]} exited ({proc.returncode}) or did not listen within {timeout}s")
    return proc, found[0]


def stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# --------------------------------------------------------------------------- floors


def run_floor(cfg, out: dict) -> dict:
    """The raw Rust loopback floors (W1, W4) and the local print floor (W3)."""
    rtt = json.loads(subprocess.check_output([str(PINGPONG), "rtt", "--iters", str(cfg.w1_iters * 5)]))
    out["w1"] = {"p50_us": rtt["p50_us"], "p99_us": rtt["p99_us"], "n": rtt["iters"]}
    # The best of many repetitions: on a shared VM this floor moves between 1.4 and
    # 5 GB/s from one run to the next, and noise only ever slows it, so its best
    # is the machine's loopback bandwidth and ratios against it are conservative.
    bw = json.loads(
        subprocess.check_output([str(PINGPONG), "bw", "--bytes", str(cfg.w4_mib * MIB), "--reps", str(FLOOR_BW_REPS)])
    )
    out["w4"] = {"in_mb_s": bw["best_mb_s"], "out_mb_s": bw["best_mb_s"], "n": bw["reps"]}
    # The same bytes as one message between two buffers of its size, as a 64 MiB
    # payload moves: memory bandwidth, not the CPU caches, sets this one.
    msg = json.loads(
        subprocess.check_output(
            [str(PINGPONG), "bw", "--bytes", str(cfg.w4_mib * MIB), "--reps", str(FLOOR_BW_REPS), "--message"]
        )
    )
    out["w4_message"] = {"mb_s": msg["best_mb_s"], "n": msg["reps"]}
    # Two loopback connects and one round trip after W5's idle pause: the least a
    # session of two streams and one no-op can cost here.
    pause_ms = max(0, round(cfg.w5_pause * 1000))
    opened = json.loads(
        subprocess.check_output([str(PINGPONG), "open", "--iters", str(cfg.w5_iters), "--pause", str(pause_ms)])
    )
    out["w5"] = {"ms": opened["p50_ms"], "n": opened["iters"]}
    n = cfg.w3_lines
    src = (
        "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\npad='x'*46\n"
        f"for i in range({n}):\n    print(f'line {{i:08d}} {{pad}}')\n"
    )
    rates = []
    for _ in range(cfg.w3_reps):
        p = subprocess.Popen([sys.executable, "-c", src], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert p.stdout.readline() == b"ready\n"  # interpreter start-up is not part of the print loop
        t = time.perf_counter()
        p.stdin.write(b"go\n")
        p.stdin.flush()
        lines = [raw[:-1].decode() for raw in p.stdout]
        dt = time.perf_counter() - t
        p.wait()
        check_lines(lines, n, "local floor")
        rates.append(n / dt)
    out["w3"] = {"lines_s": statistics.median(rates), "lines": n, "n": len(rates)}
    return out


# --------------------------------------------------------------------------- PyProxy


class PyProxyServer:
    def __init__(self, *extra: str, stderr: Path | None = None, log_level: str = "info"):
        self.token = secrets.token_hex(16)
        self.home = tempfile.mkdtemp(prefix="pyproxy-bench-")
        env = dict(os.environ, PYPROXY_TOKEN=self.token, PYPROXY_HOME=self.home)
        env.pop("VIRTUAL_ENV", None)
        args = [str(SERVER), "--listen", "127.0.0.1:0", "--python-env", str(SERVER_ENV), "--log-level", log_level]
        self.proc, m = start_listening(args + list(extra), r"pyproxy-server listening on (\S+):(\d+)", env, stderr=stderr)
        self.address = f"{m.group(1)}:{m.group(2)}"

    def session(self, backend: str | None = None):
        from pyproxy import PyProxySession

        return PyProxySession(self.address, token=self.token, backend=backend).connect()

    def stop(self):
        stop(self.proc)


def run_pyproxy(cfg, out: dict, backend: str = "subinterp") -> dict:
    raise_nofile()
    srv = PyProxyServer("--max-pipelined", str(cfg.w2_atoms + 10))
    try:
        s1, s2 = srv.session(backend), srv.session(backend)
        if "w1" in cfg.workloads:
            out["w1"] = w1_result(timed_loop(lambda: s1.eval(noop).wait(), cfg.w1_iters, cfg.w1_seconds, 200))
            src = timed_loop(lambda: s1.eval("5").wait(), cfg.w1_iters, cfg.w1_seconds, 200)
            out["w1_source"] = w1_result(src)
        if "w2" in cfg.workloads:

            def all_five(futs):
                return all(f.wait() == 5 for f in futs)

            out["w2"], _ = w2_result(
                cfg, lambda n: [(s1 if i % 2 else s2).eval(noop) for i in range(n)], all_five, drop=True
            )
            out["w2_source"], _ = w2_result(
                cfg, lambda n: [(s1 if i % 2 else s2).eval("5") for i in range(n)], all_five, drop=True
            )
        n = cfg.w3_lines

        def w3_once():
            f = s1.eval(lambda: print_lines(n))
            lines = [line for _fd, line in s1.output(future=f)]
            f.wait()
            return lines

        lines = w3_and_w6(cfg, out, w3_once, n, "pyproxy")  # kept to the end: see w3_and_w6
        if "w4" in cfg.workloads:
            size = cfg.w4_mib * MIB
            blob = os.urandom(size)
            out["w4"] = w4_result(
                cfg, size,
                lambda: s1.eval("len(data)", globals={"data": blob}).wait(),
                lambda: s1.eval(f"bytes({size})").wait(),
                free_out="after",
            )
        s1.close()
        s2.close()
        if "w5" in cfg.workloads:
            out["w5"] = w5_result(cfg, lambda: srv.session(backend), lambda s: s.eval(noop).wait(), lambda s: s.close())
    finally:
        srv.stop()
    if "w7" in cfg.workloads and backend == "fork":
        out["w7"] = {"na": "a fork session is a whole worker process; W7 is measured on the sub-interpreter backend"}
    elif "w7" in cfg.workloads:
        try:
            out["w7"] = w7_result(cfg, lambda: pyproxy_w7(cfg))
        except Exception as e:  # noqa: BLE001 - reported in the table
            out["w7"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def pyproxy_w7(cfg) -> dict:
    n = cfg.w7_sessions
    log = Path(tempfile.mkdtemp(prefix="pyproxy-bench-w7-")) / "server.log"
    srv = PyProxyServer(
        "--max-sessions", str(n + 16), "--max-conns-per-peer", str(2 * n + 64),
        "--attach-timeout", "120", "--handshake-timeout", "120",
        # info (the default): the level of the "waited for an interpreter" records
        # counted below (debug, which logs every step of 1,000 handshakes, took ~0.05 s more).
        stderr=log,
    )
    sessions, errors = [], []
    try:
        from pyproxy import PyProxySession

        time.sleep(0.5)  # let the warm pool fill, as it would on a server that has been up a while

        def one(_i):
            try:
                s = PyProxySession(srv.address, token=srv.token, connect_timeout=cfg.w7_timeout).connect()
                return s, s.eval(noop)
            except Exception as e:  # noqa: BLE001 - counted and reported
                return None, e

        t = time.perf_counter()
        with ThreadPoolExecutor(cfg.w7_connectors) as pool:
            pairs = list(pool.map(one, range(n)))
        connected = time.perf_counter() - t
        ok = 0
        for s, f in pairs:
            if s is None:
                errors.append(f)
                continue
            sessions.append(s)
            try:
                ok += f.wait(cfg.w7_timeout) == 5
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        wall = time.perf_counter() - t
        rss = peak_rss_mib(srv.proc.pid)
    finally:
        for s in sessions:
            s.close()
        srv.stop()
    # Atoms that waited ≥ 1 ms for an interpreter (sessions borrow one per run of atoms).
    waits = [int(m) / 1e3 for m in re.findall(r"waited for an interpreter.*?waited_us: (\d+)", log.read_text(errors="replace"))]
    res = {"wall_s": wall, "rss_mib": rss, "sessions": n, "ok": ok, "connect_s": connected,
           "atoms_waited_for_interp": len(waits), "interp_wait_ms_median": statistics.median(waits) if waits else None,
           "interp_wait_ms_max": max(waits) if waits else None}
    if ok != n:
        first = repr(errors[0])[:200] if errors else "wrong value"
        res["error"] = (f"{ok} of {n} sessions ran their atom within {wall:.1f} s (peak RSS {rss:,.0f} MiB); "
                        f"{len(errors)} failed, first: {first}")
    return res


def w7_result(cfg, once) -> dict:
    """W7: `once()` opens cfg.w7_sessions sessions at once, runs an atom in each and
    returns a dict with wall_s and rss_mib (the server's peak so far); run
    cfg.w7_runs times. Single runs of PyProxy gave 0.51–0.66 s here, so W7 reports the
    run of median wall time, with the highest RSS of all. A run that reports an error
    ends W7 with it."""
    runs = []
    for _ in range(cfg.w7_runs):
        r = once()
        if "error" in r:
            return r
        runs.append(r)
    runs.sort(key=lambda r: r["wall_s"])
    res = dict(runs[len(runs) // 2])  # the median run, so its other fields match its time
    res["rss_mib"] = max(r["rss_mib"] for r in runs)
    res["runs"] = len(runs)
    return res


def w7_own_server(cfg, start, open_one, close_one) -> dict:
    """W7 for a peer: `start()` starts a server of its own, so that its peak RSS is W7's
    alone as PyProxy's is, and returns (process, address); `open_one(address)` opens one
    client and returns it with the value of one no-op; `close_one(client)` closes it after
    the timer."""
    n = cfg.w7_sessions

    def once():
        proc, address = start()
        try:
            t = time.perf_counter()
            with ThreadPoolExecutor(cfg.w7_connectors) as pool:
                pairs = list(pool.map(lambda _i: open_one(address), range(n)))
            wall = time.perf_counter() - t
            rss = peak_rss_mib(proc.pid)
            assert all(v == 5 for _c, v in pairs)
            for c, _v in pairs:
                close_one(c)
        finally:
            stop(proc)
        return {"wall_s": wall, "rss_mib": rss, "sessions": n}

    return w7_result(cfg, once)


def w6(cfg, w3_once) -> dict:
    idle = [ticker_while(None) for _ in range(cfg.w6_reps)]
    busy = [ticker_while(w3_once) for _ in range(cfg.w6_reps)]
    return {"busy_ms": statistics.median(busy), "idle_ms": statistics.median(idle), "n": len(busy)}


# --------------------------------------------------------------------------- ProcessPoolExecutor


def run_processpool(cfg, out: dict) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as ex:
        list(ex.map(noop_arg, range(100)))
        if "w1" in cfg.workloads:
            out["w1"] = w1_result(timed_loop(lambda: ex.submit(noop).result(), cfg.w1_iters, cfg.w1_seconds, 200))
        if "w2" in cfg.workloads:
            out["w2"], futs = w2_result(  # futs: kept to the end, see w2_result
                cfg, lambda n: [ex.submit(noop) for _ in range(n)], lambda futs: all(f.result() == 5 for f in futs)
            )
        if "w4" in cfg.workloads:
            size = cfg.w4_mib * MIB
            blob = os.urandom(size)
            out["w4"] = w4_result(
                cfg, size, lambda: ex.submit(len, blob).result(), lambda: ex.submit(make_bytes, size).result()
            )
    why = "a worker's print goes to the worker's inherited stdout; nothing reaches the caller"
    for w in ("w3", "w6"):
        out[w] = {"na": why}
    if "w5" in cfg.workloads:
        times = []
        for _ in range(cfg.w5_iters):
            time.sleep(cfg.w5_pause)
            t = time.perf_counter()
            with ProcessPoolExecutor(1) as ex:
                assert ex.submit(noop).result() == 5
                times.append((time.perf_counter() - t) * 1e3)
        out["w5"] = {"ms": statistics.median(times), "n": len(times)}
    out["w7"] = {"na": "no sessions: a pool of worker processes serves one caller"}
    return out


# --------------------------------------------------------------------------- RPyC

RPYC_SERVER = """
import sys
from rpyc.utils.server import {kind}
from rpyc.core import SlaveService
s = {kind}(SlaveService, hostname="127.0.0.1", port=0, reuse_addr=True,
           protocol_config={{"allow_public_attrs": True, "sync_request_timeout": 600}})
s._listen()  # listen before telling the port, or a fast client is refused
print("rpyc listening on", s.port, flush=True)
s.start()
"""


def rpyc_server(kind: str):
    proc, m = start_listening([sys.executable, "-c", RPYC_SERVER.format(kind=kind)], r"rpyc listening on (\d+)")
    return proc, int(m.group(1))


def run_rpyc(cfg, out: dict) -> dict:
    import rpyc

    raise_nofile()
    proc, port = rpyc_server("ThreadedServer")
    try:
        conn = rpyc.classic.connect("127.0.0.1", port)
        conn.execute("def noop():\n    return 5")
        rnoop = conn.namespace["noop"]
        if "w1" in cfg.workloads:
            out["w1"] = w1_result(timed_loop(rnoop, cfg.w1_iters, cfg.w1_seconds, 200))
        n = min(cfg.w3_lines, cfg.w3_lines_rpyc)

        def w3_once():
            got: list[str] = []

            class Collector:
                def write(self, s):
                    got.append(s)

                def flush(self):
                    pass

            rsys = conn.modules.sys
            old = rsys.stdout
            rsys.stdout = Collector()
            try:
                conn.execute(f"pad = 'x' * 46\nfor i in range({n}):\n    print(f'line {{i:08d}} {{pad}}')")
            finally:
                rsys.stdout = old
            return "".join(got).split("\n")[:-1]

        lines = w3_and_w6(cfg, out, w3_once, n, "rpyc")  # kept to the end: see w3_and_w6
        if "w4" in cfg.workloads:
            size = cfg.w4_mib * MIB
            blob = os.urandom(size)
            rlen = conn.builtins.len
            out["w4"] = w4_result(cfg, size, lambda: rlen(blob), lambda: conn.eval(f"bytes({size})"), free_out="next")
        conn.close()
        if "w5" in cfg.workloads:
            out["w5"] = w5_result(
                cfg,
                lambda: rpyc.classic.connect("127.0.0.1", port),
                lambda c: c.eval("(lambda: 5)()"),
                lambda c: c.close(),
            )
        if "w7" in cfg.workloads:

            def open_one(port7):
                c = rpyc.classic.connect("127.0.0.1", port7)
                return c, c.eval("(lambda: 5)()")

            out["w7"] = w7_own_server(cfg, lambda: rpyc_server("ThreadedServer"), open_one, lambda c: c.close())
    finally:
        stop(proc)
    if "w2" in cfg.workloads:
        # Two connections to a ForkingServer: a process per connection, as 2 workers.
        proc, port = rpyc_server("ForkingServer")
        try:
            conns = [rpyc.classic.connect("127.0.0.1", port) for _ in range(2)]
            fns = []
            for c in conns:
                c.execute("def noop():\n    return 5")
                fns.append(rpyc.async_(c.namespace["noop"]))
            out["w2"], res = w2_result(  # res: kept to the end, see w2_result
                cfg, lambda n: [fns[i % 2]() for i in range(n)], lambda res: all(r.value == 5 for r in res)
            )
            for c in conns:
                c.close()
        finally:
            stop(proc)
    return out


# --------------------------------------------------------------------------- execnet

EXECNET_SERVE = """
import sys
def noop():
    return 5
while True:
    msg = channel.receive()
    op = msg[0]
    if op == "stop":
        break
    elif op == "noop":
        channel.send(noop())
    elif op == "len":
        channel.send(len(msg[1]))
    elif op == "make":
        channel.send(bytes(msg[1]))
    elif op == "print":
        old = sys.stdout
        sys.stdout = channel.makefile("w")
        pad = "x" * 46
        try:
            for i in range(msg[1]):
                print(f"line {i:08d} {pad}")
        finally:
            sys.stdout = old
        channel.send(("done",))
"""


def run_execnet(cfg, out: dict) -> dict:
    import execnet

    spec = f"popen//python={sys.executable}"
    gws = [execnet.makegateway(spec) for _ in range(2)]
    chans = [gw.remote_exec(EXECNET_SERVE) for gw in gws]
    ch = chans[0]

    def call(msg):
        ch.send(msg)
        return ch.receive()

    try:
        if "w1" in cfg.workloads:
            out["w1"] = w1_result(timed_loop(lambda: call(("noop",)), cfg.w1_iters, cfg.w1_seconds, 200))
        if "w2" in cfg.workloads:

            def send_all(n):
                for i in range(n):
                    chans[i % 2].send(("noop",))
                return n  # what stands for the atoms: how many replies to receive

            out["w2"], _ = w2_result(cfg, send_all, lambda n: all(chans[i % 2].receive() == 5 for i in range(n)))
        n = min(cfg.w3_lines, cfg.w3_lines_slow)

        def w3_once():
            ch.send(("print", n))
            got = []
            while True:
                item = ch.receive()
                if item == ("done",):
                    break
                got.append(item)
            return "".join(got).split("\n")[:-1]

        lines = w3_and_w6(cfg, out, w3_once, n, "execnet")  # kept to the end: see w3_and_w6
        if "w4" in cfg.workloads:
            size = cfg.w4_mib * MIB
            blob = os.urandom(size)
            out["w4"] = w4_result(cfg, size, lambda: call(("len", blob)), lambda: call(("make", size)))
    finally:
        for c in chans:
            c.send(("stop",))
        for gw in gws:
            gw.exit()
    if "w5" in cfg.workloads:

        def open_gateway():
            gw = execnet.makegateway(spec)
            return gw, gw.remote_exec("channel.send((lambda: 5)())")

        out["w5"] = w5_result(cfg, open_gateway, lambda gw_ch: gw_ch[1].receive(), lambda gw_ch: gw_ch[0].exit())
    out["w7"] = {"na": "a session is a Python process (popen gateway): 1,000 of them is not an ordinary configuration"}
    return out


# --------------------------------------------------------------------------- Jupyter

JUPYTER_SETUP = """
def noop():
    return 5
from comm import get_comm_manager
def _bench_target(comm, open_msg):
    @comm.on_msg
    def _recv(msg):
        data = msg["content"]["data"]
        if data["op"] == "len":
            comm.send({"n": len(msg["buffers"][0])})
        else:
            comm.send({"n": data["n"]}, buffers=[bytes(data["n"])])
get_comm_manager().register_target("bench", _bench_target)
"""


def run_jupyter(cfg, out: dict) -> dict:
    from jupyter_client.manager import start_new_kernel

    kernels = [start_new_kernel(kernel_name="python3") for _ in range(2)]
    km, kc = kernels[0]

    def run(code, kc=kc, **kw):
        reply = kc.execute(code, store_history=False, reply=True, timeout=120, **kw)
        assert reply["content"]["status"] == "ok", reply["content"]
        return reply

    def drain(kc):
        while True:
            try:
                kc.get_iopub_msg(timeout=0.05)
            except Exception:
                return

    def noop_call():
        r = run("", user_expressions={"r": "noop()"})
        assert r["content"]["user_expressions"]["r"]["data"]["text/plain"] == "5"

    try:
        for _km, k in kernels:
            run(JUPYTER_SETUP, kc=k)
        if "w1" in cfg.workloads:
            times = timed_loop(noop_call, min(cfg.w1_iters, 1000), cfg.w1_seconds, 20)
            out["w1"] = w1_result(times)
        drain(kc)
        if "w2" in cfg.workloads:
            rates = []
            n = min(cfg.w2_atoms, cfg.w2_atoms_slow)
            for _ in range(cfg.w2_reps):
                t = time.perf_counter()
                ids = []
                for i in range(n):
                    k = kernels[i % 2][1]
                    ids.append(k.execute("", store_history=False, user_expressions={"r": "noop()"}))
                for k in (kernels[0][1], kernels[1][1]):
                    for _ in range(n // 2):
                        r = k.get_shell_msg(timeout=120)
                        assert r["content"]["user_expressions"]["r"]["data"]["text/plain"] == "5"
                rates.append(n / (time.perf_counter() - t))
                for _km, k in kernels:
                    drain(k)
            out["w2"] = {"atoms_s": statistics.median(rates), "atoms": n, "n": len(rates)}
        n = cfg.w3_lines

        def w3_once():
            got = []

            def hook(msg):
                if msg["msg_type"] == "stream":
                    got.append(msg["content"]["text"])

            code = f"pad = 'x' * 46\nfor i in range({n}):\n    print(f'line {{i:08d}} {{pad}}')"
            r = kc.execute_interactive(code, store_history=False, output_hook=hook, timeout=600)
            assert r["content"]["status"] == "ok"
            return "".join(got).split("\n")[:-1]

        lines = w3_and_w6(cfg, out, w3_once, n, "jupyter")  # kept to the end: see w3_and_w6
        if "w4" in cfg.workloads:
            import uuid

            size = cfg.w4_mib * MIB
            blob = os.urandom(size)
            comm_id = uuid.uuid4().hex
            sess, sock = kc.session, kc.shell_channel.socket
            sess.send(sock, "comm_open", {"comm_id": comm_id, "target_name": "bench", "data": {}})
            drain(kc)

            def comm_call(data, buffers=None):
                sess.send(sock, "comm_msg", {"comm_id": comm_id, "data": data}, buffers=buffers)
                while True:
                    msg = kc.get_iopub_msg(timeout=120)
                    if msg["msg_type"] == "comm_msg":
                        return msg

            ins, outs = [], []
            for _ in w4_reps(cfg):
                t = time.perf_counter()
                assert comm_call({"op": "len"}, [blob])["content"]["data"]["n"] == size
                ins.append(size / (time.perf_counter() - t) / 1e6)
                t = time.perf_counter()
                msg = comm_call({"op": "make", "n": size})
                got = bytes(msg["buffers"][0])
                outs.append(size / (time.perf_counter() - t) / 1e6)
                assert len(got) == size
            out["w4"] = {"in_mb_s": statistics.median(ins), "out_mb_s": statistics.median(outs), "n": len(ins)}
        if "w5" in cfg.workloads:
            times = []
            for _ in range(cfg.w5_iters):
                time.sleep(cfg.w5_pause)
                t = time.perf_counter()
                c = km.client()
                c.start_channels()
                c.wait_for_ready(timeout=60)
                r = c.execute("", store_history=False, reply=True, user_expressions={"r": "noop()"}, timeout=60)
                assert r["content"]["user_expressions"]["r"]["data"]["text/plain"] == "5"
                times.append((time.perf_counter() - t) * 1e3)
                c.stop_channels()
            out["w5"] = {"ms": statistics.median(times), "n": len(times)}
    finally:
        for k_m, k in kernels:
            k.stop_channels()
            k_m.shutdown_kernel(now=True)
    out["w7"] = {"na": "a session is a kernel process: 1,000 kernels is not an ordinary configuration"}
    return out


# --------------------------------------------------------------------------- Dask


def run_dask(cfg, out: dict) -> dict:
    from distributed import Client, LocalCluster

    why = "Dask does not send a task's print output to the client"
    out["w3"] = {"na": why}
    out["w6"] = {"na": why}
    out["w7"] = {"na": "1,000 Dask clients on one scheduler is not an ordinary configuration"}

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
    ) as cluster, Client(cluster) as client:
        client.submit(noop, pure=False).result()
        if "w1" in cfg.workloads:
            times = timed_loop(lambda: client.submit(noop, pure=False).result(), cfg.w1_iters, cfg.w1_seconds, 50)
            out["w1"] = w1_result(times)
        if "w2" in cfg.workloads:
            out["w2"], _ = w2_result(
                cfg,
                lambda n: client.map(noop_arg, range(n), pure=False),
                lambda futs: all(v == 5 for v in client.gather(futs)),
                atoms=min(cfg.w2_atoms, cfg.w2_atoms_slow),
                drop=True,
            )
        if "w4" in cfg.workloads:
            size = cfg.w4_mib * MIB
            blob = os.urandom(size)
            out["w4"] = w4_result(
                cfg, size,
                lambda: client.submit(len, blob, pure=False).result(),
                lambda: client.submit(make_bytes, size, pure=False).result(),
            )
        if "w5" in cfg.workloads:
            times = []
            for _ in range(cfg.w5_iters):
                time.sleep(cfg.w5_pause)
                t = time.perf_counter()
                with Client(cluster.scheduler_address) as c:
                    assert c.submit(noop, pure=False).result() == 5
                    times.append((time.perf_counter() - t) * 1e3)
            out["w5"] = {"ms": statistics.median(times), "n": len(times)}
    return out


# --------------------------------------------------------------------------- Pyro5

PYRO_SERVER = """
import Pyro5.api
@Pyro5.api.expose
class Bench:
    def noop(self):
        return 5
    def length(self, data):
        return len(data)
    def make(self, n):
        return bytes(n)
Pyro5.config.SERVERTYPE = "thread"
Pyro5.config.THREADPOOL_SIZE = 2000
daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
uri = daemon.register(Bench, "bench")
print("pyro uri", uri, flush=True)
daemon.requestLoop()
"""


def run_pyro5(cfg, out: dict) -> dict:
    import Pyro5.api

    why = "Pyro5 does not send a remote method's print output to the caller"
    out["w3"] = {"na": why}
    out["w6"] = {"na": why}
    raise_nofile()
    proc, m = start_listening([sys.executable, "-c", PYRO_SERVER], r"pyro uri (\S+)")
    uri = m.group(1)
    try:
        p = Pyro5.api.Proxy(uri)
        if "w1" in cfg.workloads:
            out["w1"] = w1_result(timed_loop(p.noop, cfg.w1_iters, cfg.w1_seconds, 200))
        if "w2" in cfg.workloads:
            rates = []
            for _ in range(cfg.w2_reps):
                n = cfg.w2_atoms

                def batch(_i):
                    with Pyro5.api.Proxy(uri) as px:
                        b = Pyro5.api.BatchProxy(px)
                        for _ in range(n // 2):
                            b.noop()
                        return list(b())

                t = time.perf_counter()
                with ThreadPoolExecutor(2) as pool:
                    res = [v for part in pool.map(batch, range(2)) for v in part]
                assert len(res) == n and all(v == 5 for v in res)
                rates.append(n / (time.perf_counter() - t))
            out["w2"] = {"atoms_s": statistics.median(rates), "atoms": cfg.w2_atoms, "n": len(rates)}
        if "w4" in cfg.workloads:
            size = cfg.w4_mib * MIB
            blob = os.urandom(size)
            p._pyroSerializer = "marshal"  # carries bytes as bytes; serpent would base64 them
            out["w4"] = w4_result(cfg, size, lambda: p.length(blob), lambda: p.make(size))
        p._pyroRelease()
        if "w5" in cfg.workloads:
            # _pyroRelease() is what the proxy's `with` runs on exit.
            out["w5"] = w5_result(cfg, lambda: Pyro5.api.Proxy(uri), lambda px: px.noop(), lambda px: px._pyroRelease())
        if "w7" in cfg.workloads:

            def start7():
                proc7, m7 = start_listening([sys.executable, "-c", PYRO_SERVER], r"pyro uri (\S+)")
                return proc7, m7.group(1)

            def open_one(uri7):
                px = Pyro5.api.Proxy(uri7)
                return px, px.noop()

            def close_one(px):
                px._pyroClaimOwnership()  # opened in a pool thread
                px._pyroRelease()

            out["w7"] = w7_own_server(cfg, start7, open_one, close_one)
    finally:
        stop(proc)
    return out


RUNNERS = {
    "pyproxy": run_pyproxy,
    "pyproxy_fork": lambda cfg, out: run_pyproxy(cfg, out, backend="fork"),
    "floor": run_floor,
    "processpool": run_processpool,
    "rpyc": run_rpyc,
    "execnet": run_execnet,
    "jupyter": run_jupyter,
    "dask": run_dask,
    "pyro5": run_pyro5,
}

# --------------------------------------------------------------------------- report

LABELS = {
    "floor": "floor",
    "pyproxy": "PyProxy",
    "pyproxy_fork": "PyProxy fork",
    "processpool": "ProcessPool",
    "rpyc": "RPyC",
    "execnet": "execnet",
    "jupyter": "Jupyter",
    "dask": "Dask",
    "pyro5": "Pyro5",
}

# (row id, workload, field, label, unit, higher is better)
ROWS = [
    ("W1 p50", "w1", "p50_us", "W1 round trip p50", "µs", False),
    ("W1 p99", "w1", "p99_us", "W1 round trip p99", "µs", False),
    ("W2", "w2", "atoms_s", "W2 throughput", "atoms/s", True),
    ("W3", "w3", "lines_s", "W3 output", "lines/s", True),
    ("W4 in", "w4", "in_mb_s", "W4 64 MiB in", "MB/s", True),
    ("W4 out", "w4", "out_mb_s", "W4 64 MiB out", "MB/s", True),
    ("W5", "w5", "ms", "W5 session open + no-op", "ms", False),
    ("W6", "w6", "busy_ms", "W6 longest stall during W3", "ms", False),
    ("W6 idle", "w6", "idle_ms", "W6 same ticker, idle", "ms", False),
    ("W7 wall", "w7", "wall_s", "W7 {sessions} sessions wall", "s", False),
    ("W7 RSS", "w7", "rss_mib", "W7 server peak RSS", "MiB", False),
]


def fmt(v: float) -> str:
    if v >= 100_000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def targets(res: dict) -> list[tuple[str, str, bool | None]]:
    """Issue 7's targets, checked against this run's numbers."""
    def get(peer, w, f):
        return res.get(peer, {}).get(w, {}).get(f)

    out = []
    pp = lambda w, f: get("pyproxy", w, f)  # noqa: E731
    floor_rtt = get("floor", "w1", "p50_us")
    if pp("w1", "p50_us") and floor_rtt:
        r = pp("w1", "p50_us") / floor_rtt
        out.append(("W1 p50 ≤ 2× raw Rust ping-pong", f"{r:.1f}× ({fmt(pp('w1', 'p50_us'))} vs {fmt(floor_rtt)} µs)", r <= 2))
    if pp("w2", "atoms_s"):
        peers = [get(p, "w2", "atoms_s") for p in PEERS if p not in OURS]
        best = max([x for x in peers if x] or [0])
        v = pp("w2", "atoms_s")
        out.append(("W2 ≥ 50,000 atoms/s and ≥ 1.5× best peer", f"{fmt(v)}/s, {v / best:.2f}× best peer ({fmt(best)})" if best else fmt(v), v >= 50_000 and (not best or v >= 1.5 * best)))
    if pp("w3", "lines_s"):
        v = pp("w3", "lines_s")
        fl = get("floor", "w3", "lines_s")
        peers = [get(p, "w3", "lines_s") for p in PEERS if p not in OURS]
        best = max([x for x in peers if x] or [0])
        ok = (not fl or v >= 0.5 * fl) and (not best or v >= 10 * best)
        out.append(("W3 ≥ 0.5× local floor and ≥ 10× best peer", f"{v / fl:.2f}× floor, {v / best:.1f}× best peer" if fl and best else fmt(v), ok))
    bw = get("floor", "w4", "in_mb_s")
    if pp("w4", "in_mb_s") and bw:
        a, b = pp("w4", "in_mb_s") / bw, pp("w4", "out_mb_s") / bw
        msg = get("floor", "w4_message", "mb_s")
        vs_msg = f"; against one 64 MiB message ({fmt(msg)} MB/s): in {pp('w4', 'in_mb_s') / msg:.2f}×, out {pp('w4', 'out_mb_s') / msg:.2f}×" if msg else ""
        out.append(("W4 ≥ 0.5× raw loopback bandwidth each way", f"in {a:.2f}×, out {b:.2f}× (raw {fmt(bw)} MB/s){vs_msg}", a >= 0.5 and b >= 0.5))
    if pp("w5", "ms"):
        fl = get("floor", "w5", "ms")
        floor_note = f" (floor {fl:.2f} ms: two connects and a round trip)" if fl else ""
        out.append(("W5 ≤ 0.5 ms", f"{pp('w5', 'ms'):.2f} ms{floor_note}", pp("w5", "ms") <= 0.5))
    if pp("w6", "busy_ms") is not None:
        out.append(("W6 ≤ idle stall + 5 ms", f"{pp('w6', 'busy_ms'):.1f} ms vs idle {pp('w6', 'idle_ms'):.1f} ms", pp("w6", "busy_ms") <= pp("w6", "idle_ms") + 5))
    if pp("w7", "wall_s"):
        out.append(("W7 ≤ 2 s and ≤ 2 GiB server RSS", f"{pp('w7', 'wall_s'):.2f} s, {fmt(pp('w7', 'rss_mib'))} MiB", pp("w7", "wall_s") <= 2 and pp("w7", "rss_mib") <= 2048))
    elif res.get("pyproxy", {}).get("w7", {}).get("error"):
        out.append(("W7 ≤ 2 s and ≤ 2 GiB server RSS", "failed: " + res["pyproxy"]["w7"]["error"], False))
    for row, w, f, _label, _unit, higher in ROWS:
        if row in ("W6 idle", "W1 p99"):
            continue
        v = pp(w, f)
        if v is None:
            continue
        worse = [LABELS[p] for p in PEERS if p not in OURS and get(p, w, f) is not None and (get(p, w, f) > v if higher else get(p, w, f) < v)]
        if worse:
            out.append((f"{row}: ahead of every peer", "behind " + ", ".join(worse), False))
    return out


def render(res: dict, meta: dict) -> str:
    cols = [p for p in ["floor", "pyproxy", "pyproxy_fork", "processpool", "rpyc", "execnet", "jupyter", "dask", "pyro5"] if p in res]
    notes: list[str] = []
    note_ids: dict[str, int] = {}

    def note(text: str) -> str:
        if text not in note_ids:
            notes.append(text)
            note_ids[text] = len(notes)
        return f"[^{note_ids[text]}]"

    head = "| workload | unit | " + " | ".join(LABELS[c] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for row, w, f, label, unit, higher in ROWS:
        cells = []
        pv = res.get("pyproxy", {}).get(w, {}).get(f)
        for c in cols:
            d = res.get(c, {}).get(w, {})
            if "na" in d:
                cells.append("n/a " + note(f"{LABELS[c]}, {w.upper()}: {d['na']}"))
                continue
            if "error" in d:
                partial = f"{fmt(d[f])} " if d.get(f) is not None else ""
                cells.append(partial + "failed " + note(f"{LABELS[c]}, {w.upper()}: {d['error']}"))
                continue
            v = d.get(f)
            if v is None:
                cells.append("—")
                continue
            cell = fmt(v)
            if c == "floor":
                cell = cell if w in ("w1", "w3", "w4", "w5") else "—"
                if w == "w4" and res["floor"].get("w4_message"):
                    cell += " " + note(f"floor, W4: the same 64 MiB as one message from one 64 MiB buffer into another (memory, not the CPU caches): best {fmt(res['floor']['w4_message']['mb_s'])} MB/s")
            elif c not in OURS and pv:
                ratio = (pv / v) if higher else (v / pv)
                cell += f" ({ratio:.2f}×)"
            if c == "pyproxy" and w == "w1":
                src = res["pyproxy"].get("w1_source", {}).get(f)
                if src:
                    cell += " " + note(f"PyProxy, W1: a function atom (cloudpickled; the client reuses the pickle while the function and the immutable globals it names are unchanged); the same no-op as source text `5`: p50 {fmt(res['pyproxy']['w1_source']['p50_us'])} µs, p99 {fmt(res['pyproxy']['w1_source']['p99_us'])} µs")
            if c == "pyproxy" and w == "w2":
                src = res["pyproxy"].get("w2_source", {}).get(f)
                if src:
                    cell += " " + note(f"PyProxy, W2: function atoms (pickle reused as in W1); the same no-op as source text `5`: {fmt(src)} atoms/s")
            w3 = res.get(c, {}).get("w3", {})
            if row == "W6" and c != "floor" and w3.get("lines", meta["config"]["w3_lines"]) != meta["config"]["w3_lines"]:
                # The ticker ran beside the peer's shortened W3: less output per second than PyProxy's.
                cell += " " + note(f"{LABELS[c]}, W6: the ticker runs beside its shortened W3 ({w3['lines']:,} lines at {fmt(w3['lines_s'])} lines/s), not beside {meta['config']['w3_lines']:,}")
            for key, why in (("lines", "lines"), ("atoms", "atoms")):
                full = {"lines": meta["config"]["w3_lines"], "atoms": meta["config"]["w2_atoms"]}[key]
                if c != "floor" and key in d and d[key] != full and f in ("lines_s", "atoms_s"):
                    cell += " " + note(f"{LABELS[c]}, {w.upper()}: measured on {d[key]:,} {why} instead of {full:,}, to keep the run short; the rate is per {why[:-1]}")
            cells.append(cell)
        if f in ("p50_us", "p99_us") and "floor" in cols:
            pass
        label = label.format(sessions=f"{meta['config']['w7_sessions']:,}")
        lines.append(f"| {label} | {unit} | " + " | ".join(cells) + " |")
    t = targets(res)
    out = [
        f"# PyProxy benchmark — {meta['date']}",
        "",
        f"- machine: {meta['nproc']} cores, {meta['cpu']}, {meta['mem_gib']} GiB; load average at start {meta['load_start']}, at end {meta['load_end']}",
        f"- Python {meta['python']}; git commit {meta['commit']}; command: `{meta['command']}`",
        f"- medians of {meta['reps_note']}; ratios in parentheses are PyProxy's advantage over that peer "
        "(peer time / PyProxy time, or PyProxy rate / peer rate): above 1 PyProxy is ahead.",
        "- floor: W1 and W4 are the raw Rust loopback ping-pong (median) and bandwidth (best of 30; bench/src/bin/pingpong.rs); "
        "W3 is the same print loop run by a plain local Python into a pipe; W5 is two raw Rust loopback connects and one "
        "round trip after the same idle pause (median).",
        "",
        *lines,
        "",
        "## Issue 7 targets (PyProxy, this run)",
        "",
        "| target | this run | met |",
        "|---|---|---|",
        *[f"| {a} | {b} | {'yes' if ok else 'no'} |" for a, b, ok in t],
        "",
        *[f"[^{i}]: {n}" for i, n in enumerate(notes, 1)],
        "",
    ]
    return "\n".join(out)


def meta_info(cfg, load_start: str) -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    try:
        commit = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], text=True).strip()
        dirty = subprocess.check_output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "pyclient"], text=True)
        if dirty.strip():
            commit += " (src/ or pyclient/ modified)"
    except Exception:
        commit = "unknown"
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem),
        "python": platform.python_version(),
        "commit": commit,
        "load_start": load_start,
        "load_end": loadavg(),
        "command": "bench/run.sh " + " ".join(sys.argv[1:]),
        "reps_note": f"W1 up to {cfg.w1_iters} calls or {cfg.w1_seconds} s, W2 {cfg.w2_reps}, W3 {cfg.w3_reps}, "
        f"W4 {cfg.w4_reps} to {cfg.w4_max_reps} (more while {cfg.w4_seconds:g} s last) each way, W5 {cfg.w5_iters}, W6 {cfg.w6_reps}, W7 {cfg.w7_runs} run(s)",
        "config": vars(cfg),
    }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ",".join(PEERS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of w1..w7")
    ap.add_argument("--w1-iters", type=int, default=3000)
    ap.add_argument("--w1-seconds", type=float, default=4.0, help="cap on W1's time per peer")
    ap.add_argument("--w2-atoms", type=int, default=20_000)
    ap.add_argument("--w2-atoms-slow", type=int, default=2_000, help="W2 atoms for Jupyter and Dask")
    ap.add_argument("--w2-reps", type=int, default=3)
    ap.add_argument("--w3-lines", type=int, default=200_000)
    ap.add_argument("--w3-lines-slow", type=int, default=20_000, help="W3/W6 lines for execnet")
    ap.add_argument("--w3-lines-rpyc", type=int, default=4_000, help="W3/W6 lines for RPyC (about 1,000 lines/s)")
    ap.add_argument("--w3-reps", type=int, default=3)
    ap.add_argument("--w4-mib", type=int, default=64)
    ap.add_argument("--w4-reps", type=int, default=3, help="W4 repetitions at least (default 3)")
    ap.add_argument("--w4-max-reps", type=int, default=9, help="W4 repetitions at most, while --w4-seconds last (default 9)")
    ap.add_argument("--w4-seconds", type=float, default=4.0, help="W4 keeps repeating past --w4-reps for this long (default 4 s)")
    ap.add_argument("--w5-iters", type=int, default=20)
    ap.add_argument("--w5-pause", type=float, default=0.05, help="seconds between W5 opens, for every peer")
    ap.add_argument("--w6-reps", type=int, default=3)
    ap.add_argument("--w7-sessions", type=int, default=1000)
    ap.add_argument("--w7-connectors", type=int, default=64, help="client threads that open W7's sessions")
    ap.add_argument("--w7-timeout", type=float, default=60.0, help="W7 connect and wait timeout per session (s)")
    ap.add_argument("--w7-runs", type=int, default=3, help="W7 runs (median wall time; peak RSS over all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "latest"), help="results path without suffix (.md and .json)")
    cfg = ap.parse_args(argv)
    cfg.peers = [p for p in cfg.peers.split(",") if p]
    cfg.workloads = [w for w in cfg.workloads.split(",") if w]
    for p in cfg.peers:
        if p not in RUNNERS:
            ap.error(f"unknown peer {p!r}")
    return cfg


def child(cfg) -> None:
    res: dict = {}
    try:
        RUNNERS[cfg.child](cfg, res)
    except Exception as e:  # noqa: BLE001 - the failing workload is reported, the others kept
        import traceback

        traceback.print_exc()
        for w in cfg.workloads:
            res.setdefault(w, {"error": f"{type(e).__name__}: {e}"[:300]})
    res = {w: v for w, v in res.items() if w.split("_")[0] in cfg.workloads}
    Path(cfg.child_out).write_text(json.dumps(res))


def main() -> None:
    cfg = parse()
    if cfg.child:
        child(cfg)
        return
    load_start = loadavg()
    print(f"load average {load_start}; peers {','.join(cfg.peers)}; workloads {','.join(cfg.workloads)}", flush=True)
    res: dict = {}
    t_all = time.perf_counter()
    for peer in cfg.peers:
        t = time.perf_counter()
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        args = [sys.executable, str(Path(__file__)), *sys.argv[1:], "--child", peer, "--child-out", path]
        proc = subprocess.run(args, timeout=600)
        try:
            data = json.loads(Path(path).read_text() or "{}")
        except json.JSONDecodeError:
            data = {}
        os.unlink(path)
        if proc.returncode != 0 or not data:
            data = {w: {"error": f"the {peer} child exited with status {proc.returncode}"} for w in cfg.workloads}
            if peer == "floor":
                data = {}
        res[peer] = data
        print(f"  {peer}: {time.perf_counter() - t:.1f} s  {json.dumps(data)}", flush=True)
    meta = meta_info(cfg, load_start)
    meta["total_s"] = round(time.perf_counter() - t_all, 1)
    md = render(res, meta)
    print()
    print(md)
    print(f"total {meta['total_s']} s")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": res}, indent=1))


if __name__ == "__main__":
    main()

"""The real `pyproxy-server` at the wire level: handshake, attach, limits and
refusals, driven over raw sockets with integration/wire.py (and, for what a
refusal at the door becomes, the real client). Every refusal is checked to
leave an existing, well-behaved session undisturbed."""

from __future__ import annotations

import os
import pickle
import time

import pytest

import pyproxy
import wire
from pyproxy import PyProxySession


@pytest.fixture(autouse=True)
def _close_connections():
    yield
    wire.close_all()


def assert_healthy(s: wire.Session, atom: int) -> None:
    """The session still runs atoms and delivers their output."""
    lines, res = s.run(atom, f"print('alive {atom}'); {atom} * 2")
    assert lines == [(1, f"alive {atom}")]
    assert res.kind == wire.RESULT and res.decoded["ok"], res
    assert pickle.loads(res.decoded["value"]) == atom * 2


def test_handshake_ok_and_first_atom(server):
    s = wire.open_session(server.host, server.port, server.token)
    w = s.welcome
    assert w["session_id"] >= 1
    assert w["backend"] == "subinterp"
    assert w["implementation"] == "cpython"
    assert w["python_version"].count(".") == 2
    assert w["max_frame"] > 0 and w["max_pipelined"] > 0 and w["max_line"] > 0
    lines, res = s.run(1, "import sys\nprint('out')\nprint('err', file=sys.stderr)\n6*7")
    assert lines == [(1, "out"), (2, "err")]
    assert pickle.loads(res.decoded["value"]) == 42
    s.close()


def test_session_ids_are_unique(server):
    sessions = [wire.open_session(server.host, server.port, server.token) for _ in range(5)]
    assert len({s.id for s in sessions}) == 5
    for s in sessions:
        s.close()


def test_session_logs_arrive_as_log_frames(start_server):
    # At debug, so that the per-atom records (debug) come too.
    server = start_server(log_level="debug")
    s = wire.open_session(server.host, server.port, server.token)
    s.main.send(wire.eval_frame(1, "2+2"))
    result = s.main.read_kind(wire.RESULT)
    assert result.decoded["ends_output"], "2+2 prints nothing: its RESULT ends its output"
    logs = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any("atom end" in l["message"] for l in logs):
        try:
            f = s.out.read(0.5)
        except TimeoutError:
            continue
        assert f.kind != wire.END_OF_OUTPUT, "no END_OF_OUTPUT for an atom that wrote nothing"
        if f.kind == wire.LOG:
            logs.append(f.decoded)
    messages = [l["message"] for l in logs]
    assert "client connected" in messages, messages
    assert any("atom end" in m for m in messages), messages
    assert all(l["fields"].get("session") == str(s.id) for l in logs)
    assert server.token not in repr(logs)
    s.close()
    assert server.token not in server.log_text(), "the token never appears in the log"


def test_at_the_default_level_atoms_send_no_log_records(server):
    # Per-atom records are debug: at the default level (info) an atom costs no
    # LOG frame (two per atom halved W2); the session's own records still come.
    s = wire.open_session(server.host, server.port, server.token)
    s.main.send(b"".join(wire.eval_frame(i, "2+2") for i in range(1, 4)))
    assert [s.main.read_kind(wire.RESULT).request_id for _ in range(3)] == [1, 2, 3]
    messages = [f.decoded["message"] for f in s.out.frames_for(1) if f.kind == wire.LOG]
    assert "client connected" in messages, messages
    assert not [m for m in messages if m.startswith("atom")], messages
    s.close()


def test_wrong_token_refused_and_existing_session_undisturbed(server):
    good = wire.open_session(server.host, server.port, server.token)
    c = wire.Conn(server.host, server.port)
    ch = c.read_kind(wire.CHALLENGE)
    assert ch.decoded["auth_required"] is True
    c.send(wire.hello(b"not-the-token", ch.decoded["server_nonce"]))
    err = c.read()
    assert err.kind == wire.ERROR and err.decoded["code"] == wire.AUTH_FAILED, err
    assert c.is_closed()
    assert_healthy(good, 1)
    assert "connection refused" in server.log_text()
    good.close()


def test_replayed_hello_against_a_new_challenge_is_refused(server):
    # Record a valid HELLO for one connection's nonce and replay it on another.
    c1 = wire.Conn(server.host, server.port)
    ch1 = c1.read_kind(wire.CHALLENGE)
    recorded = wire.hello(server.token.encode(), ch1.decoded["server_nonce"])
    c2 = wire.Conn(server.host, server.port)
    ch2 = c2.read_kind(wire.CHALLENGE)
    assert ch1.decoded["server_nonce"] != ch2.decoded["server_nonce"]
    c2.send(recorded)
    err = c2.read()
    assert err.kind == wire.ERROR and err.decoded["code"] == wire.AUTH_FAILED
    assert c2.is_closed()
    # The original connection can still use it.
    c1.send(recorded)
    assert c1.read().kind == wire.WELCOME
    c1.close()


def test_protocol_version_mismatch_refused(server):
    c = wire.Conn(server.host, server.port)
    ch = c.read_kind(wire.CHALLENGE)
    c.send(wire.hello(server.token.encode(), ch.decoded["server_nonce"], version=99))
    err = c.read()
    assert err.kind == wire.ERROR and err.decoded["code"] == wire.VERSION_MISMATCH
    assert "99" in err.decoded["message"]


def test_attach_with_wrong_secret_refused_and_session_undisturbed(server):
    main, welcome = wire.handshake(server.host, server.port, server.token)
    bad = wire.Conn(server.host, server.port)
    bad.read_kind(wire.CHALLENGE)
    bad.send(wire.attach(welcome["session_id"], os.urandom(32)))
    err = bad.read()
    assert err.kind == wire.ERROR and err.decoded["code"] == wire.ATTACH_REFUSED, err
    assert bad.is_closed()
    # The real client can still attach and run atoms.
    out = wire.Conn(server.host, server.port)
    out.read_kind(wire.CHALLENGE)
    out.send(wire.attach(welcome["session_id"], welcome["attach_secret"]))
    out.read_kind(wire.ATTACHED)
    s = wire.Session(main, out, welcome)
    assert_healthy(s, 1)
    # A second attach with the right secret is refused too, and harmless.
    again = wire.Conn(server.host, server.port)
    again.read_kind(wire.CHALLENGE)
    again.send(wire.attach(welcome["session_id"], welcome["attach_secret"]))
    err = again.read()
    assert err.kind == wire.ERROR and err.decoded["code"] == wire.ATTACH_REFUSED
    assert_healthy(s, 2)
    s.close()
    assert "wrong attach secret" in server.log_text()


def test_attach_to_unknown_or_ended_session_refused(server):
    s = wire.open_session(server.host, server.port, server.token)
    sid, secret = s.id, s.welcome["attach_secret"]
    s.close()
    time.sleep(0.3)
    for target in (sid, 10_000_000):
        c = wire.Conn(server.host, server.port)
        c.read_kind(wire.CHALLENGE)
        c.send(wire.attach(target, secret))
        err = c.read()
        assert err.kind == wire.ERROR and err.decoded["code"] == wire.ATTACH_REFUSED


def test_attach_deadline_drops_the_session(start_server):
    server = start_server(attach_timeout=0.5)
    main, welcome = wire.handshake(server.host, server.port, server.token)
    started = time.monotonic()
    err = main.read_kind(wire.ERROR, timeout=5)
    assert err.decoded["code"] == wire.TIMEOUT and "attach" in err.decoded["message"]
    assert main.is_closed(timeout=5), "the main-stream is closed when the attach deadline passes"
    assert time.monotonic() - started < 4
    late = wire.Conn(server.host, server.port)
    late.read_kind(wire.CHALLENGE)
    late.send(wire.attach(welcome["session_id"], welcome["attach_secret"]))
    err = late.read()
    assert err.kind == wire.ERROR and err.decoded["code"] == wire.ATTACH_REFUSED
    assert "did not attach in time" in server.log_text()


def test_atoms_sent_before_attach_lose_no_output(server):
    main, welcome = wire.handshake(server.host, server.port, server.token)
    main.send(wire.eval_frame(1, "for i in range(500): print(i)"))
    time.sleep(0.3)
    out = wire.Conn(server.host, server.port)
    out.read_kind(wire.CHALLENGE)
    out.send(wire.attach(welcome["session_id"], welcome["attach_secret"]))
    out.read_kind(wire.ATTACHED)
    s = wire.Session(main, out, welcome)
    lines, res = s.collect(1)
    assert [l for _, l in lines] == [str(i) for i in range(500)]
    assert res.kind == wire.RESULT
    s.close()


def test_handshake_deadline_closes_idle_connections(start_server):
    server = start_server(handshake_timeout=0.5)
    idle = wire.Conn(server.host, server.port)
    idle.read_kind(wire.CHALLENGE)
    err = idle.read(timeout=5)
    assert err.kind == wire.ERROR and err.decoded["code"] == wire.TIMEOUT
    assert idle.is_closed()
    # A well-behaved client is served meanwhile and afterwards.
    s = wire.open_session(server.host, server.port, server.token)
    assert_healthy(s, 1)
    s.close()


def test_malformed_frame_closes_only_that_connection(server):
    good = wire.open_session(server.host, server.port, server.token)
    bad = wire.open_session(server.host, server.port, server.token)
    # A frame of an unknown kind, then garbage.
    bad.main.send(wire.encode(0x7F, 1, b"junk"))
    err = bad.main.read_kind(wire.ERROR)
    assert err.decoded["code"] == wire.BAD_FRAME
    assert "unknown frame kind" in err.decoded["message"]
    assert bad.main.is_closed()
    assert bad.out.is_closed(), "the session ended: its output-stream closes too"
    assert_healthy(good, 1)
    # A giant length prefix is refused before anything is allocated.
    worse = wire.open_session(server.host, server.port, server.token)
    worse.main.send(b"\xff\xff\xff\xff" + bytes([wire.EVAL]) + bytes(8))
    err = worse.main.read_kind(wire.ERROR)
    assert err.decoded["code"] == wire.BAD_FRAME and "exceeds" in err.decoded["message"]
    assert worse.main.is_closed()
    assert_healthy(good, 2)
    good.close()


def test_garbage_before_the_handshake_is_refused(server):
    c = wire.Conn(server.host, server.port)
    c.read_kind(wire.CHALLENGE)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    err = c.read()
    assert err.kind == wire.ERROR and err.decoded["code"] == wire.BAD_FRAME
    assert c.is_closed()


def test_pickled_function_from_another_python_is_refused_by_version(server):
    main, welcome = wire.handshake(server.host, server.port, server.token, python="3.1.0")
    out = wire.Conn(server.host, server.port)
    out.read_kind(wire.CHALLENGE)
    out.send(wire.attach(welcome["session_id"], welcome["attach_secret"]))
    out.read_kind(wire.ATTACHED)
    s = wire.Session(main, out, welcome)
    lines, res = s.run(1, b"\x80\x05not-really-a-pickle", kind=wire.FUNCTION)
    assert lines == []
    assert res.kind == wire.RESULT and not res.decoded["ok"]
    assert res.decoded["origin"] == wire.ORIGIN_VERSION_MISMATCH
    msg = res.decoded["message"]
    assert "3.1" in msg and welcome["python_version"].rsplit(".", 1)[0] in msg, msg
    # Source always works.
    assert_healthy(s, 2)
    # A refusal answered by the server itself still keeps RESULTs in atom order.
    s.main.send(wire.eval_frame(3, "import time; time.sleep(0.3); 3"))
    s.main.send(wire.eval_frame(4, b"x", kind=wire.CODE))
    order = [s.main.read_kind(wire.RESULT).request_id for _ in range(2)]
    assert order == [3, 4]
    s.close()


def test_too_many_pipelined_atoms_refused_with_limit_exceeded(start_server):
    server = start_server(max_pipelined=2)
    s = wire.open_session(server.host, server.port, server.token)
    for atom in (1, 2, 3):
        s.main.send(wire.eval_frame(atom, "import time; time.sleep(0.5)"))
    err = s.main.read_kind(wire.ERROR)
    assert err.request_id == 3 and err.decoded["code"] == wire.LIMIT_EXCEEDED
    got = {s.main.read_kind(wire.RESULT).request_id for _ in range(2)}
    assert got == {1, 2}
    assert_healthy(s, 4)
    s.close()


def test_max_sessions_refuses_the_next_hello(start_server):
    server = start_server(max_sessions=2)
    a = wire.open_session(server.host, server.port, server.token)
    b = wire.open_session(server.host, server.port, server.token)
    c = wire.Conn(server.host, server.port)
    ch = c.read_kind(wire.CHALLENGE)
    c.send(wire.hello(server.token.encode(), ch.decoded["server_nonce"]))
    err = c.read()
    assert err.kind == wire.ERROR and err.decoded["code"] == wire.LIMIT_EXCEEDED
    a.close()
    time.sleep(0.3)
    d = wire.open_session(server.host, server.port, server.token)
    assert_healthy(d, 1)
    assert_healthy(b, 1)
    b.close()
    d.close()


def test_closing_the_output_stream_ends_the_session(server):
    s = wire.open_session(server.host, server.port, server.token)
    s.out.close()
    assert s.main.is_closed(), "a closed output-stream ends the whole session"
    other = wire.open_session(server.host, server.port, server.token)
    assert_healthy(other, 1)
    other.close()


@pytest.mark.parametrize("with_attach", [True, False], ids=["in-attach-segment", "later"])
def test_a_frame_on_the_output_stream_after_attach_ends_the_session(server, with_attach):
    # The client never sends after ATTACH. Bytes that came in the same segment
    # as ATTACH and bytes that come later take different paths on the server.
    main, welcome = wire.handshake(server.host, server.port, server.token)
    out = wire.Conn(server.host, server.port)
    out.read_kind(wire.CHALLENGE)
    attach = wire.attach(welcome["session_id"], welcome["attach_secret"])
    if with_attach:
        out.send(attach + wire.eval_frame(1, "5"))
        out.read_kind(wire.ATTACHED)
    else:
        out.send(attach)
        out.read_kind(wire.ATTACHED)
        time.sleep(0.1)
        out.send(wire.eval_frame(1, "5"))
    err = out.read_kind(wire.ERROR)
    assert err.decoded["code"] == wire.UNEXPECTED, err
    assert "EVAL on the output-stream" in err.decoded["message"], err
    assert out.is_closed() and main.is_closed(), "the whole session ends"
    other = wire.open_session(server.host, server.port, server.token)
    assert_healthy(other, 1)
    other.close()


def test_a_session_whose_answers_fit_runs_on_two_server_threads(start_server):
    # Owner and output writer. Closes of output-streams are watched by one
    # thread for all sessions, and the main writer starts only when a frame
    # has to queue for it. A fresh server: no pooled idle threads.
    server = start_server()
    time.sleep(0.3)
    baseline = server.threads()
    sessions = [wire.open_session(server.host, server.port, server.token) for _ in range(10)]
    for s in sessions:
        assert_healthy(s, 1)
    grown = server.threads() - baseline
    # Two of slack for a thread the server starts for itself meanwhile; four
    # threads a session (the previous design) would be 40.
    assert grown <= 2 * len(sessions) + 2, f"{grown} more threads for {len(sessions)} sessions"
    for s in sessions:
        s.close()


@pytest.mark.parametrize("n", [20])
def test_session_threads_are_released(server, n):
    warm = wire.open_session(server.host, server.port, server.token)
    assert_healthy(warm, 1)
    warm.close()
    time.sleep(0.5)
    baseline = server.threads()
    for i in range(n):
        s = wire.open_session(server.host, server.port, server.token)
        assert_healthy(s, 1)
        s.close()
    deadline = time.monotonic() + 10
    while server.threads() > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.threads() <= baseline, f"{server.threads()} threads, {baseline} before"


def test_a_client_that_never_reads_output_slows_only_itself(server):
    # A session floods ~200 MB of output and never reads its output-stream.
    flood = wire.open_session(server.host, server.port, server.token)
    flood.main.send(wire.eval_frame(1, "line = 'x' * 999\nfor _ in range(200_000): print(line)"))
    time.sleep(1.0)
    rss_before = server.rss_kb()
    good = wire.open_session(server.host, server.port, server.token)
    started = time.monotonic()
    for atom in range(1, 21):
        assert_healthy(good, atom)
    assert time.monotonic() - started < 10
    time.sleep(1.0)
    grown_mb = (server.rss_kb() - rss_before) / 1024
    assert grown_mb < 64, f"server grew {grown_mb:.0f} MB while a client did not read"
    # A pause longer than the handshake deadline does not kill the slow session:
    # once it reads again, its output resumes where it stopped.
    time.sleep(max(0.0, 7.0 - (time.monotonic() - started)))
    assert not flood.main.is_closed(timeout=0.2)
    first = flood.out.read_kind(wire.OUTPUT)
    assert first.request_id == 1 and first.decoded["data"].startswith(b"x" * 999 + b"\n")
    # Closing the stuck session frees it; the server stays healthy.
    flood.main.close()
    flood.out.close()
    assert_healthy(good, 100)
    good.close()


def test_pipelined_atoms_are_answered_in_order_with_complete_output(server):
    s = wire.open_session(server.host, server.port, server.token)
    n = 1000
    s.main.send(b"".join(wire.eval_frame(i, f"print({i}); {i}") for i in range(1, n + 1)))
    results = [s.main.read_kind(wire.RESULT).request_id for _ in range(n)]
    assert results == list(range(1, n + 1))
    outputs, ends = [], []
    while len(ends) < n:
        f = s.out.read()
        if f.kind == wire.OUTPUT:
            outputs.append((f.request_id, f.decoded["data"]))
        elif f.kind == wire.END_OF_OUTPUT:
            ends.append(f.request_id)
    assert ends == list(range(1, n + 1))
    assert outputs == [(i, f"{i}\n".encode()) for i in range(1, n + 1)]
    s.close()


def test_silent_pipelined_atoms_are_all_answered_in_order(server):
    # Results of silent atoms followed at once by another may be held back and
    # sent together (src/server/session.rs, Held): none may be lost or reordered,
    # including around a cancelled atom, an atom that prints, and a client that
    # does not read for a while (6 MB of results: the socket fills, the rest queues).
    s = wire.open_session(server.host, server.port, server.token)
    n = 3000
    sources = {i: (f"print({i}); {i}, bytes(2000)" if i % 1000 == 0 else f"{i}, bytes(2000)") for i in range(1, n + 1)}
    s.main.send(b"".join(wire.eval_frame(i, src) for i, src in sources.items()) + wire.cancel(n))
    time.sleep(1)
    results = [s.main.read_kind(wire.RESULT) for _ in range(n)]
    assert [r.request_id for r in results] == list(range(1, n + 1))
    for r in results[:-1]:
        assert r.decoded["ok"] and pickle.loads(r.decoded["value"]) == (r.request_id, bytes(2000))
        assert r.decoded["ends_output"] == (r.request_id % 1000 != 0)
    assert_healthy(s, n + 1)
    s.close()


def test_a_held_result_does_not_wait_for_a_slow_next_atom(server):
    # Atom 2 is queued when atom 1 finishes, so atom 1's RESULT may be held to
    # leave with atom 2's; while atom 2 runs, the pump sends it within its tick.
    s = wire.open_session(server.host, server.port, server.token)
    s.main.send(wire.eval_frame(1, "import time; time.sleep(0.3); 1") + wire.eval_frame(2, "import time; time.sleep(5); 2"))
    start = time.monotonic()
    first = s.main.read_kind(wire.RESULT, timeout=10)
    waited = time.monotonic() - start
    assert first.request_id == 1 and first.decoded["ok"]
    assert waited < 3, f"atom 1's RESULT waited {waited:.1f} s, for atom 2 to finish"
    second = s.main.read_kind(wire.RESULT, timeout=10)
    assert second.request_id == 2 and time.monotonic() - start >= 5
    s.close()


@pytest.mark.parametrize("backend", ["subinterp", "fork"])
def test_end_of_output_comes_only_for_atoms_that_wrote_output(server, backend):
    # An atom that wrote nothing has its output ended by its RESULT (flag
    # ENDS_OUTPUT) and gets no END_OF_OUTPUT; one that wrote gets both.
    s = wire.open_session(server.host, server.port, server.token, backend=backend)
    sources = ["print('a'); 1", "2", "import sys; sys.stderr.write('e'); 3", "4", "1/0"]
    s.main.send(b"".join(wire.eval_frame(i, src) for i, src in enumerate(sources, 1)))
    results = [s.main.read_kind(wire.RESULT) for _ in sources]
    assert [r.request_id for r in results] == [1, 2, 3, 4, 5]
    assert [r.decoded["ends_output"] for r in results] == [False, True, False, True, True]
    ends = [f.request_id for f in s.out.frames_for(2) if f.kind == wire.END_OF_OUTPUT]
    assert ends == [1, 3]
    s.close()


@pytest.mark.parametrize("backend", ["subinterp", "fork"])
def test_a_queued_atom_cancelled_while_another_prints_gets_no_end_of_output(server, backend):
    # Atom 2's RESULT is decided while atom 1 runs and writes: the choice of
    # ENDS_OUTPUT is per atom, not "did the session write lately".
    s = wire.open_session(server.host, server.port, server.token, backend=backend)
    slow = "import time\nprint('a', flush=True)\ntime.sleep(2)\nprint('b')\n1"
    s.main.send(wire.eval_frame(1, slow) + wire.eval_frame(2, "2"))
    f = s.out.read_kind(wire.OUTPUT)
    assert (f.request_id, f.decoded["data"]) == (1, b"a\n")
    s.main.send(wire.cancel(2))
    r1, r2 = s.main.read_kind(wire.RESULT), s.main.read_kind(wire.RESULT)
    assert (r1.request_id, r1.decoded["ok"], r1.decoded["ends_output"]) == (1, True, False)
    assert (r2.request_id, r2.decoded["ok"], r2.decoded["ends_output"]) == (2, False, True)
    assert r2.decoded["origin"] == 2, "CANCELLED"
    seen = [(f.name, f.request_id) for f in s.out.frames_for(1.5) if f.kind in (wire.OUTPUT, wire.END_OF_OUTPUT)]
    assert seen == [("OUTPUT", 1), ("END_OF_OUTPUT", 1)], seen
    s.close()


def test_fifty_parallel_sessions_each_get_only_their_own_output(server):
    import threading

    sessions = [wire.open_session(server.host, server.port, server.token) for _ in range(50)]
    failures = []

    def work(k: int, s: wire.Session) -> None:
        try:
            lines, res = s.run(1, f"for i in range(200): print('s{k}', i)\n{k}", timeout=60)
            assert lines == [(1, f"s{k} {i}") for i in range(200)], f"session {k} got foreign or missing output"
            assert pickle.loads(res.decoded["value"]) == k
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append((k, e))

    threads = [threading.Thread(target=work, args=(k, s)) for k, s in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not failures, failures[:3]
    for s in sessions:
        s.close()


def test_a_session_closed_mid_atom_leaves_the_server_healthy(server):
    s = wire.open_session(server.host, server.port, server.token)
    s.main.send(wire.eval_frame(1, "import time\nprint('running', flush=True)\ntime.sleep(30)"))
    s.out.read_kind(wire.OUTPUT)
    s.main.close()
    s.out.close()
    other = wire.open_session(server.host, server.port, server.token)
    started = time.monotonic()
    assert_healthy(other, 1)
    assert time.monotonic() - started < 5, "the interrupted atom does not hold the server"
    other.close()
    # Either stream's close may be noticed first; both end the session.
    deadline = time.monotonic() + 10
    while "stream closed by the client" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "stream closed by the client" in server.log_text()


def test_connections_per_peer_are_limited(start_server):
    server = start_server(max_conns_per_peer=3)
    held = [wire.Conn(server.host, server.port) for _ in range(3)]
    for c in held:
        c.read_kind(wire.CHALLENGE)
    extra = wire.Conn(server.host, server.port)
    err = extra.read()
    assert err.kind == wire.ERROR and err.decoded["code"] == wire.LIMIT_EXCEEDED
    assert extra.is_closed()
    held.pop().close()
    time.sleep(0.2)
    # The freed slot serves a whole session (two connections: one more slot freed first).
    held.pop().close()
    time.sleep(0.2)
    s = wire.open_session(server.host, server.port, server.token)
    assert_healthy(s, 1)
    s.close()


def connects_within(server, seconds: float) -> bool:
    """A client session opens before `seconds` pass (slots freed by closes come back)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with PyProxySession(server.address, token=server.token) as s:
                return s.eval("6 * 7").result(timeout=10) == 42
        except pyproxy.SessionRefused:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def test_client_refused_at_the_per_peer_limit_gets_the_servers_reason(start_server):
    # The server answers a connection over --max-conns-per-peer with ERROR in
    # place of CHALLENGE; the client says so, with the server's own words.
    server = start_server(max_conns_per_peer=3)
    with PyProxySession(server.address, token=server.token) as held:  # two connections
        third = wire.Conn(server.host, server.port)
        third.read_kind(wire.CHALLENGE)  # the server took it: the limit is reached
        with pytest.raises(pyproxy.SessionRefused, match="max-conns-per-peer") as e:
            PyProxySession(server.address, token=server.token).connect()
        assert str(e.value) == (
            f"the server at {server.address} refused the connection (LIMIT_EXCEEDED): "
            f"too many connections from your address (--max-conns-per-peer)"
        )
        assert held.eval("6 * 7").result(timeout=10) == 42, "the held session is undisturbed"
        third.close()
    assert connects_within(server, 10), "the refused client left no slot taken"


def test_client_whose_output_stream_is_over_the_per_peer_limit_is_refused(start_server):
    # Two slots held: main-stream takes the third and completes its handshake,
    # output-stream (connected right after it) is the fourth and is refused.
    server = start_server(max_conns_per_peer=3)
    held = [wire.Conn(server.host, server.port) for _ in range(2)]
    for c in held:
        c.read_kind(wire.CHALLENGE)
    with pytest.raises(pyproxy.SessionRefused, match="max-conns-per-peer") as e:
        PyProxySession(server.address, token=server.token).connect()
    assert str(e.value) == (
        f"the server at {server.address} refused the output-stream connection "
        f"(LIMIT_EXCEEDED): too many connections from your address (--max-conns-per-peer)"
    )
    for c in held:
        c.close()
    assert connects_within(server, 10), "the refused client left no slot taken"


def test_many_idle_connections_do_not_stop_a_good_client(start_server):
    server = start_server(handshake_timeout=2)
    idle = [wire.Conn(server.host, server.port) for _ in range(500)]  # issue 6: 500 idle connections
    started = time.monotonic()
    s = wire.open_session(server.host, server.port, server.token)
    assert_healthy(s, 1)
    assert time.monotonic() - started < 2
    # The idle ones are closed at the handshake deadline, and the server is still fine.
    assert all(c.is_closed(timeout=6) for c in idle[:10])
    assert_healthy(s, 2)
    s.close()

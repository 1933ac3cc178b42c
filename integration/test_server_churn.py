"""Session churn through the real client and server (issue 3): 5,000 sessions
opened, used and closed one after another must leave the server's memory level,
and nothing one session sets may be visible to the next."""

from __future__ import annotations

import re
import time

from pyproxy import PyProxySession


def test_five_thousand_sessions_in_turn_leave_rss_level(start_server):
    # Fixed sizes so the interpreter cap below (2 x warm pool + executors) holds anywhere.
    server = start_server(executors=2, warm_pool=2)

    def cycle(i: int) -> None:
        with PyProxySession(server.address, token=server.token).connect() as s:
            # Leave as much behind as an atom can: a module imported, a module attribute,
            # a builtin, sys.path; the interpreter is reset before the next session gets it.
            f = s.eval(
                "import json, fractions, builtins, sys\n"
                f"json.leak = {i}\nbuiltins.leaked_{i % 7} = 1\nsys.path.append('/leak')\n"
                "print('ok')\n"
                "hasattr(json, 'leak') and json.leak != " + str(i)
            )
            assert f.wait(30) is False, "a previous session's module attribute was visible"
            assert list(s.output(f, timeout=30)) == [(1, "ok")]

    started = time.monotonic()
    rss_mb = {}
    for i in range(5000):
        cycle(i)
        if (i + 1) % 1000 == 0:
            rss_mb[i + 1] = server.rss_kb() / 1024
    elapsed = time.monotonic() - started
    print(f"5000 sessions in {elapsed:.1f}s; RSS by sessions: " + ", ".join(f"{n}: {mb:.1f} MB" for n, mb in rss_mb.items()))
    # What bounds memory is reuse: sessions share a few interpreters, reset between
    # sessions, instead of one destroyed per session (which leaks 1.6-4.8 MB each, so
    # gigabytes here). The pool may grow by an interpreter (~7 MB) when sessions
    # overlap under load, up to its cap, so RSS moves in steps to a plateau; a steady
    # leak of even 10 KB a session would still exceed the bound below.
    interps = set(re.findall(r"session opened.*?interp: (\d+)", server.log_text()))
    assert 1 <= len(interps) <= 6, f"{len(interps)} interpreters served 5,000 sessions"
    assert rss_mb[5000] - rss_mb[1000] < 40, rss_mb
    with PyProxySession(server.address, token=server.token).connect() as s:
        assert s.eval("import sys, builtins; ('/leak' in sys.path, any(n.startswith('leaked_') for n in dir(builtins)))").wait(10) == (False, False)

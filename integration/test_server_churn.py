"""Session churn through the real client and server (issue 3): 5,000 sessions
opened, used and closed one after another must leave the server's memory level,
and nothing one session sets may be visible to the next."""

from __future__ import annotations

import time

from pyproxy import PyProxySession


def test_five_thousand_sessions_in_turn_leave_rss_level(server):
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
    for i in range(1000):
        cycle(i)
    rss_1000 = server.rss_kb()
    for i in range(1000, 5000):
        cycle(i)
    rss_5000 = server.rss_kb()
    elapsed = time.monotonic() - started
    grown_mb = (rss_5000 - rss_1000) / 1024
    print(f"5000 sessions in {elapsed:.1f}s; RSS {rss_1000 / 1024:.1f} MB after 1000, {rss_5000 / 1024:.1f} MB after 5000")
    assert grown_mb < 8, f"RSS grew {grown_mb:.1f} MB between session 1,000 and 5,000"
    with PyProxySession(server.address, token=server.token).connect() as s:
        assert s.eval("import sys, builtins; ('/leak' in sys.path, any(n.startswith('leaked_') for n in dir(builtins)))").wait(10) == (False, False)

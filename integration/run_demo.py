"""`make demo`: start pyproxy-server on localhost, run the concept example against it, stop it.

Exits with the example's exit code; the server is always stopped.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--server", required=True, help="path of the pyproxy-server binary")
    ap.add_argument("--python-env", required=True, help="virtual environment for the server's interpreters")
    ap.add_argument("--port", type=int, default=9000)
    args = ap.parse_args()

    cmd = [args.server, "--listen", f"127.0.0.1:{args.port}", "--python-env", args.python_env]
    print("$", " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not re.search(r"listening on", line):
            print(f"pyproxy-server did not start (exit code {server.poll()}); see its log above", file=sys.stderr)
            return 1
        print(line.strip(), flush=True)
        print("$ python integration/concept_example.py", flush=True)
        started = time.monotonic()
        rc = subprocess.call([sys.executable, str(HERE / "concept_example.py")])
        print(f"(example finished in {time.monotonic() - started:.2f} s, exit code {rc})", flush=True)
        return rc
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        print(f"pyproxy-server stopped (exit code {server.returncode})", flush=True)


if __name__ == "__main__":
    sys.exit(main())

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
    log_path = Path(args.server).resolve().parent / "demo-server.log"
    print("$", " ".join(cmd), f"2> {log_path}", flush=True)
    log = open(log_path, "wb")
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = server.stdout.readline()
        if not re.search(r"listening on", line):
            server.wait(5)
            print(f"pyproxy-server did not start (exit code {server.poll()}):", file=sys.stderr)
            print(log_path.read_text(errors="replace"), file=sys.stderr)
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
        log.close()
        print(f"pyproxy-server stopped (exit code {server.returncode}); its log: {log_path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

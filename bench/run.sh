#!/usr/bin/env bash
# PyProxy's benchmark against its peers: the one command (issue 7).
#
#   bench/run.sh [run.py flags]     e.g. bench/run.sh --peers pyproxy,floor --workloads w1,w2
#
# Does its own set-up: builds the server and the client wheel of the current tree
# (`make build`; BENCH_NO_BUILD=1 skips it if both exist), the Rust floor binary,
# makes bench/.venv with the same Python as .venv, installs
# the pinned peers (bench/requirements.txt) and the current client wheel, then
# runs bench/run.py, which prints the table and writes bench/results/latest.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BENCH=$ROOT/bench
VENV=$BENCH/.venv
export PYO3_PYTHON=$ROOT/.venv/bin/python

if [ "${BENCH_NO_BUILD:-}" != 1 ] || [ ! -x target/release/pyproxy-server ] || ! ls target/wheels/pyproxy-*.whl >/dev/null 2>&1; then
  make build
fi
cargo build --quiet --release -p pyproxy-bench

if [ ! -x "$VENV/bin/python" ]; then
  base=$("$ROOT/.venv/bin/python" -c 'import sys; print(sys._base_executable)')
  "$base" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
stamp=$VENV/.requirements
if ! cmp -s "$BENCH/requirements.txt" "$stamp"; then
  "$VENV/bin/python" -m pip install --quiet -r "$BENCH/requirements.txt"
  cp "$BENCH/requirements.txt" "$stamp"
fi
# The client wheel of the current build, every run (it is cheap and never stale).
"$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps target/wheels/pyproxy-*.whl

exec "$VENV/bin/python" "$BENCH/run.py" "$@"

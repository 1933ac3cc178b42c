# PyProxy's one entry point for tasks. CI runs `make test`; a local run is CI's run.
#
#   make demo    build everything, start a server on 127.0.0.1:9000, run the concept example, stop it
#   make test    build, lint, run the Rust tests and the Python integration tests
#   make build   leaves target/release/pyproxy-server and .venv/bin/python with `import pyproxy`

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# Overridable so one Makefile builds and tests against 3.13 and 3.12 side by side
# (`make test` does both): each Python gets its own venv and cargo target directory.
PY_VERSIONS ?= 3.13 3.12
VENV        ?= .venv
TARGET_DIR  ?= target
VPY         := $(VENV)/bin/python
SERVER      := $(TARGET_DIR)/release/pyproxy-server
WHEEL_DIR   := $(TARGET_DIR)/wheels
DEMO_PORT   ?= 9000
PYTEST_ARGS ?=
export CARGO_TARGET_DIR = $(abspath $(TARGET_DIR))

# The first Python of PY_VERSIONS we can find (>= 3.12; see .python-version).
# Looked up lazily so targets that need no Python never fail for want of one.
find_python = $(shell \
	for v in $(PY_VERSIONS); do \
	  for c in "$$(command -v pyenv >/dev/null 2>&1 && pyenv prefix $$v 2>/dev/null | head -n1)/bin/python$$v" \
	           "$$(command -v python$$v 2>/dev/null)" \
	           $$(ls -d $$HOME/.pyenv/versions/$$v*/bin/python$$v /usr/local/bin/python$$v /usr/bin/python$$v 2>/dev/null); do \
	    if [ -x "$$c" ] && "$$c" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then echo "$$c"; exit 0; fi; \
	  done; \
	done)

# Server and client venv use the same Python: the server links the venv's libpython.
export PYO3_PYTHON = $(abspath $(VPY))

.PHONY: help venv build server client demo test test-rust test-python test-py312 print-python lint fmt fuzz bench clean

help:
	@echo "make demo   - build, start pyproxy-server on 127.0.0.1:$(DEMO_PORT), run the concept example, stop"
	@echo "make test   - build, lint and run every test (Rust and Python integration)"
	@echo "make build  - build target/release/pyproxy-server and install the client into .venv"
	@echo "make fuzz   - fuzz the frame decoder and the handshake, FUZZ_SECONDS each (default 300)"
	@echo "make bench  - PyProxy against its peers on this machine (bench/results/latest.md)"
	@echo "make clean  - remove build outputs and the venvs"

$(VPY):
	@py="$(find_python)"; \
	if [ -z "$$py" ]; then \
	  echo "error: PyProxy needs Python $(PY_VERSIONS) (own-GIL sub-interpreters); none was found." >&2; \
	  echo "       Install one, e.g. 'pyenv install 3.13' or 'apt-get install python3.13 python3.13-venv'," >&2; \
	  echo "       and run make again." >&2; \
	  exit 1; \
	fi; \
	echo "Creating $(VENV) with $$py"; \
	"$$py" -m venv $(VENV)

VENV_STAMP := $(VENV)/.requirements-installed
$(VENV_STAMP): $(VPY) integration/requirements.txt
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r integration/requirements.txt
	touch $@

venv: $(VENV_STAMP)

server: $(VENV_STAMP)
	cargo build --release --bin pyproxy-server

client: $(VENV_STAMP)
	rm -rf $(WHEEL_DIR)
	$(VENV)/bin/maturin build --quiet --release -m pyclient/Cargo.toml -i $(VPY) -o $(WHEEL_DIR)
	$(VPY) -m pip install --quiet --force-reinstall --no-deps $(WHEEL_DIR)/pyproxy-*.whl

build: server client
	@$(VPY) -c 'import pyproxy, sys; print("pyproxy client ready in", sys.prefix)'
	@ls -l $(SERVER)

demo: build
	@$(VPY) integration/run_demo.py --server $(SERVER) --python-env $(VENV) --port $(DEMO_PORT)

fmt:
	cargo fmt --all

lint: $(VENV_STAMP)
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test-rust: $(VENV_STAMP)
	ENGINE_TEST_VENV=$(abspath $(VENV)) cargo test --workspace

test-python: build
	PYPROXY_SERVER=$(abspath $(SERVER)) PYPROXY_PYTHON_ENV=$(abspath $(VENV)) \
	  $(VPY) -m pytest integration $(PYTEST_ARGS)

# The same Rust and integration tests against Python 3.12, in .venv-py3.12 and target/py3.12.
# Skipped, loudly, where no 3.12 is installed.
test-py312:
	@if [ -z "$$($(MAKE) --no-print-directory -s PY_VERSIONS=3.12 VENV=.venv-py3.12 print-python)" ]; then \
	  echo "WARNING: Python 3.12 not found: the 3.12 test run is skipped"; \
	else \
	  $(MAKE) --no-print-directory PY_VERSIONS=3.12 VENV=.venv-py3.12 TARGET_DIR=target/py3.12 test-rust test-python; \
	fi

print-python:
	@echo "$(find_python)"

test: lint test-rust test-python test-py312

# cargo fuzz needs nightly-only flags (sanitizers); RUSTC_BOOTSTRAP lets the one stable
# toolchain on these machines accept them. New inputs go to target/fuzz-corpus; the small,
# minimised corpus under integration/fuzz/corpus stays as committed.
FUZZ_SECONDS ?= 300
FUZZ_TARGETS := frame_decoder handshake
fuzz: $(VENV_STAMP)
	command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/fuzz-corpus/$$t; \
	  RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir integration/fuzz -O $$t \
	    target/fuzz-corpus/$$t integration/fuzz/corpus/$$t -- -max_total_time=$(FUZZ_SECONDS); \
	done

# PyProxy against ProcessPoolExecutor, RPyC, execnet, Jupyter, Dask and Pyro5, side by
# side in one run; bench/run.sh sets up its own venv (bench/.venv) with the peers.
bench: build
	BENCH_NO_BUILD=1 bench/run.sh $(BENCH_ARGS)

clean:
	cargo clean
	rm -rf .venv .venv-py3.12 target

"""The type stub `pyproxy/_native.pyi` matches the built extension, and the package type-checks.

Needs mypy in the venv (integration/requirements.txt installs it).
"""

from __future__ import annotations

import subprocess
import sys

import mypy  # noqa: F401  (fail loudly, not skip, where the venv lacks it)


def test_stub_matches_the_built_module(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "pyproxy._native"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_package_type_checks_strictly(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), "-p", "pyproxy"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr

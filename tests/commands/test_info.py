"""`python -m tca info` runs in a fresh process and lists the reference backend with its status."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import ROOT

SRC = str(ROOT / "src")


def test_info_lists_the_reference_backend():
    env = dict(os.environ, PYTHONPATH=SRC)
    result = subprocess.run(
        [sys.executable, "-m", "tca", "info"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("tca ") and "torch" in out
    reference_line = next(line for line in out.splitlines() if line.strip().startswith("reference "))
    assert "available" in reference_line and "unavailable" not in reference_line
    assert "backends" in out


def test_unknown_command_fails_in_one_line_naming_the_commands():
    env = dict(os.environ, PYTHONPATH=SRC)
    result = subprocess.run(
        [sys.executable, "-m", "tca", "no-such-command"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr and "info" in result.stderr and "--help" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr

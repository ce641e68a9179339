"""benchmarks/gpu_checks.sh without a GPU: it parses, names only files that exist, refuses to run without $OUT, and
runs only the steps asked for."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_checks.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_it_parses_and_names_files_that_exist():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    named = set(re.findall(r"(?:benchmarks|tests)/[\w/]+\.py", SCRIPT.read_text()))
    assert named and all((ROOT / path).exists() for path in named)


def test_it_needs_an_output_folder():
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "set OUT" in done.stderr


def test_steps_not_asked_for_do_not_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), STEPS="none")
    subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert not any(p.suffix == ".log" for p in tmp_path.iterdir())  # no step wrote its log
    assert (tmp_path / "device.txt").exists()

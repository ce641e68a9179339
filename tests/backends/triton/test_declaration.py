"""The triton backend's declaration: lazy (no triton import), honest reasons.

Runs in the plain CPU suite (no marker): it never launches a kernel.
"""

from __future__ import annotations

import subprocess
import sys

import torch

from tca.backends import registry
from tca.backends import triton as triton_spec


def test_import_tca_does_not_import_triton():
    code = "import sys, tca; tca.available_backends(); print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cpu_without_interpreter_says_how_to_enable_it(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reasons = triton_spec._environment()
    assert reasons and "TRITON_INTERPRET=1" in reasons[0]


def test_missing_triton_gives_install_hint(monkeypatch):
    spec = registry.get("triton")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "triton" else object())
    reasons = spec.environment_reasons()
    assert any('pip install "tca[triton]"' in r for r in reasons)


def test_interpreter_is_fp32_only_on_cpu():
    spec = registry.get("triton")
    if "cpu" in spec.devices and not torch.cuda.is_available():
        assert spec.input_reasons(torch.device("cpu"), torch.bfloat16, 64)  # bf16 is wrong in the interpreter
        assert not spec.input_reasons(torch.device("cpu"), torch.float32, 64)
    else:
        assert spec.input_reasons(torch.device("cpu"), torch.float32, 64)  # no interpreter: CUDA only


def test_interpret_switch_is_read_as_triton_reads_it(monkeypatch):
    from tca.backends.common.environment import triton_interpret

    for value, expected in (("1", True), ("true", True), ("On", True), ("0", False), ("", False), ("no", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert triton_interpret() is expected, value
    monkeypatch.delenv("TRITON_INTERPRET")
    assert triton_interpret() is False

"""The flash backend's registry record: precise reasons when it cannot run, and no flash import to find out.

Fake FlashAttention packages are written to a temporary folder put first on sys.path; their __init__ raises,
so any import of them (rather than a look on disk) fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import tca
from tca.backends import flash, registry, routing
from tca.backends.flash import generations
from tca.backends.registry import BackendUnavailableError

BOOBY_TRAP = "raise ImportError('tca imported a FlashAttention package while only looking for it')\n"


def fake_packages(root, *generation_names):
    """Write packages that look like the given generations but explode when imported."""
    for g in generation_names:
        if g == "fa2":
            (root / "flash_attn").mkdir(exist_ok=True)
            (root / "flash_attn" / "__init__.py").write_text(BOOBY_TRAP)
        elif g == "fa4":  # FA4 ships the namespace flash_attn (no __init__) with a cute sub-package
            (root / "flash_attn" / "cute").mkdir(parents=True, exist_ok=True)
            (root / "flash_attn" / "cute" / "__init__.py").write_text(BOOBY_TRAP)
        elif g == "fa3":
            (root / "flash_attn_interface.py").write_text(BOOBY_TRAP)
    return root


@pytest.fixture
def no_real_flash(monkeypatch, tmp_path):
    """Hide any real FlashAttention install: only the fakes written under tmp_path are visible."""
    if any(flash._module_on_disk(m) for m in ("flash_attn", "flash_attn.cute", "flash_attn_interface")):
        pytest.skip("a real FlashAttention package is installed; these tests need a machine without one")
    monkeypatch.delenv(flash.GENERATION_ENV, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_reasons_without_any_package_name_every_generation_and_how_to_install(no_real_flash):
    reasons = registry.get("flash").environment_reasons()
    assert len(reasons) == 1
    for module, hint, _ in flash.GENERATIONS.values():
        assert module in reasons[0] and hint in reasons[0]


@pytest.mark.parametrize(
    "present,chosen",
    [(("fa4",), "fa4"), (("fa3",), "fa3"), (("fa2",), "fa2"), (("fa2", "fa4"), "fa4"), (("fa2", "fa3"), "fa3")],
)
def test_generation_found_on_disk_without_importing_it(no_real_flash, present, chosen):
    fake_packages(no_real_flash, *present)
    assert set(flash.installed_generations()) == set(present)
    assert flash.chosen_generation() == chosen
    assert not [m for m in sys.modules if m.startswith("flash_attn")]


def test_generation_can_be_forced_and_a_missing_one_is_explained(no_real_flash, monkeypatch):
    fake_packages(no_real_flash, "fa2", "fa4")
    monkeypatch.setenv(flash.GENERATION_ENV, "fa2")
    assert flash.chosen_generation() == "fa2"
    monkeypatch.setenv(flash.GENERATION_ENV, "fa3")
    (reason,) = flash.environment_reasons()
    assert "flash_attn_interface" in reason and "hopper" in reason
    monkeypatch.setenv(flash.GENERATION_ENV, "fa9")
    (reason,) = flash.environment_reasons()
    assert "fa9" in reason and "fa4" in reason


def test_input_reasons_name_device_dtype_and_head_dim():
    reasons = registry.get("flash").input_reasons(torch.device("cpu"), torch.float32, 72)
    text = "; ".join(reasons)
    assert "device 'cpu'" in text and "cuda" in text
    assert "dtype float32" in text and "bfloat16" in text
    assert "head dim 72" in text
    assert registry.get("flash").input_reasons(torch.device("cuda"), torch.bfloat16, 128) == []


def test_named_flash_backend_on_cpu_raises_with_its_reasons():
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(BackendUnavailableError, match="backend 'flash' cannot run here: .*device 'cpu'"):
        tca.attention(q, q, q, backend="flash")


def test_auto_never_picks_flash_on_cpu():
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    assert routing.resolve("auto", q.device, q.dtype, 64).name != "flash"


def test_generation_specific_head_dim_is_refused_with_the_generation_named():
    (head_dim,) = generations.input_reasons("fa3", torch.bfloat16, 80, (9, 0))
    assert re.search("FA3.*head dims 64, 96, 128, 192, 256, got 80", head_dim)
    (dtype,) = generations.input_reasons("fa3", torch.float32, 64, (9, 0))
    assert "dtype float32 is not supported by FA3" in dtype
    assert generations.input_reasons("fa3", torch.bfloat16, 128, (9, 0)) == []


def test_import_tca_and_report_never_import_flash(tmp_path):
    """With booby-trapped packages of every generation on the path, `import tca` and the registry report work."""
    fake_packages(tmp_path, "fa2", "fa3")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    code = (
        "import sys, tca\n"
        "rows = {r['name']: r for r in tca.backends.registry.report()}\n"
        "reasons = rows['flash']['reasons']\n"
        "assert reasons == [] or 'capability' in reasons[0] or 'none of its devices' in reasons[0], rows['flash']\n"
        "assert not [m for m in sys.modules if m.startswith('flash_attn')], 'flash imported'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr

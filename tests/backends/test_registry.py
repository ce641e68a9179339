"""The backend registry: declared support, reasons, "auto" choice (warned once), lazy optional imports.

Fake `Backend` records are registered for a test and always removed afterwards (fixture `fake_backend`).
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import tca
from helpers import ROOT, make_qkv
from tca.backends import registry, routing
from tca.backends.registry import Backend

CFG = tca.TCAConfig(block_size=16, window=32)
SRC = str(ROOT / "src")


@pytest.fixture
def fake_backend():
    """Register Backend records for one test; remove them (and restore any replaced one) afterwards."""
    added, replaced = [], {}

    def add(**fields) -> Backend:
        fields.setdefault("summary", "a fake backend for tests")
        fields.setdefault("implementation", "tca.reference:ReferenceBackend")
        fields.setdefault("devices", ("cpu",))
        fields.setdefault("dtypes", (torch.float32, torch.float64))
        backend = Backend(**fields)
        if backend.name in registry._REGISTRY:
            replaced[backend.name] = registry._REGISTRY[backend.name]
        added.append(backend.name)
        return registry.register(backend)

    try:
        yield add
    finally:
        for name in added:
            registry.unregister(name)
        for backend in replaced.values():
            registry.register(backend)


@pytest.fixture
def fresh_announcements(monkeypatch):
    """Forget which "auto" choices were already announced, so this test sees the first announcement."""
    monkeypatch.setattr(routing, "_ANNOUNCED", set())


def inputs(dtype=torch.float64, D=16):
    return make_qkv(1, 2, 1, 40, D, dtype=dtype, seed=0)


def test_reference_is_registered_and_available():
    assert "reference" in registry.names()
    assert "reference" in tca.available_backends()
    row = next(r for r in registry.report() if r["name"] == "reference")
    assert row["usable"] and row["reasons"] == [] and row["decode"]


def test_explicit_backend_that_cannot_run_lists_its_reasons(fake_backend):
    fake_backend(
        name="fake-gpu",
        devices=("cuda",),
        dtypes=(torch.float16,),
        head_dims=(128,),
        requires=(("tca_no_such_module_xyz", "pip install xyz"),),
    )
    with pytest.raises(tca.BackendUnavailableError) as info:
        tca.attention(*inputs(), config=CFG, backend="fake-gpu")
    message = str(info.value)
    assert "backend 'fake-gpu' cannot run here" in message
    assert "package 'tca_no_such_module_xyz' is not installed (pip install xyz)" in message
    assert "device 'cpu' is not supported (supports cuda)" in message
    assert "dtype float64 is not supported (supports float16)" in message
    assert "head dim 16 is not supported (supports 128)" in message
    assert isinstance(info.value, RuntimeError)


def test_environment_reasons_are_reported(fake_backend):
    fake_backend(name="fake-env", environment=lambda: ["needs a GPU of compute capability 9.0"])
    with pytest.raises(tca.BackendUnavailableError, match="needs a GPU of compute capability 9.0"):
        tca.attention(*inputs(), config=CFG, backend="fake-env")
    row = next(r for r in registry.report() if r["name"] == "fake-env")
    assert not row["usable"] and row["reasons"] == ["needs a GPU of compute capability 9.0"]
    assert "fake-env" not in tca.available_backends()


def test_backend_without_decode_cannot_prefill(fake_backend):
    fake_backend(name="fake-nodecode", lacks=(("decode", "a test backend"),))
    q, k, v = inputs()
    assert torch.isfinite(tca.attention(q, k, v, config=CFG, backend="fake-nodecode")).all()
    with pytest.raises(tca.BackendUnavailableError, match=r"stateful decoding is not implemented \(a test backend\)"):
        tca.prefill(q, k, v, config=CFG, backend="fake-nodecode")


def test_unknown_name_lists_the_known_ones(fake_backend):
    fake_backend(name="fake-listed")
    with pytest.raises(ValueError, match=r"unknown backend 'nope'; known backends: .*fake-listed.*\(or 'auto'\)"):
        tca.attention(*inputs(), config=CFG, backend="nope")


def test_auto_prefers_the_highest_priority_usable_backend(fake_backend, fresh_announcements):
    fake_backend(name="fake-best", priority=10_000)
    fake_backend(name="fake-broken", priority=20_000, environment=lambda: ["broken on purpose"])
    assert registry.names()[:2] == ["fake-broken", "fake-best"]
    chosen = routing.resolve("auto", "cpu", torch.float64, 16)
    assert chosen.name == "fake-best"
    assert tca.available_backends()[0] == "fake-best"


def test_auto_warns_once_which_backend_it_chose(fresh_announcements):
    q, k, v = inputs()
    chosen = next(n for n in registry.names() if not registry.get(n).reasons(q.device, q.dtype, q.shape[-1]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tca.attention(q, k, v, config=CFG)
        tca.attention(q, k, v, config=CFG)
        tca.attention(q, k, v, config=CFG, backend="reference")  # an explicit choice says nothing
    choice = [w for w in caught if issubclass(w.category, tca.BackendChoiceWarning)]
    assert len(choice) == 1
    assert f"backend='auto' chose {chosen!r}" in str(choice[0].message)


def test_auto_with_no_usable_backend_lists_every_reason(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {})
    registry.register(Backend("only-gpu", "fake", "x:y", devices=("cuda",), dtypes=(torch.float16,)))
    with pytest.raises(tca.BackendUnavailableError, match=r"no backend can run these inputs:\n  only-gpu: device"):
        routing.resolve("auto", "cpu", torch.float32, 64)


def test_report_for_given_inputs(fake_backend):
    fake_backend(name="fake-hd", head_dims=(64, 128))
    row = next(r for r in registry.report("cpu", torch.float32, 96) if r["name"] == "fake-hd")
    assert row["reasons"] == ["head dim 96 is not supported (supports 64, 128)"]
    assert row["head_dims"] == [64, 128]


def test_implementation_is_loaded_lazily(fake_backend):
    # Registering a record imports nothing; only load() does (and fails clearly for a missing module).
    fake_backend(name="fake-lazy", implementation="tca_no_such_module_xyz.impl:Impl")
    with pytest.raises(ModuleNotFoundError):
        registry.get("fake-lazy").load()


def test_import_tca_imports_no_optional_package():
    code = (
        "import sys, warnings; warnings.simplefilter('error'); import tca; "
        "print(sorted(m for m in ('triton', 'flash_attn', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": SRC, "PATH": ""}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_backend_for_absent_devices_is_not_available(fake_backend):
    fake_backend(name="fake_accel_only", devices=("fake_accel",))
    rows = {row["name"]: row for row in registry.report()}
    assert "fake_accel_only" not in tca.available_backends()
    assert any("none of its devices" in r for r in rows["fake_accel_only"]["reasons"])
    assert "reference" in tca.available_backends()


def test_resolve_probes_the_environment_once_per_key(fake_backend):
    probes = []
    fake_backend(name="fake-probed", environment=lambda: probes.append(1) or [])
    for _ in range(3):
        assert routing.resolve("fake-probed", "cpu", torch.float64, 16).name == "fake-probed"
    assert len(probes) == 1
    routing.resolve("fake-probed", "cpu", torch.float32, 16)  # another key probes again
    assert len(probes) == 2
    registry.forget()
    routing.resolve("fake-probed", "cpu", torch.float64, 16)
    assert len(probes) == 3


def test_inputs_that_require_grad_need_a_backend_with_gradients(fake_backend, fresh_announcements):
    fake_backend(name="fake-nograd", priority=10_000, lacks=(("gradients", "no backward kernel"),))
    q, k, v = (t.requires_grad_() for t in inputs())
    with pytest.raises(tca.BackendUnavailableError, match="no gradients: no backward kernel"):
        tca.attention(q, k, v, config=CFG, backend="fake-nograd")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tca.BackendChoiceWarning)
        out = tca.attention(q, k, v, config=CFG)  # auto passes over the backend without gradients
        assert out.grad_fn is not None
        with torch.no_grad():  # no gradient wanted: the highest priority backend again
            assert routing.resolve("auto", "cpu", torch.float64, 16).name == "fake-nograd"


def test_a_capability_the_registry_does_not_know_is_refused():
    with pytest.raises(ValueError, match="unknown capabilities"):
        Backend("fake-typo", "fake", "x:y", devices=("cpu",), dtypes=(torch.float32,), lacks=(("gradient", "typo"),))


@pytest.mark.parametrize("name", ["reference", "torch", "triton", "flash", "dense"])
def test_every_registered_implementation_follows_the_protocol(name):
    if registry.get(name).environment_reasons():
        pytest.skip(f"{name} cannot be imported here")
    from tca.backends.implementation import Calibrator, CompactSelector, PaddedBatches, TCABackend

    impl = registry.get(name).load()
    assert isinstance(impl, TCABackend)
    assert isinstance(impl, Calibrator) == registry.get(name).supports("calibration")
    assert isinstance(impl, PaddedBatches) == registry.get(name).supports("varlen")
    if name not in ("reference", "dense"):  # the oracle speaks in masks only; dense selects everything (it imports nothing from tca.backends)
        assert isinstance(impl, CompactSelector)

"""Whole-model calibration in one forward pass (semantics.md section 6) and `python -m tca calibrate`."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import tca
from helpers import capture_layer_qk
from tca.budgets import calibration_candidates
from tca.reference.calibration import retained_mass as reference_retained_mass

transformers = pytest.importorskip("transformers")
from tca.models import calibrate_model, default_calibration_text, enable_tca  # noqa: E402
from tca.models.calibration import retained_mass  # noqa: E402
from tca.models.tiny_random import tiny_model  # noqa: E402

CONFIG = tca.TCAConfig(block_size=16, window=32)


@pytest.mark.parametrize("num_rows, row_chunk", [(256, 7), (40, 64), (300, 1000)])
def test_chunked_retained_mass_equals_the_reference(num_rows, row_chunk):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 200, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 200, 16, generator=gen, dtype=torch.float64) * 2
    candidates = calibration_candidates(16, CONFIG.num_candidates, CONFIG.sigma)
    chunked = retained_mass(q, k, candidates, CONFIG, 0.25, num_rows, row_chunk)
    expected = reference_retained_mass(q, k, candidates, CONFIG, 0.25, num_rows)
    assert not torch.isnan(chunked).any()
    torch.testing.assert_close(chunked, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_calibrate_model_equals_reference_calibration_of_captured_inputs(arch, tmp_path):
    model = tiny_model(arch, seed=11)
    ids = torch.randint(0, 128, (1, 180), generator=torch.Generator().manual_seed(5))
    plan = calibrate_model(model, ids, config=CONFIG, tau=0.6, num_rows=64, progress=False, text_source="random ids")
    assert model.config._attn_implementation == "sdpa"  # restored
    layers = capture_layer_qk(model, ids)
    expected = tca.reference.calibrate(
        [(q, k) for q, k, _ in layers], config=plan.config, scale=layers[0][2], num_rows=64
    )
    assert [[h.candidate for h in layer] for layer in plan.layers] == [[h.candidate for h in layer] for layer in expected.layers]
    for got, want in zip(plan.layers, expected.layers, strict=True):
        for g, w in zip(got, want, strict=True):
            assert g.retained_mass == pytest.approx(w.retained_mass, abs=1e-5)
    assert plan.metadata["num_layers"] == 2 and plan.metadata["num_kv_heads"] == 2
    assert plan.metadata["head_dim"] == 16 and plan.metadata["length"] == 180
    assert plan.metadata["text"] == "random ids"
    # Written, read back, and usable to drive the model.
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "tca-budget-plan/1" and len(data["layers"]) == 2
    loaded = tca.BudgetPlan.load(path)
    assert loaded.config == plan.config and torch.equal(loaded.budgets(1), plan.budgets(1))
    enable_tca(model, plan=str(path))
    with torch.no_grad():
        assert not torch.isnan(model(ids).logits).any()


def test_calibration_needs_a_sequence_longer_than_the_window():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="longer than the window"):
        calibrate_model(model, torch.zeros(1, 32, dtype=torch.long), config=CONFIG, progress=False)
    with pytest.raises(TypeError, match="integer"):
        calibrate_model(model, torch.zeros(1, 64), config=CONFIG, progress=False)


def test_default_calibration_text_is_python_documentation():
    text = default_calibration_text()
    assert len(text) > 100_000 and "assert" in text and text == default_calibration_text()


class ByteTokenizer:
    """A stand-in tokenizer: one id per byte, modulo the tiny vocabulary."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = torch.tensor([[b % 128 for b in text.encode()[:5000]]])
        return argparse.Namespace(input_ids=ids)


def test_calibrate_command_writes_a_plan(tmp_path, monkeypatch, capsys):
    from tca.cli import main
    from tca.commands import _args

    monkeypatch.setattr(_args.ModelChoice, "load", lambda self, *a, **k: (tiny_model("qwen2"), ByteTokenizer()))
    out = tmp_path / "plan.json"
    text = tmp_path / "text.txt"
    text.write_text(default_calibration_text()[:3000])
    code = main(["calibrate", "--model", "tiny", "--out", str(out), "--text", str(text), "--length", "200",
                 "--block-size", "16", "--window", "64", "--tau", "0.8", "--num-rows", "32"])
    assert code == 0
    plan = tca.BudgetPlan.load(out)
    assert plan.config == tca.TCAConfig(block_size=16, window=64, tau=0.8)
    assert plan.metadata["model"] == "tiny" and plan.metadata["text"] == str(text)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_retained_mass_on_the_gpu_matches_the_reference():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 8, 600, 64, generator=gen)
    k = torch.randn(1, 2, 600, 64, generator=gen) * 2
    candidates = calibration_candidates(16, CONFIG.num_candidates, CONFIG.sigma)
    on_gpu = retained_mass(q.cuda(), k.cuda(), candidates.cuda(), CONFIG, 0.125, 128, 32).cpu()
    expected = reference_retained_mass(q.double(), k.double(), candidates, CONFIG, 0.125, 128)
    torch.testing.assert_close(on_gpu, expected, atol=1e-5, rtol=1e-5)


def test_calibration_on_a_backend_without_it_says_why():
    q, k = torch.randn(1, 2, 80, 64), torch.randn(1, 1, 80, 64)
    candidates = calibration_candidates(16, CONFIG.num_candidates, CONFIG.sigma)
    with pytest.raises(tca.BackendUnavailableError, match="no calibration: FlashAttention returns no attention weights"):
        retained_mass(q, k, candidates, CONFIG, 0.125, backend="flash")

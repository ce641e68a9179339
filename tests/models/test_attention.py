"""TCA as a transformers attention implementation, on tiny random Llama / Qwen2 / Mistral models.

Layer 1 of the test pyramid at model level: the dense limit equals sdpa; then A/B of "tca" (backend auto)
against the "tca_reference" twin, and the stateless section-4 path under a dense DynamicCache.
"""

from __future__ import annotations

import pytest
import torch

import tca

transformers = pytest.importorskip("transformers")
from tca.models import cache_kwargs, dense_plan, disable_tca, enable_tca, model_shape  # noqa: E402
from tca.models.tiny_random import tiny_model  # noqa: E402

CONFIG = tca.TCAConfig(block_size=16, window=32)
ARCHS = ("llama", "qwen2")


def _ids(L: int, B: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (B, L), generator=gen)


def _logits(model, ids):
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    assert not torch.isnan(logits).any()
    return logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_dense_budgets_equal_sdpa(arch, backend):
    model = tiny_model(arch, seed=1)
    ids = _ids(150)
    expected = _logits(model, ids)
    enable_tca(model, plan=dense_plan(model_shape(model), CONFIG), backend=backend)
    torch.testing.assert_close(_logits(model, ids), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_window_covering_the_sequence_equals_sdpa(arch):
    model = tiny_model(arch, seed=2)
    ids = _ids(100)
    expected = _logits(model, ids)
    enable_tca(model, config=tca.TCAConfig(block_size=16, window=128))  # default budgets, but J = 0
    torch.testing.assert_close(_logits(model, ids), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("arch", ARCHS + ("mistral",))
def test_sparse_tca_matches_reference_twin_and_differs_from_dense(arch):
    model = tiny_model(arch, seed=3)
    ids = _ids(160, B=2)
    dense = _logits(model, ids)
    enable_tca(model, config=CONFIG)
    assert model.config._attn_implementation == "tca"
    auto = _logits(model, ids)
    model.set_attn_implementation("tca_reference")
    reference = _logits(model, ids)
    torch.testing.assert_close(auto, reference, atol=1e-4, rtol=1e-4)
    # Sparse for real: rows past the first window see fewer keys than dense attention.
    assert (auto[:, 64:] - dense[:, 64:]).abs().max() > 1e-3
    torch.testing.assert_close(auto[:, :32], dense[:, :32], atol=2e-5, rtol=2e-5)  # rows inside the first window


def test_enable_with_reference_backend_selects_the_twin_and_disable_restores():
    model = tiny_model("llama")
    enable_tca(model, config=CONFIG, backend="reference")
    assert model.config._attn_implementation == "tca_reference"
    disable_tca(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any("_tca_settings" in m.__dict__ for m in model.modules())
    model = tiny_model("llama", attn_implementation="eager")
    enable_tca(model, config=CONFIG)
    enable_tca(model, config=CONFIG)  # twice: still restores the original
    disable_tca(model)
    assert model.config._attn_implementation == "eager"


def test_loading_with_attn_implementation_tca_uses_default_settings():
    from tca.models import register_all

    register_all()
    model = tiny_model("llama", attn_implementation="tca")
    assert model.config._attn_implementation == "tca"
    ids = _ids(60)
    out = _logits(model, ids)  # default TCAConfig: w = 4096 > L, so this is dense attention
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(out, _logits(model, ids), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_cache_runs_stateless_tca_each_step(arch):
    """With the default DynamicCache each forward is section 4 over all cached keys (fresh selection).

    One layer, so the cached keys do not depend on earlier attention outputs (which differ between a prefill
    of L-1 tokens and a full forward: their selections come from different last queries).
    """
    model = tiny_model(arch, seed=4, num_hidden_layers=1)
    enable_tca(model, config=CONFIG, backend="reference")
    ids = _ids(130)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :-1], use_cache=True, **cache_kwargs(model, cache))
        step = model(ids[:, -1:], use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]
    full = _logits(model, ids)[:, -1]  # the last row of a full stateless forward: the same selection
    torch.testing.assert_close(step, full, atol=2e-5, rtol=2e-5)

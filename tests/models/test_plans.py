"""Plans against models: shipped plans, mismatches and unsupported settings raise clear errors."""

from __future__ import annotations

import pytest
import torch

import tca

transformers = pytest.importorskip("transformers")
from tca.models import ModelShape, TCACache, default_plan, enable_tca, model_shape, resolve_plan  # noqa: E402
from tca.models.budget_plans import shipped_plan_path  # noqa: E402
from tca.models.smollm2 import smollm2_plan_path  # noqa: E402
from tca.models.tiny_random import tiny_model  # noqa: E402

CONFIG = tca.TCAConfig(block_size=16, window=32)


def test_shipped_smollm2_plan_fits_smollm2():
    plan = tca.BudgetPlan.load(smollm2_plan_path())
    shape = ModelShape("SmolLM2-135M-Instruct", num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    assert resolve_plan(smollm2_plan_path(), shape).config == plan.config
    assert plan.config.block_size == 64 and plan.config.window == 512
    assert 0 < plan.mean_keep_ratio() < 1
    with pytest.raises(ValueError, match="shipped plans"):
        shipped_plan_path("no-such-model")


def test_plan_for_another_model_is_refused():
    model = tiny_model("llama")
    other = ModelShape("other", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="3 layers but the model has 2"):
        enable_tca(model, plan=default_plan(other, CONFIG))
    other = ModelShape("other", num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="1 KV heads per layer but the model has 2"):
        enable_tca(model, plan=default_plan(other, CONFIG))
    other = ModelShape("other", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32)
    with pytest.raises(ValueError, match="head dim 32"):
        enable_tca(model, plan=default_plan(other, CONFIG))
    plan = default_plan(model_shape(model), CONFIG)
    with pytest.raises(ValueError, match="block_size 16, not 32"):
        enable_tca(model, plan=plan, config=tca.TCAConfig(block_size=32, window=64))
    assert model.config._attn_implementation == "sdpa"  # nothing switched on failure


def test_plan_file_errors(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="not found"):
        enable_tca(model, plan=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a tca budget plan"):
        enable_tca(model, plan=bad)
    with pytest.raises(TypeError, match="plan must be"):
        enable_tca(model, plan=42)
    with pytest.raises(TypeError, match="config must be"):
        enable_tca(model, config={"block_size": 16})


def test_a_config_with_the_plans_block_size_replaces_its_geometry():
    model = tiny_model("llama")
    plan = default_plan(model_shape(model), CONFIG)
    enable_tca(model, plan=plan, config=tca.TCAConfig(block_size=16, window=64))
    assert model.tca_plan.config.window == 64 and torch.equal(model.tca_plan.budgets(0), plan.budgets(0))


def test_unsupported_models_and_settings_raise():
    with pytest.raises(ValueError, match="sliding-window"):
        enable_tca(tiny_model("mistral", sliding_window=64))
    with pytest.raises(ValueError, match="no full-attention layer"):
        enable_tca(tiny_model("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=0))
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown backend"):
        enable_tca(model, backend="no-such-backend")
    with pytest.raises(TypeError, match="backend must be a string"):
        enable_tca(model, backend=None)
    with pytest.raises(ValueError, match="needs the model"):
        TCACache()


def test_custom_4d_mask_and_dropout_are_refused():
    from tca.models.attention import tca_attention_forward

    model = tiny_model("llama")
    enable_tca(model, config=CONFIG)
    module = model.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="no attention mask"):
        tca_attention_forward(module, q, k, k, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout"):
        tca_attention_forward(module, q, k, k, None, dropout=0.1)
    with pytest.raises(ValueError, match="sliding window"):
        tca_attention_forward(module, q, k, k, None, sliding_window=4)

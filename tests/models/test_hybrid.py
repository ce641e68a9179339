"""Hybrid models (full-attention and sliding-window layers): TCA on the full-attention layers, the model's own
attention and sliding-window cache on the others. Checked on tiny random Gemma 2, Gemma 3 text, Ministral and
Qwen2 (use_sliding_window) models: layer 0 slides over 24 tokens, layer 1 is full attention."""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import capture_layer_qk

transformers = pytest.importorskip("transformers")
from tca.models import (  # noqa: E402
    TCACache,
    cache_kwargs,
    calibrate_model,
    default_plan,
    dense_plan,
    enable_tca,
    model_shape,
)
from tca.models.attention import tca_attention_forward  # noqa: E402
from tca.models.cache import TCACacheLayer  # noqa: E402
from tca.models.tiny_random import SLIDING_WINDOW, tiny_model  # noqa: E402

CONFIG = tca.TCAConfig(block_size=16, window=48)
HYBRIDS = ("gemma2", "gemma3", "ministral", "qwen2_hybrid")
PROMPT, STEPS = 150, 6  # the prompt is several sliding windows long and leaves TCA blocks to compress


def _ids(L: int, B: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (B, L), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, cache):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **cache_kwargs(model, cache),
        )


@pytest.mark.parametrize("arch", HYBRIDS)
def test_dense_budgets_give_the_models_own_logits(arch):
    model = tiny_model(arch, seed=3)
    ids = _ids(PROMPT, seed=1)
    assert model_shape(model).native_layers == (0,)
    with torch.no_grad():
        own_prefill = model(ids, use_cache=True, **cache_kwargs(model, transformers.DynamicCache(config=model.config))).logits
    own = _generate(model, ids, transformers.DynamicCache(config=model.config))

    enable_tca(model, plan=dense_plan(model_shape(model), CONFIG))
    cache = TCACache(model)
    with torch.no_grad():
        prefill = model(ids, use_cache=True, **cache_kwargs(model, cache)).logits  # every position of the prompt
        stateless = model(ids, use_cache=False).logits  # no cache: TCA over all keys, sliding mask for layer 0
    torch.testing.assert_close(prefill, own_prefill, atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(stateless, own_prefill, atol=5e-5, rtol=5e-5)
    assert isinstance(cache.layers[0], transformers.cache_utils.DynamicSlidingWindowLayer)
    assert cache.layers[0].keys.shape[2] == SLIDING_WINDOW - 1  # the window really slid over the prompt

    cache.reset()
    out = _generate(model, ids, cache)
    assert torch.equal(out.sequences, own.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(own.logits), atol=5e-5, rtol=5e-5)
    assert cache.kept_fraction() == 1.0 and cache.seq_len == PROMPT + STEPS - 1


@pytest.mark.parametrize("arch", HYBRIDS)
def test_default_budgets_compress_only_the_full_attention_layers(arch):
    model = tiny_model(arch, seed=4)
    enable_tca(model, config=CONFIG)
    cache = TCACache(model)
    out = _generate(model, _ids(PROMPT, seed=2), cache)
    assert out.sequences.shape == (1, PROMPT + STEPS)
    seen = PROMPT + STEPS - 1
    sliding, full = cache.layers
    assert sliding.keys.shape[2] == SLIDING_WINDOW - 1
    assert isinstance(full, TCACacheLayer) and bool((full.lengths < seen).all())
    assert cache.kept_fraction() < 0.8
    assert cache.nbytes < cache.dense_nbytes()


def test_a_left_padded_batch_gives_each_prompt_its_own_tokens():
    model = tiny_model("ministral", seed=1)
    enable_tca(model, config=CONFIG, backend="torch")
    a, b = _ids(130, seed=3), _ids(100, seed=4)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 30, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                               **cache_kwargs(model, TCACache(model)))
        alone = [model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=STEPS, do_sample=False,
                                **cache_kwargs(model, TCACache(model))) for x in (a, b)]
    assert torch.equal(batch[0, 130:], alone[0][0, 130:])
    assert torch.equal(batch[1, 130:], alone[1][0, 100:])


def test_calibration_plans_only_the_full_attention_layers(tmp_path):
    model = tiny_model("gemma3", seed=5)
    ids = _ids(200, seed=6)
    plan = calibrate_model(model, ids, CONFIG, tau=0.3, progress=False)  # random weights: a low tau drops tokens
    assert plan.metadata["native_layers"] == [0]
    # Layer 1 is calibrated on the activations of the model's own forward (layer 0 slid over its window).
    q, k, scale = capture_layer_qk(model, ids)[1]
    (expected,) = tca.reference.calibrate([(q, k)], config=plan.config, scale=scale).layers
    assert [h.candidate for h in plan.layers[1]] == [h.candidate for h in expected]
    for got, want in zip(plan.layers[1], expected, strict=True):
        assert got.retained_mass == pytest.approx(want.retained_mass, abs=1e-5)
    assert plan.mean_keep_ratio() == pytest.approx(sum(h.keep_ratio(16) for h in plan.layers[1]) / 2)
    assert plan.mean_keep_ratio() < 1.0  # calibrated layer 1 drops tokens
    path = tmp_path / "plan.json"
    plan.save(path)
    enable_tca(model, plan=str(path))
    assert model.tca_plan.metadata["native_layers"] == [0]
    cache = TCACache(model)
    out = _generate(model, _ids(PROMPT, seed=2), cache)
    assert out.sequences.shape == (1, PROMPT + STEPS) and cache.kept_fraction() < 1.0
    with pytest.raises(ValueError, match="sliding-window layers are \\[0\\]"):
        enable_tca(tiny_model("qwen2"), plan=plan)  # same geometry, no sliding layers


def test_default_plans_of_hybrid_models_name_their_sliding_layers():
    shape = model_shape(tiny_model("qwen2_hybrid"))
    assert shape.tca_layers == (1,)
    assert default_plan(shape, CONFIG).metadata["native_layers"] == [0]
    assert "native_layers" not in model_shape(tiny_model("qwen2")).to_dict()


def test_what_tca_cannot_run_faithfully_is_refused():
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        enable_tca(tiny_model("gemma2", attn_logit_softcapping=50.0))
    with pytest.raises(ValueError, match="no full-attention layer"):
        enable_tca(tiny_model("qwen2_hybrid", layer_types=["sliding_attention"] * 2))
    with pytest.raises(ValueError, match="chunked_attention"):
        enable_tca(tiny_model("qwen2_hybrid", layer_types=["full_attention", "chunked_attention"]))
    with pytest.raises(ValueError, match="set_attn_implementation"):
        enable_tca(tiny_model("ministral", attn_implementation="flex_attention"))
    model = tiny_model("gemma3")
    enable_tca(model, config=CONFIG)
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    full = model.model.layers[1].self_attn
    with pytest.raises(ValueError, match="softcapping"):
        tca_attention_forward(full, q, k, k, None, softcap=30.0)
    with pytest.raises(ValueError, match="sinks"):
        tca_attention_forward(full, q, k, k, None, s_aux=torch.zeros(4))


def test_gpt_oss_attention_sinks_are_refused():
    model = tiny_model("gpt_oss")
    with pytest.raises(ValueError, match="sinks"):
        enable_tca(model)
    with pytest.raises(ValueError, match="sinks"):
        TCACache(model)


def test_graph_decoding_refuses_hybrid_models():
    from tca.models.graphs import graph_decoding

    model = tiny_model("ministral")
    enable_tca(model, config=CONFIG)
    ids = _ids(40)
    with torch.no_grad(), pytest.raises(ValueError, match="hybrid"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       custom_generate=graph_decoding, **cache_kwargs(model, TCACache(model)))

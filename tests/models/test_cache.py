"""TCACache: the compressed KV cache under generate and manual forward loops (semantics.md section 5).

Checked against (1) the "tca_reference" twin, (2) an independent oracle: an attention implementation that
keeps its own tca.reference.prefill / decode state per layer while the model runs a dense DynamicCache
(so the cache plumbing of TCACache plays no part in it), and (3) sdpa when the budgets are dense.
"""

from __future__ import annotations

import pytest
import torch

import tca
from tca import reference
from tca.budgets import expected_cost
from tca.geometry import num_budgeted_blocks
from tca.reference.selection import budget_counts

transformers = pytest.importorskip("transformers")
from tca.models import TCACache, cache_kwargs, dense_plan, enable_tca, model_shape  # noqa: E402
from tca.models.attention import layer_settings, tca_mask  # noqa: E402
from tca.models.tiny_random import tiny_model  # noqa: E402

CONFIG = tca.TCAConfig(block_size=16, window=48)
ARCHS = ("llama", "qwen2")
PROMPT, STEPS = 150, 24  # the window moves several times while decoding: blocks leave it and are compressed


def _ids(L: int, B: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (B, L), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, steps: int, cache):
    """Manual loop: prefill, then `steps` single-token forwards. -> (tokens [B, steps], logits [B, steps, V])."""
    tokens, logits = [], []
    with torch.no_grad():
        step_logits = model(ids, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]
        for _ in range(steps):
            assert not torch.isnan(step_logits).any()
            logits.append(step_logits)
            tokens.append(step_logits.argmax(-1, keepdim=True))
            step_logits = model(tokens[-1], use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]
    return torch.cat(tokens, 1), torch.stack(logits, 1)


class OracleAttention:
    """Per layer, a ReferenceKVCache driven by tca.reference.prefill / decode; k, v from a DynamicCache."""

    def __init__(self):
        self.states = {}

    def __call__(self, module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kwargs):
        settings = layer_settings(module)
        index, LQ, L = module.layer_idx, q.shape[2], k.shape[2]
        if index not in self.states:
            out, self.states[index] = reference.prefill(q, k, v, settings.budgets, settings.config, scaling)
        else:
            rows = [
                reference.decode(q[:, :, r : r + 1], k[:, :, p : p + 1], v[:, :, p : p + 1], self.states[index])
                for r, p in zip(range(LQ), range(L - LQ, L), strict=True)
            ]
            out = torch.cat(rows, 2)
        return out.transpose(1, 2).contiguous(), None


def _oracle_run(model, ids, steps):
    oracle = OracleAttention()
    transformers.AttentionInterface.register("tca_test_oracle", oracle)
    transformers.masking_utils.AttentionMaskInterface.register("tca_test_oracle", tca_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation("tca_test_oracle")
    try:
        return greedy(model, ids, steps, transformers.DynamicCache(config=model.config)), oracle
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.parametrize("arch", ARCHS)
def test_compressed_cache_matches_independent_reference_loop(arch):
    model = tiny_model(arch, seed=5)
    enable_tca(model, config=CONFIG, backend="reference")
    ids = _ids(PROMPT)
    (expected_tokens, expected_logits), oracle = _oracle_run(model, ids, STEPS)
    cache = TCACache(model)
    tokens, logits = greedy(model, ids, STEPS, cache)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, expected_tokens)
    for layer, state in zip(cache.layers, (oracle.states[i] for i in range(len(cache.layers))), strict=True):
        assert reference.cache.cached_positions(layer.state) == reference.cache.cached_positions(state)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_compressed_cache_equals_reference_twin(arch):
    model = tiny_model(arch, seed=6)
    ids = _ids(PROMPT, B=2, seed=1)
    outputs = {}
    for backend in ("auto", "reference"):
        enable_tca(model, config=CONFIG, backend=backend)
        cache = TCACache(model)
        with torch.no_grad():
            outputs[backend] = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False,
                **cache_kwargs(model, cache),
            )
        assert cache.seq_len == PROMPT + STEPS - 1  # the last token is produced, not fed back
        assert cache.kept_fraction() < 0.8
    assert torch.equal(outputs["auto"], outputs["reference"])


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_budgets_with_compressed_cache_equal_sdpa_generation(arch):
    model = tiny_model(arch, seed=7)
    ids = _ids(PROMPT, seed=2)
    expected = greedy(model, ids, STEPS, transformers.DynamicCache(config=model.config))
    enable_tca(model, plan=dense_plan(model_shape(model), CONFIG))
    cache = TCACache(model)
    tokens, logits = greedy(model, ids, STEPS, cache)
    torch.testing.assert_close(logits, expected[1], atol=5e-5, rtol=5e-5)
    assert torch.equal(tokens, expected[0])
    assert cache.kept_fraction() == 1.0


def _implied_tokens(plan, layer: int, L: int) -> torch.Tensor:
    """[HKV] tokens a prefill of L keeps per KV head: sum_k k n_k (Eq. 7 counts) + the local part L - J b."""
    b, w = plan.config.block_size, plan.config.window
    J = num_budgeted_blocks(L, b, w)
    counts = budget_counts(plan.budgets(layer), J)  # [HKV, len(K)]
    k_values = 2 ** torch.arange(counts.shape[-1])
    return (counts * k_values).sum(-1) + (L - J * b)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_cache_bytes_are_what_the_plan_implies(backend):
    model = tiny_model("llama", seed=8)
    B, L, D = 2, 200, model.config.head_dim
    enable_tca(model, config=CONFIG, backend=backend)
    plan = model.tca_plan
    cache = TCACache(model)
    with torch.no_grad():
        model(_ids(L, B=B), use_cache=True, **cache_kwargs(model, cache))
    kept = 0
    for index, layer in enumerate(cache.layers):
        implied = _implied_tokens(plan, index, L)
        assert torch.equal(layer.lengths, implied.expand(B, -1))
        kept += int(implied.sum()) * B
    assert cache.kept_tokens() == kept
    used = kept * 2 * D * 4  # K and V, float32
    assert cache.used_nbytes == used
    if backend == "reference":
        assert cache.nbytes == used  # ragged tensors, no spare capacity
    else:
        assert used <= cache.nbytes < cache.dense_nbytes()
    assert cache.dense_nbytes() == 2 * model.config.num_hidden_layers * B * 2 * L * D * 4
    assert cache.kept_fraction() == pytest.approx(kept / (model.config.num_hidden_layers * B * 2 * L))
    # The plan's expected keep ratio of the budgeted blocks is what the selection kept there.
    J = num_budgeted_blocks(L, CONFIG.block_size, CONFIG.window)
    budgeted = float(implied.sum() - 2 * (L - J * CONFIG.block_size)) / (2 * J * CONFIG.block_size)
    assert budgeted == pytest.approx(float(expected_cost(plan.budgets(1)).mean()) / CONFIG.block_size, abs=0.05)


def test_batch_elements_are_independent():
    model = tiny_model("qwen2", seed=9)
    enable_tca(model, config=CONFIG)
    ids = _ids(PROMPT, B=2, seed=3)
    together = greedy(model, ids, 8, TCACache(model))
    for row in range(2):
        alone = greedy(model, ids[row : row + 1], 8, TCACache(model))
        torch.testing.assert_close(together[1][row : row + 1], alone[1], atol=1e-5, rtol=1e-5)


def test_several_tokens_after_prefill_equal_one_at_a_time():
    model = tiny_model("llama", seed=10)
    enable_tca(model, config=CONFIG, backend="reference")
    ids = _ids(PROMPT + 20, seed=4)
    stepwise = TCACache(model)
    chunked = TCACache(model)
    with torch.no_grad():
        model(ids[:, :PROMPT], use_cache=True, **cache_kwargs(model, stepwise))
        expected = torch.cat(
            [model(ids[:, i : i + 1], use_cache=True, **cache_kwargs(model, stepwise)).logits for i in range(PROMPT, PROMPT + 20)],
            dim=1,
        )
        model(ids[:, :PROMPT], use_cache=True, **cache_kwargs(model, chunked))
        out = model(ids[:, PROMPT:], use_cache=True, **cache_kwargs(model, chunked)).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_cache_with_a_dense_attention_raises():
    model = tiny_model("llama")
    cache = TCACache(model)
    with pytest.raises(ValueError, match="enable_tca"):
        model(_ids(20), use_cache=True, **cache_kwargs(model, cache))


def test_reset_and_unsupported_cache_operations():
    model = tiny_model("llama")
    enable_tca(model, config=CONFIG)
    cache = TCACache(model)
    with torch.no_grad():
        model(_ids(70), use_cache=True, **cache_kwargs(model, cache))
    assert cache.nbytes > 0 and cache.seq_len == 70
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.reorder_cache(torch.tensor([0]))
    with pytest.raises(NotImplementedError, match="cropped"):
        cache.crop(1)
    cache.reset()
    assert cache.nbytes == 0 and cache.seq_len == 0 and cache.kept_fraction() == 1.0

"""The public API: tca.attention / prefill / decode on the reference backend (layouts, LSE, dtypes, budgets).

Shape letters: B batch, HQ query heads, HKV KV heads, L keys, LQ queries, D head dim.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tca
from helpers import make_qkv, random_budgets
from tca import reference

CFG = tca.TCAConfig(block_size=16, window=32)


def test_public_names():
    for name in ("attention", "prefill", "decode", "available_backends", "TCAConfig", "Selection", "BudgetPlan",
                 "default_budgets", "dense_budgets", "log_gaussian_budgets", "BackendUnavailableError",
                 "BackendChoiceWarning"):
        assert hasattr(tca, name), name
    assert tca.TCAConfig() == tca.TCAConfig(block_size=128, window=4096, alpha=0.5, mass_scale="mean", tau=0.9,
                                            num_candidates=14, sigma=1.0)


@pytest.mark.parametrize("LQ", [100, 30, 1])
def test_bshd_layout_equals_bhsd(LQ):
    q, k, v = make_qkv(2, 4, 2, 100, 16, LQ=LQ, seed=LQ)
    budgets = random_budgets(2, 16, 1)
    out, lse = tca.attention(q, k, v, budgets=budgets, config=CFG, backend="reference", return_lse=True)
    out2, lse2 = tca.attention(*(t.transpose(1, 2) for t in (q, k, v)), budgets=budgets, config=CFG,
                               layout="bshd", backend="reference", return_lse=True)
    assert out2.shape == (2, LQ, 4, 16) and lse2.shape == (2, 4, LQ)  # out in q's layout; lse always [B, HQ, LQ]
    torch.testing.assert_close(out2.transpose(1, 2), out, atol=0, rtol=0)
    torch.testing.assert_close(lse2, lse, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_keeps_dtype_and_lse_is_at_least_fp32(dtype):
    q, k, v = make_qkv(1, 4, 2, 80, 16, dtype=dtype, seed=2)
    out, lse = tca.attention(q, k, v, config=CFG, backend="reference", return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # Low precision inputs are upcast: the result is the fp32 computation on the same (rounded) inputs.
    exact = tca.attention(q.float(), k.float(), v.float(), config=CFG, backend="reference")
    if dtype == torch.float64:  # computed in fp64: close to, not equal to, the fp32 computation
        torch.testing.assert_close(out, exact.double(), atol=1e-5, rtol=1e-5)
    else:  # computed in fp32, rounded to the output dtype at the end only
        torch.testing.assert_close(out, exact.to(dtype), atol=0, rtol=0)


def test_one_budget_vector_applies_to_every_kv_head():
    q, k, v = make_qkv(1, 4, 2, 100, 16, seed=3)
    p = random_budgets(1, 16, 3)[0]
    a = tca.attention(q, k, v, budgets=p, config=CFG, backend="reference")
    b = tca.attention(q, k, v, budgets=p.expand(2, -1), config=CFG, backend="reference")
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_default_budgets_are_used_when_none_given():
    q, k, v = make_qkv(1, 4, 2, 100, 16, seed=4)
    a = tca.attention(q, k, v, config=CFG, backend="reference")
    b = tca.attention(q, k, v, budgets=tca.default_budgets(16), config=CFG, backend="reference")
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_default_config_is_dense_below_its_window():
    # Default w = 4096 >= L: exact causal attention whatever the budgets.
    q, k, v = make_qkv(1, 4, 2, 64, 16, seed=5)
    out = tca.attention(q, k, v, backend="reference")
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_per_head_budgets_change_only_their_head():
    q, k, v = make_qkv(1, 4, 2, 120, 16, seed=6)
    sparse = torch.zeros(5, dtype=torch.float64)
    sparse[0] = 1  # one token per budgeted block
    dense = tca.dense_budgets(16)
    out = tca.attention(q, k, v, budgets=torch.stack([sparse, dense]), config=CFG, backend="reference")
    selection = reference.select(q, k, torch.stack([sparse, dense]), CFG, 0.25)
    J = selection.num_blocks
    assert selection.counts[0].tolist() == [J, J * 16]
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out[:, 2:], expected[:, 2:], atol=1e-12, rtol=1e-12)  # KV head 1: dense
    assert (out[:, :2] - expected[:, :2]).abs().max() > 1e-6  # KV head 0 dropped tokens


def test_attention_is_differentiable():
    """Gradients flow to q, k and v, and equal those of SDPA under the same (fixed) kept-key mask."""
    q, k, v = make_qkv(1, 4, 2, 90, 8, seed=7)
    budgets = random_budgets(2, 16, 7)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = tca.attention(*leaves, budgets=budgets, config=CFG, backend="reference")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)

    kept = reference.kept_key_mask(reference.select(q, k, budgets, CFG, 8**-0.5), torch.arange(90))
    twins = [t.clone().requires_grad_() for t in (q, k, v)]
    expected_out = F.scaled_dot_product_attention(
        *twins, attn_mask=kept.repeat_interleave(2, dim=1), enable_gqa=True
    )
    expected = torch.autograd.grad(expected_out, twins, grad_out)
    torch.testing.assert_close(out, expected_out, atol=1e-12, rtol=1e-12)
    for got, want in zip(grads, expected, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_prefill_and_decode_through_the_api():
    q, k, v = make_qkv(1, 4, 2, 72, 16, seed=8)
    out, cache = tca.prefill(q[:, :, :64], k[:, :, :64], v[:, :, :64], config=CFG, backend="reference")
    assert out.shape == (1, 4, 64, 16) and cache.seq_len == 64 and cache.num_kv_heads == 2
    before = cache.nbytes
    assert before == 2 * int(cache.lengths.sum()) * 16 * 8  # keys and values, float64
    assert (cache.lengths < 64).all()  # J = 2 budgeted blocks were compressed by the default budgets
    for i in range(64, 72):
        step = tca.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache)
        assert step.shape == (1, 4, 1, 16) and torch.isfinite(step).all()
    assert cache.seq_len == 72
    assert cache.nbytes == 2 * int(cache.lengths.sum()) * 16 * 8  # keys and values, float64

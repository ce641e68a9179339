"""The reference equals plain causal attention (SDPA) in fp64 when nothing is dropped (semantics.md 2, 4).

Two ways to drop nothing: a window at least as long as the sequence (J = 0), or the dense budget
configuration (every token of every budgeted block kept) with a short window.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tca
from helpers import make_qkv
from tca import reference


def sdpa(q, k, v, scale=None):
    """Plain causal attention, q [B, HQ, L, D], k, v [B, HKV, L, D] (Lq == L)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=scale)


SHAPES = [  # (HQ, HKV, L, D)
    (4, 4, 100, 64),  # MHA
    (8, 2, 100, 64),  # GQA, G = 4
    (4, 1, 70, 128),  # MQA-like, head dim 128
    (6, 3, 97, 128),  # GQA, L not a multiple of b
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_window_covering_the_sequence_is_dense(shape, layout):
    HQ, HKV, L, D = shape
    q, k, v = make_qkv(2, HQ, HKV, L, D, seed=L + D)
    config = tca.TCAConfig(block_size=16, window=128)  # w >= L: J = 0
    expected = sdpa(q, k, v)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = tca.attention(q, k, v, config=config, layout=layout, backend="reference")
    if layout == "bshd":
        out = out.transpose(1, 2)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("mass_scale", ["mean", "none"])
def test_dense_budgets_are_dense(shape, layout, mass_scale):
    HQ, HKV, L, D = shape
    q, k, v = make_qkv(1, HQ, HKV, L, D, seed=HQ * L)
    config = tca.TCAConfig(block_size=16, window=32, mass_scale=mass_scale)  # J > 0 budgeted blocks
    budgets = tca.dense_budgets(config.block_size)
    assert reference.select(q, k, budgets.expand(HKV, -1), config, D**-0.5).num_blocks > 0
    expected = sdpa(q, k, v)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = tca.attention(q, k, v, budgets=budgets, config=config, layout=layout, backend="reference")
    if layout == "bshd":
        out = out.transpose(1, 2)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_dense_budgets_lse_is_the_causal_logsumexp():
    q, k, v = make_qkv(1, 4, 2, 90, 64, seed=11)
    config = tca.TCAConfig(block_size=16, window=16)
    _, lse = tca.attention(
        q, k, v, budgets=tca.dense_budgets(16), config=config, backend="reference", return_lse=True
    )
    logits = torch.einsum("bhid,bhld->bhil", q, k.repeat_interleave(2, dim=1)) * 64**-0.5
    causal = torch.ones(90, 90, dtype=torch.bool).tril()
    expected = logits.masked_fill(~causal, float("-inf")).logsumexp(-1)
    assert not torch.isnan(lse).any()
    torch.testing.assert_close(lse, expected, atol=1e-12, rtol=1e-12)


def test_dense_budgets_with_custom_scale():
    q, k, v = make_qkv(1, 2, 1, 80, 64, seed=12)
    config = tca.TCAConfig(block_size=16, window=16)
    out = tca.attention(q, k, v, budgets=tca.dense_budgets(16), config=config, scale=0.3, backend="reference")
    torch.testing.assert_close(out, sdpa(q, k, v, scale=0.3), atol=1e-12, rtol=1e-12)


def test_dense_causal_attention_helper_matches_sdpa():
    q, k, v = make_qkv(1, 4, 2, 50, 64, seed=13)
    torch.testing.assert_close(reference.dense_causal_attention(q, k, v, 64**-0.5), sdpa(q, k, v), atol=1e-12, rtol=0)

"""Queries aligned to the end of the keys (semantics.md 4): Lq < L equals the last Lq rows of Lq = L.

The selection comes from the last query row, which both calls share, so the rows (and the LSE) must agree.
"""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import make_qkv, random_budgets
from tca import reference


@pytest.mark.parametrize("LQ", [1, 7, 16, 33, 120])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])
def test_short_query_block_equals_last_rows(LQ, heads):
    HQ, HKV = heads
    L = 150
    q, k, v = make_qkv(2, HQ, HKV, L, 16, seed=LQ)
    config = tca.TCAConfig(block_size=16, window=32)
    budgets = random_budgets(HKV, 16, LQ)
    full, full_lse = tca.attention(q, k, v, budgets=budgets, config=config, backend="reference", return_lse=True)
    part, part_lse = tca.attention(
        q[:, :, -LQ:], k, v, budgets=budgets, config=config, backend="reference", return_lse=True
    )
    assert part.shape == (2, HQ, LQ, 16) and part_lse.shape == (2, HQ, LQ)
    assert not torch.isnan(part).any() and not torch.isnan(part_lse).any()
    torch.testing.assert_close(part, full[:, :, -LQ:], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(part_lse, full_lse[:, :, -LQ:], atol=1e-12, rtol=1e-12)


def test_short_query_block_uses_the_same_selection():
    q, k, _ = make_qkv(1, 4, 2, 150, 16, seed=3)
    config = tca.TCAConfig(block_size=16, window=32)
    budgets = random_budgets(2, 16, 3)
    a = reference.select(q, k, budgets, config, 0.25)
    b = reference.select(q[:, :, -5:], k, budgets, config, 0.25)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.block_budgets, b.block_budgets)


def test_single_query_is_a_one_shot_decode_step():
    """Lq = 1: the row at position L-1 sees its selection and its window, one softmax over both."""
    q, k, v = make_qkv(1, 2, 1, 100, 16, LQ=1, seed=4)
    config = tca.TCAConfig(block_size=16, window=32)
    budgets = random_budgets(1, 16, 4)
    out = tca.attention(q, k, v, budgets=budgets, config=config, backend="reference")
    selection = reference.select(q, k, budgets, config, 0.25)
    kept = selection.full_mask()[0, 0].clone()
    kept[selection.num_blocks * 16 :] = True  # lo(L-1) = J*b: the rest is local
    logits = (k[0, 0, kept] @ q[0, :, 0].T).T * 0.25  # [HQ, n]
    expected = logits.softmax(-1) @ v[0, 0, kept]
    torch.testing.assert_close(out[0, :, 0], expected, atol=1e-12, rtol=1e-12)

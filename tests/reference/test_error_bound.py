"""Section 7 of semantics.md, row by row in fp64 on random inputs:
|| out_dense - out_tca ||_1 <= 2 * gamma * max_j ||v_j||_1, gamma = dense softmax mass outside S(i).

Legend: B batch, HQ query heads, HKV KV heads, G group size, LQ query rows, L keys, D head dim.
"""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import make_qkv, random_budgets
from tca import reference

CASES = [  # (HQ, HKV, L, LQ, D, b, w, mass_scale)
    (4, 2, 200, 200, 16, 16, 32, "mean"),
    (3, 3, 181, 181, 8, 16, 48, "none"),
    (4, 1, 300, 64, 16, 32, 64, "mean"),
    (2, 2, 150, 1, 8, 16, 16, "none"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sharp", [1.0, 4.0])  # sharper attention: larger logits, a tighter test
def test_error_bound_row_by_row(case, seed, sharp):
    HQ, HKV, L, LQ, D, b, w, mass_scale = case
    q, k, v = make_qkv(2, HQ, HKV, L, D, LQ=LQ, seed=seed)
    q = q * sharp
    config = tca.TCAConfig(block_size=b, window=w, mass_scale=mass_scale)
    scale = D**-0.5
    budgets = random_budgets(HKV, b, seed)
    selection = reference.select(q, k, budgets, config, scale)
    assert selection.num_blocks > 0
    out_tca = reference.attend(q, k, v, selection, scale)
    out_dense = reference.dense_causal_attention(q, k, v, scale)

    positions = torch.arange(L - LQ, L)
    kept = reference.kept_key_mask(selection, positions)  # [B, HKV, LQ, L]
    kept = kept.repeat_interleave(HQ // HKV, dim=1)  # [B, HQ, LQ, L]
    logits = torch.einsum("bhid,bhld->bhil", q, k.repeat_interleave(HQ // HKV, dim=1)) * scale
    causal = torch.arange(L) <= positions[:, None]
    dense_weights = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    gamma = (dense_weights * ~kept).sum(-1)  # [B, HQ, LQ]
    v_max = v.abs().sum(-1).amax(-1).repeat_interleave(HQ // HKV, dim=1)  # [B, HQ]

    error = (out_dense - out_tca).abs().sum(-1)  # [B, HQ, LQ]
    bound = 2 * gamma * v_max[..., None]
    assert not torch.isnan(error).any()
    assert (gamma > 0).any(), "nothing was dropped: the test would be vacuous"
    assert (error <= bound + 1e-12).all(), f"worst excess {(error - bound).max().item():.3g}"
    # The bound is tight enough to mean something: rows that drop nothing are exact.
    exact_rows = gamma == 0
    assert (error[exact_rows] <= 1e-12).all()

"""The `torch` backend (src/tca/backends/torch/) against the oracle, in the four layers of style.md.

1. attention given the same Selection (reference.select) vs reference.attend, per dtype, LSE, LQ < L;
2. selection equality vs reference.select on random fp64 inputs and on inputs with deliberate ties;
3. end to end through tca.attention(backend="torch") vs backend="reference" over the geometry grid;
4. prefill + decode vs reference.prefill / decode_step, step by step (outputs and cached positions);
plus a memory check at L = 16K (no op output of L x L size) with a timing against SDPA in the output.

Shape letters: B batch, HQ query heads, HKV key/value heads, L keys, LQ queries, D head dim, b block, w window.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tca
from conftest import make_qkv, random_budgets
from tca import TCAConfig, reference
from tca.backends import registry
from tca.backends.torch import selection as torch_selection
from tca.backends.torch.impl import TorchBackend
from tca.testing import assert_close, selection_difference

SCALE = 0.3


def _same_selection(actual, expected):
    assert torch.equal(actual.mask, expected.mask), selection_difference(actual, expected)
    assert torch.equal(actual.block_budgets, expected.block_budgets)
    assert actual.seq_len == expected.seq_len


# ------------------------------------------------------------------ registry


def test_runs_any_head_dim_on_the_cpu():
    spec = registry.get("torch")
    assert spec.load() is TorchBackend
    assert spec.reasons("cpu", torch.float32, 80) == []


# ------------------------------------------------------------------ layer 1: attention given a selection


ATTEND_CASES = [
    # (B, HQ, HKV, L, LQ, D, b, w)
    (2, 4, 2, 200, 200, 16, 16, 64),  # GQA, L does not divide b
    (1, 3, 3, 256, 256, 8, 16, 32),  # MHA, L divides b
    (1, 6, 2, 333, 100, 8, 32, 64),  # LQ < L
    (1, 4, 1, 130, 1, 8, 16, 32),  # one query row
    (1, 2, 2, 50, 50, 8, 16, 64),  # L <= w: no budgeted block
    (1, 2, 1, 700, 700, 8, 16, 16),  # w == b, many chunks
]


@pytest.mark.parametrize("case", ATTEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_attend_matches_reference_given_the_same_selection(case, dtype):
    B, HQ, HKV, L, LQ, D, b, w = case
    config = TCAConfig(block_size=b, window=w)
    q, k, v = make_qkv(B, HQ, HKV, L, D, LQ=LQ, dtype=dtype, seed=L + LQ)
    selection = reference.select(q, k, random_budgets(HKV, b, L), config, SCALE)
    out, lse = TorchBackend.attend(q, k, v, selection, SCALE, return_lse=True)
    ref_out, ref_lse = reference.attend(q, k, v, selection, SCALE, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (B, HQ, LQ)
    assert_close(out, ref_out, dtype, msg="out")
    assert_close(lse, ref_lse, dtype, lse=True, msg="lse")
    assert_close(TorchBackend.attend(q, k, v, selection, SCALE), ref_out, dtype, msg="out without lse")


def test_attend_with_a_hand_made_selection_everything_and_nothing():
    """Selections no top-t would make: every budgeted token (= dense causal) and none (= sliding window)."""
    B, HQ, HKV, L, D, b, w = 1, 4, 2, 160, 8, 16, 32
    q, k, v = make_qkv(B, HQ, HKV, L, D, seed=11)
    J = (L - 1) // b + 1 - w // b
    for fill in (True, False):
        mask = torch.full((B, HKV, J * b), fill)
        selection = tca.Selection(mask, mask.view(B, HKV, J, b).sum(-1), b, w, L)
        out = TorchBackend.attend(q, k, v, selection, SCALE)
        assert_close(out, reference.attend(q, k, v, selection, SCALE), torch.float64)
    dense = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=SCALE
    )
    mask = torch.ones(B, HKV, J * b, dtype=torch.bool)
    full = tca.Selection(mask, mask.view(B, HKV, J, b).sum(-1), b, w, L)
    assert_close(TorchBackend.attend(q, k, v, full, SCALE), dense, torch.float64)


# ------------------------------------------------------------------ layer 2: selection


SELECT_CASES = [
    # (B, HQ, HKV, L, D, b, w, alpha, mass_scale)
    (1, 4, 2, 150, 16, 16, 32, 0.5, "mean"),
    (2, 3, 3, 97, 8, 16, 16, 0.5, "none"),
    (1, 6, 2, 130, 8, 16, 48, 0.0, "mean"),
    (1, 2, 1, 600, 8, 32, 64, 1.0, "mean"),
    (1, 4, 4, 40, 8, 16, 64, 0.5, "mean"),  # L <= w: empty selection
]


def _tied_qkv(B, HQ, HKV, L, D, b, seed):
    """Small-integer q and k (exact dot products) with duplicated keys and a duplicated block: ties everywhere."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (B, HQ, L, D), generator=gen).double() * 0.5
    k = torch.randint(-2, 3, (B, HKV, L, D), generator=gen).double() * 0.5
    for _ in range(L // 3):
        src, dst = torch.randint(0, L, (2,), generator=gen).tolist()
        k[:, :, dst] = k[:, :, src]
    if L // b >= 3:
        k[:, :, 2 * b : 3 * b] = k[:, :, 0:b]
    v = torch.randn(B, HKV, L, D, generator=gen, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("case", SELECT_CASES)
@pytest.mark.parametrize("inputs", ["random", "ties", "zero_query"])
def test_selection_equals_reference(case, inputs):
    B, HQ, HKV, L, D, b, w, alpha, mass_scale = case
    config = TCAConfig(block_size=b, window=w, alpha=alpha, mass_scale=mass_scale)
    seed = L * 7 + b
    if inputs == "random":
        q, k, _ = make_qkv(B, HQ, HKV, L, D, seed=seed)
    else:
        q, k, _ = _tied_qkv(B, HQ, HKV, L, D, b, seed)
        if inputs == "zero_query":
            q[:, :, -1] = 0  # uniform importance: every block and token tied
    budgets = random_budgets(HKV, b, seed)
    expected = reference.select(q, k, budgets, config, SCALE)
    _same_selection(TorchBackend.select(q, k, budgets, config, SCALE), expected)
    indices, counts = TorchBackend.select_indices(q, k, budgets, config, SCALE)
    assert indices.dtype == torch.int32 and counts.dtype == torch.int32
    ref_indices, ref_counts = expected.padded_indices(fill=L)
    assert torch.equal(counts.long(), ref_counts)
    assert torch.equal(indices.long(), ref_indices)  # ascending, padded with L


def test_selection_with_underflowing_importance_equals_reference():
    """Huge logits: most importances are exactly 0, so blocks with M_j = 0 (H_j = 1) appear."""
    q, k, _ = _tied_qkv(1, 2, 1, 160, 8, 16, 3)
    config = TCAConfig(block_size=16, window=32)
    budgets = random_budgets(1, 16, 3)
    _same_selection(
        TorchBackend.select(q * 400, k, budgets, config, SCALE), reference.select(q * 400, k, budgets, config, SCALE)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_priority_with_tiny_nonzero_importance_equals_reference(dtype):
    """Blocks whose scores are tiny but not zero (sum s^2 would underflow): both evaluate H on s / max s, no NaN."""
    tiny = torch.finfo(dtype).tiny
    importance = torch.rand(1, 2, 64, dtype=dtype, generator=torch.Generator().manual_seed(0))
    importance[..., :16] *= tiny ** 0.5 * 1e-3  # block 0: squares underflow, mass does not
    importance[..., 16:32] = 0  # block 1: M = 0, H = 1
    ours = torch_selection.block_priority(importance, 4, 16, 0.5, "mean")
    ref = reference.block_priority(importance, 4, 16, 0.5, "mean")
    assert not torch.isnan(ours).any()
    assert torch.equal(ours, ref)

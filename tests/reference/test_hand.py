"""Hand-computed cases for each step of semantics.md sections 1-3 (the numbers are worked out in comments).

Shape letters: B batch, HKV KV heads, L keys, J budgeted blocks, b block size.
"""

from __future__ import annotations

import math

import pytest
import torch

import tca
from tca import budgets as B
from tca import geometry
from tca import reference as R
from tca.validation import check_budgets


def counts_of(p, J):
    return R.budget_counts(torch.tensor(p, dtype=torch.float64), J).tolist()


# ---- Eq. 7: counts n_k by largest remainder, ties to the larger k; Psi ----------------------------------


def test_counts_largest_remainder():
    # K = 1, 2, 4, 8, 16. p*J = [1.5, 1.5, 0.75, 2.25, 0] -> floors [1, 1, 0, 2, 0] (4 of 6 blocks),
    # fractions [.5, .5, .75, .25, 0]: first unit to k=4 (.75), second to the .5 tie -> the larger k = 2.
    n = counts_of([0.25, 0.25, 0.125, 0.375, 0.0], 6)
    assert n == [1, 2, 1, 2, 0]
    assert R.psi(torch.tensor(n), 16).tolist() == [8, 8, 4, 2, 2, 1]


def test_counts_tie_goes_to_larger_k():
    # p*J = [1.5, 0, 0, 0, 1.5]: floors [1, 0, 0, 0, 1], one unit left, tie .5/.5 -> k = 16.
    n = counts_of([0.5, 0.0, 0.0, 0.0, 0.5], 3)
    assert n == [1, 0, 0, 0, 2]
    assert R.psi(torch.tensor(n), 16).tolist() == [16, 16, 1]


def test_counts_uniform_budgets_fill_from_the_top():
    # p = 1/5 each, J = 3: every p*J = 0.6, all floors 0, three units to k = 16, 8, 4 (ties to the larger k).
    n = counts_of([0.2] * 5, 3)
    assert n == [0, 0, 1, 1, 1]
    assert R.psi(torch.tensor(n), 16).tolist() == [16, 8, 4]


def test_counts_exact_multiples_and_empty():
    assert counts_of([0.5, 0.25, 0.25, 0.0, 0.0], 4) == [2, 1, 1, 0, 0]
    assert counts_of([0.5, 0.25, 0.25, 0.0, 0.0], 0) == [0, 0, 0, 0, 0]
    assert R.psi(torch.zeros(5, dtype=torch.long), 16).tolist() == []
    assert counts_of(tca.dense_budgets(16).tolist(), 7) == [0, 0, 0, 0, 7]


def test_counts_per_head_rows():
    p = torch.tensor([[0.25, 0.25, 0.125, 0.375, 0.0], [0.5, 0.0, 0.0, 0.0, 0.5]], dtype=torch.float64)
    assert R.budget_counts(p, 6).tolist() == [[1, 2, 1, 2, 0], [3, 0, 0, 0, 3]]


@pytest.mark.parametrize("J", [1, 5, 13, 40])
def test_counts_always_sum_to_j(J):
    p = tca.default_budgets(64)
    n = R.budget_counts(p, J)
    assert int(n.sum()) == J and (n >= 0).all()
    assert len(R.psi(n, 64)) == J


# ---- Eq. 6: block priority -------------------------------------------------------------------------------


def importance_blocks(blocks, b=16, tail=(0.1,)):
    """s for one batch element and head: each block's leading values, zero padded to b, then local keys."""
    s = []
    for values in blocks:
        s += list(values) + [0.0] * (b - len(values))
    s += list(tail)
    return torch.tensor(s, dtype=torch.float64)[None, None]  # [1, 1, L]


# Block 0: one key with 0.5 -> M = 0.5, H = 1. Block 1: four keys of 0.1 -> M = 0.4, H = 4 * 0.01 / 0.16 = 0.25.
# Block 2: all zero -> M = 0, H = 1 by definition. (The 0.1 after them is a local key, not budgeted.)
BLOCKS = [[0.5], [0.1, 0.1, 0.1, 0.1], []]


@pytest.mark.parametrize(
    "alpha,mass_scale,expected",
    [
        (0.5, "none", [0.5 * 0.5, 0.5 * 0.4 + 0.5 * 0.75, 0.0]),  # h = (1-a) M + a (1-H)
        (0.5, "mean", [0.5 * 1.5, 0.5 * 1.2 + 0.5 * 0.75, 0.0]),  # m = J M = 3 M
        (0.0, "none", [0.5, 0.4, 0.0]),
        (0.0, "mean", [1.5, 1.2, 0.0]),
        (1.0, "none", [0.0, 0.75, 0.0]),
        (0.25, "mean", [0.75 * 1.5, 0.75 * 1.2 + 0.25 * 0.75, 0.0]),
    ],
)
def test_block_priority(alpha, mass_scale, expected):
    h = R.block_priority(importance_blocks(BLOCKS), 3, 16, alpha, mass_scale)
    assert h.shape == (1, 1, 3)
    assert not torch.isnan(h).any()
    torch.testing.assert_close(h[0, 0], torch.tensor(expected, dtype=torch.float64), atol=1e-15, rtol=0)


def test_zero_mass_block_has_herfindahl_one():
    # With alpha = 1 only 1 - H counts: a zero block (H = 1) scores 0, not NaN, and not 1 (as H = 0 would).
    h = R.block_priority(importance_blocks([[], [0.2, 0.2]]), 2, 16, 1.0, "none")
    assert h[0, 0].tolist() == [0.0, 0.5]


@pytest.mark.parametrize("dtype,tiny", [(torch.float32, 1e-24), (torch.float64, 1e-170)])
def test_tiny_block_mass_gives_the_true_herfindahl_not_nan(dtype, tiny):
    """A block whose scores are all tiny but nonzero: sum s^2 and M^2 underflow, yet H_j is scale-free.
    Uniform tiny block: H = 1/16. One tiny score: H = 1. Neither may be NaN (a NaN priority ranked first)."""
    s = torch.zeros(1, 1, 64, dtype=dtype)
    s[0, 0, 0] = 0.9  # block 0: a live block, H = 1
    s[0, 0, 16:32] = tiny  # block 1: uniform, H = 1/16
    s[0, 0, 37] = tiny  # block 2: one key, H = 1
    s[0, 0, 60] = 0.1  # local
    h = R.block_priority(s, 3, 16, 0.5, "none")[0, 0]
    assert torch.isfinite(h).all()
    expected = torch.tensor([0.5 * 0.9, 0.5 * 16 * tiny + 0.5 * (1 - 1 / 16), 0.5 * tiny], dtype=dtype)
    torch.testing.assert_close(h, expected)
    assert R.block_ranks(h[None, None])[0, 0].tolist() == [1, 0, 2]


def test_block_priority_ignores_local_keys():
    # Only the first J blocks count; the mass of later (local) keys does not enter h_j.
    a = R.block_priority(importance_blocks(BLOCKS, tail=[0.0] * 20), 3, 16, 0.5, "mean")
    b = R.block_priority(importance_blocks(BLOCKS, tail=[0.3] * 20), 3, 16, 0.5, "mean")
    assert torch.equal(a, b)


# ---- Eq. 7: ranks and per-block budgets -------------------------------------------------------------------


def test_block_ranks_ties_to_smaller_index():
    # Order: 0.5 (block 1), 0.5 (block 4), 0.3 (block 0), 0.3 (block 2), 0.1 (block 3).
    ranks = R.block_ranks(torch.tensor([[[0.3, 0.5, 0.3, 0.1, 0.5]]]))
    assert ranks[0, 0].tolist() == [2, 0, 3, 4, 1]


def test_block_ranks_all_equal_is_identity():
    assert R.block_ranks(torch.zeros(1, 2, 6))[0].tolist() == [list(range(6))] * 2


def test_block_budgets_largest_to_highest_priority():
    # Psi = [8, 8, 4, 2, 2, 1] (see test_counts_largest_remainder); ranks of h = [2, 0, 5, 3, 1, 4].
    h = torch.tensor([[[0.5, 0.9, 0.1, 0.4, 0.6, 0.2]]])
    p = torch.tensor([[0.25, 0.25, 0.125, 0.375, 0.0]], dtype=torch.float64)
    t = R.block_budgets(h, p, 16)
    assert t[0, 0].tolist() == [4, 8, 1, 2, 8, 2]


# ---- Eq. 8: top-t inside each block, ties to the smaller position -----------------------------------------


def test_select_tokens_ties_to_smaller_position():
    s = importance_blocks([[0.1, 0.3, 0.3, 0.2, 0.3], [], [0.05] * 16], tail=[])
    t = torch.tensor([[[2, 3, 4]]])
    mask = R.select_tokens(s, t, 16)[0, 0]
    chosen = mask.nonzero().squeeze(-1).tolist()
    # Block 0: the three 0.3 at 1, 2, 4 tie, t = 2 -> 1, 2. Block 1 (all zero), t = 3 -> 16, 17, 18.
    # Block 2 (all 0.05), t = 4 -> 32, 33, 34, 35.
    assert chosen == [1, 2, 16, 17, 18, 32, 33, 34, 35]


def test_select_tokens_keeps_whole_block_at_t_equals_b():
    s = torch.rand(1, 1, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = R.select_tokens(s, torch.tensor([[[16, 1]]]), 16)[0, 0]
    assert mask[:16].all() and int(mask[16:32].sum()) == 1 and mask[16 + int(s[0, 0, 16:32].argmax())]


# ---- Section 2: lo(i) and J ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "i,b,w,lo",
    [
        (0, 16, 32, 0),
        (15, 16, 32, 0),
        (31, 16, 32, 0),  # c = 1: (1+1)*16 - 32 = 0
        (32, 16, 32, 16),  # c = 2: 48 - 32
        (47, 16, 32, 16),  # every row of a block shares lo
        (48, 16, 32, 32),
        (100, 16, 32, 80),  # c = 6: 112 - 32
        (16, 16, 16, 16),  # w = b: only the own block is local
        (63, 64, 64, 0),
        (64, 64, 64, 64),
        (130, 64, 128, 64),  # c = 2: 192 - 128
        (4095, 128, 4096, 0),
        (4096, 128, 4096, 128),
    ],
)
def test_window_start(i, b, w, lo):
    assert geometry.window_start(i, b, w) == lo
    assert geometry.window_start(torch.tensor([i]), b, w).tolist() == [lo]


@pytest.mark.parametrize(
    "L,b,w,J",
    [
        (1, 16, 32, 0),
        (32, 16, 32, 0),  # L <= w: exact dense
        (33, 16, 32, 1),  # lo(32) = 16
        (48, 16, 32, 1),
        (49, 16, 32, 2),  # lo(48) = 32
        (100, 16, 32, 5),  # lo(99) = 80
        (129, 64, 64, 2),  # lo(128) = 128
        (128, 64, 64, 1),
        (8192, 128, 4096, 32),
    ],
)
def test_num_budgeted_blocks(L, b, w, J):
    assert geometry.num_budgeted_blocks(L, b, w) == J
    assert J == max(0, (L - 1) // b + 1 - w // b)  # the spec's second form


# ---- Section 1: budget configurations --------------------------------------------------------------------


def test_log_gaussian_budgets():
    p = B.log_gaussian_budgets(0.0, 1.0, 16)
    phi = [math.exp(-(x**2) / 2) for x in range(5)]
    expected = torch.tensor([f / sum(phi) for f in phi], dtype=torch.float64)
    torch.testing.assert_close(p, expected, atol=1e-15, rtol=0)


def test_default_budgets_keep_about_16_percent_for_b128():
    p = tca.default_budgets(128)
    torch.testing.assert_close(p, B.log_gaussian_budgets(4.0, 1.0, 128))
    assert int(p.argmax()) == 4  # k = 16
    cost = float(B.expected_cost(p))
    assert cost == pytest.approx(sum(2**x * float(p[x]) for x in range(8)))
    assert 0.14 < cost / 128 < 0.18
    assert torch.equal(tca.default_budgets(16), B.log_gaussian_budgets(1.0, 1.0, 16))  # mu = log2(16) - 3


def test_dense_budgets_and_keep_count():
    p = tca.dense_budgets(32)
    assert p.tolist() == [0, 0, 0, 0, 0, 1.0]
    assert float(B.expected_cost(p)) == 32.0
    assert int(B.block_keep_count(p)) == 32
    # t = max(1, floor(E[p])): E = 0.5 * 1 + 0.5 * 2 = 1.5 -> 1; all on k = 1 -> 1.
    assert int(B.block_keep_count(torch.tensor([0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64))) == 1
    assert int(B.block_keep_count(torch.tensor([0, 0.5, 0.5, 0, 0, 0], dtype=torch.float64))) == 3


def test_calibration_candidates_span_one_to_b():
    c = B.calibration_candidates(64, 7, 1.0)  # mu_m = m * 6 / 6 = m
    assert c.shape == (7, 7)
    for m in range(7):
        torch.testing.assert_close(c[m], B.log_gaussian_budgets(float(m), 1.0, 64))
    assert int(c[0].argmax()) == 0 and int(c[-1].argmax()) == 6
    costs = B.expected_cost(c)
    assert (costs[1:] > costs[:-1]).all()  # cheaper candidates come first


def test_retain_counts():
    assert B.retain_counts(16).tolist() == [1, 2, 4, 8, 16]
    assert tca.TCAConfig(block_size=256, window=256).retain_counts == (1, 2, 4, 8, 16, 32, 64, 128, 256)


@pytest.mark.parametrize("excess", [9e-5, -9e-5])
@pytest.mark.parametrize("J", [7, 100_000])
def test_budgets_within_tolerance_are_normalised_so_the_counts_add_up_to_J(excess, J):
    """Validation accepts sums within 1e-4 and divides by the sum (docs/semantics.md section 1); Eq. 7's counts
    are then non-negative and add up to J even for large J."""
    p = torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2 + excess]], dtype=torch.float64)
    normalised = check_budgets(p, 1, tca.TCAConfig(block_size=16, window=16), "cpu")
    assert abs(float(normalised.sum()) - 1) < 1e-15
    n = R.budget_counts(normalised[0], J)
    assert int(n.sum()) == J and (n >= 0).all()
    assert len(R.psi(n, 16)) == J

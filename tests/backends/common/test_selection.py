"""The shared selection core (tca.backends.common): Eq. 7 counts and Psi against the reference, and the one
compact form (ascending, padded with L) that every producer emits.

Shape letters: B batch, HKV key/value heads, J budgeted blocks, b block size, L keys.
"""

from __future__ import annotations

import pytest
import torch

from helpers import make_qkv, random_budgets
from tca import TCAConfig, reference
from tca.backends import registry
from tca.backends.common import compact
from tca.backends.common.block_budgets import block_keep_from_ranks, budget_counts
from tca.budgets import default_budgets
from tca.geometry import num_budgeted_blocks
from tca.selection import Selection


def _budgets(J: int) -> torch.Tensor:
    """Random normalised budgets for b = 128, plus tied fractional parts and the default."""
    gen = torch.Generator().manual_seed(J)
    p = torch.rand(4, 8, generator=gen, dtype=torch.float64) ** 3
    p = p / p.sum(-1, keepdim=True)
    p[0] = 1 / 8  # every fractional part ties
    return torch.cat([p, default_budgets(128)[None]])


@pytest.mark.parametrize("J", [0, 1, 5, 13, 64, 1000, 100_000])
def test_budget_counts_equal_the_reference_and_add_up_to_J(J):
    p = _budgets(J)
    counts = budget_counts(p, J)
    assert torch.equal(counts, reference.budget_counts(p, J))
    assert (counts.sum(-1) == J).all() and (counts >= 0).all()


@pytest.mark.parametrize("J", [1, 5, 37, 200])
def test_block_keep_from_ranks_is_psi_of_the_ranks(J):
    p = _budgets(J)
    gen = torch.Generator().manual_seed(J)
    priority = torch.rand(2, p.shape[0], J, generator=gen, dtype=torch.float64)
    priority[..., : J // 2] = 0.5  # tied priorities
    ours = block_keep_from_ranks(reference.block_ranks(priority), p)
    assert torch.equal(ours, reference.block_budgets(priority, p, 128))


def _random_mask(B, HKV, P, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(B, HKV, P, generator=gen) < torch.rand(B, HKV, 1, generator=gen)


@pytest.mark.parametrize("seed", range(4))
def test_from_mask_pads_with_L_and_round_trips_through_a_selection(seed):
    L, b, w = 150, 16, 32
    J = num_budgeted_blocks(L, b, w)
    mask = _random_mask(2, 3, J * b, seed)
    mask[0, 0] = False  # a head that selected nothing
    indices, counts = compact.from_mask(mask, L)
    compact.check(indices, counts, L)
    assert torch.equal(counts.long(), mask.sum(-1))
    selection = compact.to_selection(indices, counts, b, w, L)
    assert torch.equal(selection.mask, mask)
    again, again_counts = compact.from_selection(selection)
    assert torch.equal(again, indices) and torch.equal(again_counts, counts)


def test_block_offsets_count_the_selected_positions_below_each_block():
    L, b, w = 150, 16, 32
    J = num_budgeted_blocks(L, b, w)
    mask = _random_mask(1, 2, J * b, 5)
    indices, _ = compact.from_mask(mask, L)
    offsets = compact.block_offsets(indices, L, b, w)
    expected = torch.cat([torch.zeros(1, 2, 1, dtype=torch.long), mask.view(1, 2, J, b).sum(-1).cumsum(-1)], -1)
    assert torch.equal(offsets.long(), expected)


def test_check_names_what_breaks_the_convention():
    indices = torch.tensor([[[3, 5, 150]]], dtype=torch.int32)
    counts = torch.tensor([[2]], dtype=torch.int32)
    compact.check(indices, counts, 150)
    with pytest.raises(ValueError, match="padding after the valid entries must be L = 150"):
        compact.check(torch.tensor([[[3, 5, -1]]], dtype=torch.int32), counts, 150)
    with pytest.raises(ValueError, match="strictly ascending"):
        compact.check(torch.tensor([[[5, 3, 150]]], dtype=torch.int32), counts, 150)
    with pytest.raises(ValueError, match="must be torch.int32"):
        compact.check(indices.long(), counts, 150)


def test_the_torch_producer_emits_the_compact_form_of_the_reference_selection():
    config = TCAConfig(block_size=16, window=32)
    q, k, _ = make_qkv(2, 4, 2, 150, 16, dtype=torch.float32, seed=3)
    budgets = random_budgets(2, 16, seed=3)
    indices, counts = registry.get("torch").load().select_indices(q, k, budgets, config, 0.25)
    compact.check(indices, counts, 150)
    want: Selection = reference.select(q, k, budgets, config, 0.25)
    assert torch.equal(compact.to_selection(indices, counts, 16, 32, 150).mask, want.mask)

"""The backend-neutral Selection record: padded indices round trip, masks, and shape checks."""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import make_qkv, random_budgets
from tca import reference
from tca.selection import Selection

CFG = tca.TCAConfig(block_size=16, window=32)


def test_padded_indices_round_trip():
    q, k, _ = make_qkv(2, 4, 2, 150, 8, seed=0)
    selection = reference.select(q, k, random_budgets(2, 16, 0), CFG, 8**-0.5)
    indices, counts = selection.padded_indices()
    assert indices.shape == (2, 2, int(counts.max()))
    for b in range(2):
        for h in range(2):
            n = int(counts[b, h])
            assert indices[b, h, :n].tolist() == selection.mask[b, h].nonzero().squeeze(-1).tolist()
            assert (indices[b, h, n:] == 150).all()  # padded with L
    again = Selection.from_indices(indices, counts, 16, 32, 150)
    assert torch.equal(again.mask, selection.mask)
    assert torch.equal(again.block_budgets, selection.block_budgets)


def test_full_mask_pads_the_local_keys():
    q, k, _ = make_qkv(1, 2, 1, 100, 8, seed=1)
    selection = reference.select(q, k, random_budgets(1, 16, 1), CFG, 8**-0.5)
    full = selection.full_mask()
    assert full.shape == (1, 1, 100)
    assert torch.equal(full[..., : selection.num_blocks * 16], selection.mask)
    assert not full[..., selection.num_blocks * 16 :].any()


def test_empty_selection_when_the_window_covers_everything():
    q, k, _ = make_qkv(1, 2, 1, 30, 8, seed=2)
    selection = reference.select(q, k, random_budgets(1, 16, 2), CFG, 8**-0.5)
    assert selection.num_blocks == 0 and selection.mask.shape == (1, 1, 0)
    indices, counts = selection.padded_indices()
    assert indices.shape == (1, 1, 0) and counts.tolist() == [[0]]


def test_selection_shape_checks():
    with pytest.raises(ValueError, match=r"Selection.mask must be a bool tensor \[B, HKV, J\*b\]"):
        Selection(torch.zeros(1, 1, 20, dtype=torch.bool), torch.zeros(1, 1, 1, dtype=torch.long), 16, 32, 50)
    with pytest.raises(ValueError, match="Selection.block_budgets must have shape"):
        Selection(torch.zeros(1, 1, 32, dtype=torch.bool), torch.zeros(1, 1, 3, dtype=torch.long), 16, 32, 50)

"""The prefill's cache sizes come from the budgets on the host (no device read): every budgeted block keeps
exactly its t_j tokens whatever the data, so the counts the selection makes on the device must equal them, for
any budgets, lengths and inputs (non-finite keys included)."""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import make_qkv, random_budgets
from tca.backends.common.block_budgets import selection_sizes
from tca.backends.torch.impl import TorchBackend
from tca.budgets import block_keep_count
from tca.devices import host_copy
from tca.validation import check_budgets

CONFIG = tca.TCAConfig(block_size=16, window=32)


@pytest.mark.parametrize("L", [1, 31, 48, 49, 130, 257])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_host_counts_equal_the_selections(L, seed):
    q, k, v = make_qkv(2, 4, 2, L, 16, dtype=torch.float32, seed=seed)
    if seed == 2 and L > 40:
        k[0, 1, 5] = float("nan")  # a bad key ranks last in its block; the block still keeps t_j tokens
        k[1, 0, 20] = float("inf")
    budgets = check_budgets(random_budgets(2, CONFIG.block_size, seed=seed), 2, CONFIG, "cpu")
    _, device_counts = TorchBackend.select_indices(q, k, budgets, CONFIG, 0.25)
    counts, keep = selection_sizes(budgets, L, CONFIG)
    assert torch.equal(device_counts.long(), counts.expand(2, -1))
    assert torch.equal(keep, block_keep_count(budgets))


def test_the_host_copy_is_the_one_check_budgets_kept():
    raw = random_budgets(2, CONFIG.block_size, seed=3)
    budgets = check_budgets(raw, 2, CONFIG, "cpu")
    assert torch.equal(host_copy(budgets), budgets)
    assert host_copy(budgets) is host_copy(budgets)  # no copy made per call
    other = budgets.clone()  # not made by check_budgets: read from its device
    assert torch.equal(host_copy(other), budgets)

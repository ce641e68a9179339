"""Sizing a compressed store in vLLM pages (tca.serving.vllm.store_layout): the per-block bound, the page layout,
and that every chunking of a prompt followed by decoding fits what a request's pages hold. No vLLM needed."""

from __future__ import annotations

import random

import pytest
import torch

from tca.backends.common.block_budgets import budget_counts
from tca.budgets import block_keep_count, default_budgets, dense_budgets, log_gaussian_budgets, retain_counts
from tca.geometry import num_budgeted_blocks, window_start
from tca.serving.vllm.store_layout import HEADER_ENTRIES, kept_per_block_bound, store_layout


def kept(p: torch.Tensor, blocks: int) -> int:
    """S(J): tokens a selection over `blocks` budgeted blocks keeps (Eq. 7's counts times the retain counts)."""
    if blocks == 0:
        return 0
    counts = budget_counts(p.to(torch.float64), blocks)
    return int((counts * retain_counts(2 ** (p.shape[-1] - 1))).sum())


@pytest.mark.parametrize("mu", [0.0, 1.5, 4.0, 6.5])
def test_the_bound_is_the_worst_selection_per_block_and_covers_a_decode_step(mu):
    p = log_gaussian_budgets(mu, 1.0, 128)
    bound = kept_per_block_bound(p, 40)
    worst = max(kept(p, J) / J for J in range(1, 41))
    assert bound == pytest.approx(max(worst, float(block_keep_count(p))))
    assert bound >= float(block_keep_count(p))


def test_default_budgets_on_the_8b_shape_give_the_designed_page():
    """b = 128, w = 4096, HKV = 8, 64-token pages: a store page stands for 296 tokens (21.6% of dense bytes)."""
    p = default_budgets(128)
    bound = kept_per_block_bound(p, num_budgeted_blocks(131072, 128, 4096))
    assert bound == pytest.approx(27.2)
    layout = store_layout(torch.full((32, 8), bound), 128, 64)
    assert layout.tokens_per_page == 296
    assert layout.dense_fraction == pytest.approx(64 / 296)


def test_head_segments_are_disjoint_fill_one_page_and_the_next_size_overflows():
    bounds = torch.tensor([[27.2, 3.0, 64.0, 1.0], [10.5, 10.5, 10.5, 10.5]], dtype=torch.float64)
    layout = store_layout(bounds, 128, 16)
    entries = 16 * 4
    for layer in range(2):
        ends = layout.offset[layer] + layout.capacity[layer]
        assert int(layout.offset[layer, 0]) == HEADER_ENTRIES
        assert torch.equal(layout.offset[layer, 1:], ends[:-1])  # back to back, in head order
        assert int(ends[-1]) <= entries
        assert (layout.capacity[layer] >= bounds[layer] * layout.tokens_per_page / 128).all()
    step = layout.tokens_per_page + 8
    assert (torch.ceil(bounds * step / 128).sum(-1) > entries - HEADER_ENTRIES).any()  # B_s is the largest


def test_pages_too_small_for_any_store_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="use larger pages"):
        store_layout(torch.full((1, 2), kept_per_block_bound(dense_budgets(128), 8)), 128, 8)


def simulated_kept(p: torch.Tensor, chunk_ends: list[int], decoded: int, block_size: int, window: int) -> int:
    """Tokens one head keeps after a prompt prefilled in chunks ending at chunk_ends (streaming: each chunk selects
    the blocks that left the window since the last), then `decoded` tokens (each leaving block keeps t)."""
    total, seen = 0, 0
    for end in chunk_ends:
        left = window_start(end - 1, block_size, window) // block_size
        total += kept(p, left - seen)
        seen = left
    for position in range(chunk_ends[-1], chunk_ends[-1] + decoded):
        left = window_start(position, block_size, window) // block_size
        total += int(block_keep_count(p)) * (left - seen)
        seen = left
    return total


@pytest.mark.parametrize("seed", range(6))
def test_any_chunking_then_decoding_fits_the_request_pages(seed):
    rng = random.Random(seed)
    b, w, max_len = 16, 64, 4000
    heads = [log_gaussian_budgets(rng.uniform(0, 4), rng.uniform(0.5, 2), b) for _ in range(3)]
    J_max = num_budgeted_blocks(max_len, b, w)
    bounds = torch.tensor([[kept_per_block_bound(p, J_max) for p in heads]], dtype=torch.float64)
    layout = store_layout(bounds, b, 16)
    for _ in range(20):
        prompt = rng.randrange(1, 3000)
        cuts = sorted(rng.sample(range(1, prompt), min(prompt - 1, rng.randrange(0, 12))))
        decoded = rng.randrange(0, max_len - prompt)
        length = prompt + decoded
        pages = -(-length // layout.tokens_per_page)
        for h, p in enumerate(heads):
            assert simulated_kept(p, [*cuts, prompt], decoded, b, w) <= int(layout.capacity[0, h]) * pages
        assert layout.holds(bounds, b, length, num_budgeted_blocks(length, b, w))

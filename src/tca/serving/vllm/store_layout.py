"""How TCA's kept tokens fit pages of vLLM's pool (docs/design_vllm_memory.md section 2): the sizing, pure.

A compressed store page has the bytes of one window page: P tokens x HKV heads, so P * HKV entries of one head's
key and value. Entry 0 is the request's header (its per-head counts); the heads of a layer share the other
entries as fixed segments, head h holding c_h entries of each page. One store page stands for B_s tokens of the
sequence, the same B_s for every layer (vLLM's groups need one spec for all of them), so a request of L tokens owns
cdiv(L, B_s) store pages, and head h can hold c_h * cdiv(L, B_s) kept tokens.

That is enough for any chunking, because of Eq. 7's counts: a selection over J blocks keeps S(J) = sum_k k n_k(J)
tokens, and R = max over J of S(J) / J bounds the tokens kept per budgeted block whatever the chunks' J are (and
a decode step's t = max(1, floor E) too). Kept tokens after L are at most R * J(L) <= R * L / b, and
c_h >= R_h * B_s / b makes c_h * cdiv(L, B_s) >= R_h * L / b.

Shape letters: K retain counts, HKV KV heads, P tokens per vLLM page, b TCA block size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...backends.common.block_budgets import budget_counts
from ...budgets import block_keep_count, retain_counts

HEADER_ENTRIES = 1  # entry 0 of a request's first store page: its per-head counts
TOKENS_PER_PAGE_STEP = 8  # B_s is a multiple of this (vLLM's block sizes are)


def kept_per_block_bound(budgets: torch.Tensor, max_blocks: int) -> float:
    """R: the most tokens one budgeted block can add to the kept set, over every selection of 1..max_blocks blocks
    and a decode step's leaving block. budgets: [K] (normalised, float64 or float32)."""
    if max_blocks < 1:
        return float(block_keep_count(budgets.to(torch.float64)))
    p = budgets.to(torch.float64)
    blocks = torch.arange(1, max_blocks + 1, dtype=torch.float64)
    counts = budget_counts(p.expand(max_blocks, -1), blocks[:, None])  # [J, K]
    kept = (counts * retain_counts(2 ** (p.shape[-1] - 1))).sum(-1)
    return max(float((kept / blocks).max()), float(block_keep_count(p)))


@dataclass(frozen=True)
class StoreLayout:
    """Where each head's kept tokens live in store pages. capacity, offset: [layers, HKV] int64 entries per page."""

    page_tokens: int
    num_kv_heads: int
    tokens_per_page: int
    capacity: torch.Tensor
    offset: torch.Tensor

    @property
    def dense_fraction(self) -> float:
        """Store bytes per sequence token over a dense cache's (the same page bytes cover B_s tokens, not P)."""
        return self.page_tokens / self.tokens_per_page

    def holds(self, bounds: torch.Tensor, block_size: int, seq_len: int, num_blocks: int) -> bool:
        """Whether every head can hold R * J tokens after seq_len tokens (J = num_blocks budgeted blocks)."""
        pages = -(-seq_len // self.tokens_per_page)
        return bool((bounds * num_blocks <= self.capacity * pages).all())


def store_layout(bounds: torch.Tensor, block_size: int, page_tokens: int) -> StoreLayout:
    """The largest B_s (a multiple of 8) whose head segments fit one page in every layer.

    bounds: [layers, HKV] float, R per head (kept_per_block_bound). Raises ValueError when no B_s fits."""
    layers, heads = bounds.shape
    entries = page_tokens * heads - HEADER_ENTRIES

    def needs(tokens_per_page: int) -> torch.Tensor:  # [layers, HKV] entries per page
        return torch.ceil(bounds.to(torch.float64) * tokens_per_page / block_size).long()

    def fits(tokens_per_page: int) -> bool:
        return int(needs(tokens_per_page).sum(-1).max()) <= entries

    step = TOKENS_PER_PAGE_STEP
    if not fits(step):
        raise ValueError(
            f"a store page of {page_tokens} tokens x {heads} KV heads cannot hold {step} tokens' selections of every "
            f"head (bounds up to {float(bounds.max()):.1f} tokens per {block_size}-token block); use larger pages "
            "or budgets that keep fewer tokens"
        )
    # needs() grows with B_s: bisect the multiples of `step` up to the one where even R = 1 per head overflows
    low, high = 1, math.ceil(block_size * entries / max(1.0, float(bounds.min())) / step) + 1
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle * step) else (low, middle)
    tokens_per_page = low * step
    capacity = needs(tokens_per_page)
    offset = HEADER_ENTRIES + capacity.cumsum(-1) - capacity
    return StoreLayout(page_tokens, heads, tokens_per_page, capacity, offset)

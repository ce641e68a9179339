"""Decode with re-selection (docs/semantics.md section 5c), readable and exact.

The active set is the section 5 cache (a ReferenceKVCache); the evicted store keeps, per batch element and KV
head, every token section 5 would drop. Every `every` decode steps the active global part is chosen again among
all tokens before the window, by the current query, keeping its size.

Legend: b batch, h key/value head, g query head within its group, n tokens of one head, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import einsum

from ..dtypes import compute_dtype
from ..geometry import window_start
from .cache import ReferenceKVCache, _compress_leaving_block, attend_held, with_new_token
from .cache import prefill as section5_prefill


def _of_active(name: str) -> property:
    """The active set's attribute `name`, read and written through it."""
    return property(lambda self: getattr(self.active, name), lambda self, value: setattr(self.active, name, value))


@dataclass
class ReselectingReferenceCache:
    """The active set (`active`, section 5) plus the evicted store: ragged [b][h] keys, values, positions.

    every: decode steps between re-selections (>= 1); steps: decode steps done since the prefill; blocks: None,
    or the number of evicted blocks whose tokens are candidates (the "candidate blocks" of section 5c).
    """

    active: ReferenceKVCache
    evicted_keys: list[list[torch.Tensor]]
    evicted_values: list[list[torch.Tensor]]
    evicted_positions: list[list[torch.Tensor]]
    every: int
    steps: int = 0
    blocks: int | None = None

    backend = "reference"

    @classmethod
    def wrap(cls, cache: ReferenceKVCache, k: torch.Tensor, v: torch.Tensor, every: int,
             blocks: int | None = None) -> ReselectingReferenceCache:
        """The store after a prefill: every position before the cache's seq_len that `cache` does not hold.

        k, v [B, HKV, L, D]: the prompt's dense keys and values (L = cache.seq_len)."""
        B, H, L = k.shape[:3]
        dropped = [[_missing(cache.positions[b][h], L) for h in range(H)] for b in range(B)]
        return cls(
            active=cache,
            evicted_keys=[[k[b, h, dropped[b][h]] for h in range(H)] for b in range(B)],
            evicted_values=[[v[b, h, dropped[b][h]] for h in range(H)] for b in range(B)],
            evicted_positions=dropped,
            every=every,
            blocks=blocks,
        )

    # Shapes and sizes, as the section 5 cache reports them (lengths: what attention reads).
    @property
    def lengths(self) -> torch.Tensor:
        return self.active.lengths

    @property
    def evicted_lengths(self) -> torch.Tensor:
        """[B, HKV] tokens in the evicted store."""
        return torch.tensor([[p.numel() for p in row] for row in self.evicted_positions])

    @property
    def nbytes(self) -> int:
        """Keys and values held: the active set plus the evicted store."""
        return self.active.nbytes + self.evicted_nbytes

    @property
    def used_nbytes(self) -> int:
        return self.nbytes

    @property
    def offloaded_nbytes(self) -> int:
        return 0

    def record(self, *, num_query_heads: int | None = None, budgets: torch.Tensor | None = None) -> None:
        """Record what a prefill knows beyond the tensors (on the active set; None leaves it as it is)."""
        self.active.record(num_query_heads=num_query_heads, budgets=budgets)

    @property
    def evicted_nbytes(self) -> int:
        rows = (self.evicted_keys, self.evicted_values)
        return sum(t.numel() * t.element_size() for store in rows for row in store for t in row)

    # The active set's shapes and settings, read and written through it: explicit properties, not __getattr__, so
    # that the cache contract's isinstance check sees them (Python 3.12's runtime protocols look attributes up
    # statically).
    seq_len = _of_active("seq_len")
    config = _of_active("config")
    scale = _of_active("scale")
    dtype = _of_active("dtype")
    device = _of_active("device")
    num_kv_heads = _of_active("num_kv_heads")
    batch_size = _of_active("batch_size")
    head_dim = _of_active("head_dim")
    num_query_heads = _of_active("num_query_heads")
    keep_per_block = _of_active("keep_per_block")
    budgets = _of_active("budgets")
    seq_lens = _of_active("seq_lens")


def prefill(q, k, v, budgets: torch.Tensor, config, scale: float, every: int, blocks: int | None = None):
    """Section 4 over the prompt, plus the re-selecting cache (section 5 cache + evicted store).

    q: [B, HQ, L, D], k, v: [B, HKV, L, D]  ->  (out [B, HQ, L, D], ReselectingReferenceCache)."""
    out, cache = section5_prefill(q, k, v, budgets, config, scale)
    return out, ReselectingReferenceCache.wrap(cache, k, v, every, blocks)


def decode_and_reselect(q, k, v, cache: ReselectingReferenceCache) -> torch.Tensor:
    """One token at position i = cache.seq_len: section 5 (append, compress; the dropped tokens go to the store),
    re-select when steps % every == 0, attend over the active set.

    q: [B, HQ, 1, D], k, v: [B, HKV, 1, D]  ->  out [B, HQ, 1, D]. Mutates `cache`."""
    active = cache.active
    i = active.seq_len
    b_size, w = active.config.block_size, active.config.window
    lo_now, lo_before = window_start(i, b_size, w), window_start(i - 1, b_size, w)
    reselect = cache.steps % cache.every == 0
    B, HQ = q.shape[:2]
    H = active.num_kv_heads
    G = HQ // H
    dt = compute_dtype(q.dtype)
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            keys, values, positions = with_new_token(active, k, v, b, h)
            queries = q[b, h * G : (h + 1) * G, 0].to(dt)  # [G, D]
            store = [cache.evicted_keys[b][h], cache.evicted_values[b][h], cache.evicted_positions[b][h]]
            if lo_now > lo_before:  # section 5 step 2; the tokens it drops join the store
                keep = _compress_leaving_block(
                    queries, keys, positions, lo_before, lo_now, int(active.keep_per_block[h]), active.scale
                )
                store = _merge(store, [keys[~keep], values[~keep], positions[~keep]])
                keys, values, positions = keys[keep], values[keep], positions[keep]
            if reselect:
                (keys, values, positions), store = _reselect(
                    queries, [keys, values, positions], store, lo_now, active.scale, cache.blocks, b_size
                )
            out[b, h * G : (h + 1) * G, 0] = attend_held(queries, keys, values, active.scale).to(q.dtype)
            active.keys[b][h], active.values[b][h], active.positions[b][h] = keys, values, positions
            cache.evicted_keys[b][h], cache.evicted_values[b][h], cache.evicted_positions[b][h] = store
    active.seq_len = i + 1
    cache.steps += 1
    return out


def _reselect(queries, held, store, lo: int, scale: float, blocks: int | None = None, block_size: int = 0):
    """Section 5c "how": the candidates (held tokens before `lo`, and the store, or with `blocks` only its tokens in
    the chosen blocks) compete for the n places the held ones had; importance = the group's mean of a softmax
    over the candidates. Returns (held, store)."""
    keys, values, positions = held
    before = positions < lo
    n = int(before.sum())
    past = _merge([keys[before], values[before], positions[before]], store)  # every position before lo, in order
    from_store = torch.isin(past[2], store[2])
    candidate = ~from_store | _in_chosen_blocks(queries, past[0], past[2], from_store, blocks, block_size, scale)
    candidates = [x[candidate] for x in past]
    cand_keys, cand_values, cand_positions = candidates
    scores = einsum(queries, cand_keys.to(queries.dtype), "g d, n d -> g n").mul(scale).softmax(-1).mean(0)
    order = scores.sort(descending=True, stable=True).indices  # ties: the smaller position (candidates ascend)
    chosen = torch.zeros_like(cand_positions, dtype=torch.bool)
    chosen[order[:n]] = True
    window = ~before
    held = [torch.cat([c[chosen], x[window]]) for c, x in zip(candidates, held, strict=True)]
    not_candidates = [x[~candidate] for x in past]
    return held, _merge([c[~chosen] for c in candidates], not_candidates)


def _in_chosen_blocks(queries, keys, positions, from_store, blocks: int | None, block_size: int, scale: float):
    """Section 5c steps 1a-1d: which of the past tokens (keys [n, d], positions [n], the whole past before lo in
    order) lie in one of the `blocks` evicted blocks of largest bound. blocks None: every token."""
    if blocks is None:
        return torch.ones_like(from_store)
    block_of = positions // block_size
    evicted = block_of[from_store].unique()  # ascending block indices
    bounds = []
    for j in evicted.tolist():
        block_keys = keys[block_of == j].to(queries.dtype)  # all b positions of block j
        low, high = block_keys.amin(0), block_keys.amax(0)  # the summary [d]
        bound = torch.maximum(queries * low, queries * high).sum(-1).mul(scale).amax()  # max over the group's heads
        bounds.append(bound)
    if not bounds:
        return torch.zeros_like(from_store)
    order = torch.stack(bounds).sort(descending=True, stable=True).indices  # ties: the smaller block
    chosen = evicted[order[:blocks]]
    return torch.isin(block_of, chosen)


def _merge(a, b):
    """Two [keys, values, positions] sets joined in position order."""
    joined = [torch.cat([x, y]) for x, y in zip(a, b, strict=True)]
    order = joined[2].argsort(stable=True)
    return [x[order] for x in joined]


def _missing(held: torch.Tensor, length: int) -> torch.Tensor:
    """Sorted positions of [0, length) not in `held`."""
    present = torch.zeros(length, dtype=torch.bool, device=held.device)
    present[held] = True
    return (~present).nonzero().squeeze(-1)

"""The compressed KV cache and stateful decoding (docs/semantics.md section 5), readable and exact.

After a prefill of L tokens, KV head g of batch element b keeps exactly the positions
Sel_g U [J*b, L) (global part, then local part). Each decode step appends the new token, compresses the
block that leaves the window (if the window moved), then attends over everything the cache holds.

Legend: b batch, h key/value head, g query head within its group, n cached tokens of one head, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import einsum

from ..budgets import block_keep_count
from ..config import TCAConfig
from ..dtypes import compute_dtype
from ..geometry import window_start
from ..selection import Selection
from .attention import attend
from .selection import finite_softmax, select


@dataclass
class ReferenceKVCache:
    """Ragged per (batch element, KV head): keys[b][h] [n, D], values[b][h] [n, D], positions[b][h] [n].

    keep_per_block: [HKV] int64, t = max(1, floor(E[p_h])) tokens kept of each block leaving the window.
    seq_len: tokens seen so far (the next token has position seq_len).
    num_query_heads: HQ of the prefill (decode checks it), None if unknown; budgets: the [HKV, len(K)] budgets
    recorded for later streaming chunks, or None.
    """

    keys: list[list[torch.Tensor]]
    values: list[list[torch.Tensor]]
    positions: list[list[torch.Tensor]]
    keep_per_block: torch.Tensor
    config: TCAConfig
    scale: float
    seq_len: int
    num_query_heads: int | None = None
    budgets: torch.Tensor | None = None

    backend = "reference"

    def record(self, *, num_query_heads: int | None = None, budgets: torch.Tensor | None = None) -> None:
        """Record what a prefill knows beyond the tensors (each one given; None leaves it as it is)."""
        if num_query_heads is not None:
            self.num_query_heads = num_query_heads
        if budgets is not None:
            self.budgets = budgets

    @property
    def lengths(self) -> torch.Tensor:
        """[B, HKV] number of cached tokens per batch element and KV head."""
        return torch.tensor([[p.numel() for p in row] for row in self.positions])

    @property
    def nbytes(self) -> int:
        """Bytes held by cached keys and values (positions excluded): the KV memory that counts."""
        return sum(t.numel() * t.element_size() for rows in (self.keys, self.values) for row in rows for t in row)

    @property
    def seq_lens(self) -> list[int]:
        """Tokens seen by each sequence: one length for the whole batch."""
        return [self.seq_len] * self.batch_size

    @property
    def used_nbytes(self) -> int:
        """Bytes holding tokens: all of nbytes (ragged, exact: no spare room)."""
        return self.nbytes

    @property
    def offloaded_nbytes(self) -> int:
        return 0

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0][0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0][0].device

    @property
    def num_kv_heads(self) -> int:
        return len(self.positions[0])

    @property
    def batch_size(self) -> int:
        return len(self.positions)

    @property
    def head_dim(self) -> int:
        return self.keys[0][0].shape[-1]


def prefill(q, k, v, budgets: torch.Tensor, config: TCAConfig, scale: float):
    """Stateless TCA attention over the prompt, plus the cache that keeps Sel_g U [J*b, L).

    q: [B, HQ, L, D], k, v: [B, HKV, L, D], budgets: [HKV, len(K)]  ->  (out [B, HQ, L, D], cache).
    """
    selection: Selection = select(q, k, budgets, config, scale)
    out = attend(q, k, v, selection, scale)
    return out, cache_from_selection(k, v, selection, budgets, config, scale, num_query_heads=q.shape[1])


def cache_from_selection(k, v, selection: Selection, budgets: torch.Tensor, config: TCAConfig, scale: float,
                         num_query_heads: int | None = None, record_budgets: bool = False):
    """The cache that keeps Sel_g U [J*b, L) of dense keys and values (section 5, after a prefill).

    k, v: [B, HKV, L, D], selection made for these L keys, budgets: [HKV, len(K)]  ->  ReferenceKVCache.
    num_query_heads: HQ of the queries, recorded; record_budgets: whether the cache records `budgets` too.
    """
    L = k.shape[2]
    J_b = selection.num_blocks * config.block_size
    kept = selection.full_mask()
    kept[..., J_b:] = True  # the local part of the last query: [J*b, L)
    B, H = kept.shape[:2]
    positions = [[kept[b, h].nonzero().squeeze(-1) for h in range(H)] for b in range(B)]  # [b][h]: [n] ascending
    return ReferenceKVCache(
        keys=[[k[b, h, positions[b][h]] for h in range(H)] for b in range(B)],  # [b][h]: [n, D]
        values=[[v[b, h, positions[b][h]] for h in range(H)] for b in range(B)],  # [b][h]: [n, D]
        positions=positions,
        keep_per_block=block_keep_count(budgets).cpu(),
        config=config,
        scale=scale,
        seq_len=L,
        num_query_heads=num_query_heads,
        budgets=budgets if record_budgets else None,
    )


def decode(q, k, v, cache: ReferenceKVCache) -> torch.Tensor:
    """One token at position i = cache.seq_len: append, compress the block leaving the window, attend.

    q: [B, HQ, 1, D], k, v: [B, HKV, 1, D]  ->  out [B, HQ, 1, D]. Mutates `cache`.
    [choice] the leaving block is scored by the current query, before attending.
    """
    i = cache.seq_len
    b_size, w = cache.config.block_size, cache.config.window
    lo_now, lo_before = window_start(i, b_size, w), window_start(i - 1, b_size, w)
    B, HQ = q.shape[:2]
    H = cache.num_kv_heads
    G = HQ // H
    dt = compute_dtype(q.dtype)
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            keys, values, positions = with_new_token(cache, k, v, b, h)  # [n + 1, D], [n + 1, D], [n + 1]
            queries = q[b, h * G : (h + 1) * G, 0].to(dt)  # [G, D]
            if lo_now > lo_before:
                keep = _compress_leaving_block(
                    queries, keys, positions, lo_before, lo_now, int(cache.keep_per_block[h]), cache.scale
                )
                keys, values, positions = keys[keep], values[keep], positions[keep]  # [n', D], [n', D], [n']
            out[b, h * G : (h + 1) * G, 0] = attend_held(queries, keys, values, cache.scale).to(q.dtype)
            cache.keys[b][h], cache.values[b][h], cache.positions[b][h] = keys, values, positions
    cache.seq_len = i + 1
    return out


def with_new_token(cache: ReferenceKVCache, k, v, b: int, h: int):
    """(keys, values, positions) of sequence b, KV head h: what the cache holds, then token i = cache.seq_len."""
    held = cache.positions[b][h]
    new_position = torch.tensor([cache.seq_len], dtype=held.dtype, device=held.device)
    return (torch.cat([cache.keys[b][h], k[b, h]]), torch.cat([cache.values[b][h], v[b, h]]),
            torch.cat([held, new_position]))


def attend_held(queries, keys, values, scale: float) -> torch.Tensor:
    """One softmax over the held tokens: queries [G, D] in the compute dtype -> [G, D] (same dtype)."""
    logits = einsum(queries, keys.to(queries.dtype), "g d, n d -> g n") * scale
    return logits.softmax(-1) @ values.to(queries.dtype)


def _compress_leaving_block(queries, keys, positions, start: int, end: int, keep: int, scale: float):
    """Boolean mask over the cache: everything except the tokens of [start, end) that are not among the
    `keep` most important, importance = mean over the group of softmax over the block of scale * q . k."""
    dt = queries.dtype
    in_block = (positions >= start) & (positions < end)
    block_keys = keys[in_block].to(dt)  # [b, D]
    # [choice: non-finite] a non-finite logit is left out of the block's softmax (it scores 0)
    scores = finite_softmax(einsum(queries, block_keys, "g d, n d -> g n").mul(scale)).mean(0)
    order = scores.sort(descending=True, stable=True).indices  # ties: smaller position (positions ascend)
    kept_in_block = torch.zeros_like(scores, dtype=torch.bool)
    kept_in_block[order[:keep]] = True  # [b]: the top `keep` of the block
    result = ~in_block
    result[in_block] = kept_in_block
    return result


def cached_positions(cache: ReferenceKVCache) -> list[list[list[int]]]:
    """Positions per [b][h] as Python lists, for tests and inspection."""
    return [[p.tolist() for p in row] for row in cache.positions]

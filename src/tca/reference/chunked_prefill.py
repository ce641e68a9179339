"""Chunked and streaming prefill (docs/semantics.md section 5b), readable and exact.

A chunk brings the queries, keys and values of positions [s, e), n = e - s tokens.
- Exact: each chunk is section 4 on the prefix [0, e); the state is the dense KV; finishing compresses with
  the last chunk's last query into the cache a one-shot prefill makes.
- Streaming: the state is the compressed cache; each chunk appends, compresses the blocks that left the
  window (Eqs. 5-8 over those blocks, scored by the chunk's last query), then attends.

Legend: b batch, h key/value head, g query head within its group, i query row of the chunk, n cached tokens of
one head (ragged), d head dim, j leaving block, t position in a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import einsum, rearrange

from ..budgets import block_keep_count
from ..config import TCAConfig
from ..dtypes import compute_dtype
from ..geometry import window_start
from .attention import attend
from .cache import ReferenceKVCache, cache_from_selection
from .selection import block_budgets, block_priority, last_query_importance, select, select_tokens


@dataclass
class DensePrefillState:
    """An exact chunked prefill in progress: every key and value so far, densely.

    keys, values: [B, HKV, L, D]; last_query: [B, HQ, D], the latest chunk's last query (finishing selects
    with it); budgets: [HKV, len(K)] float64.
    """

    keys: torch.Tensor
    values: torch.Tensor
    last_query: torch.Tensor
    budgets: torch.Tensor
    config: TCAConfig
    scale: float

    @property
    def seq_len(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of the dense keys and values held: the KV memory of an exact prefill."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


def exact_chunk(q, k, v, state: DensePrefillState | None, budgets: torch.Tensor, config: TCAConfig, scale: float):
    """One exact chunk: section 4 on the prefix, i.e. the chunk's queries over all keys so far.

    q: [B, HQ, n, D], k, v: [B, HKV, n, D]  ->  (out [B, HQ, n, D], a new DensePrefillState; `state` is unchanged).
    [choice: each chunk is the stateless rule on its prefix]
    """
    keys = k if state is None else torch.cat([state.keys, k], dim=2)
    values = v if state is None else torch.cat([state.values, v], dim=2)
    out = attend(q, keys, values, select(q, keys, budgets, config, scale), scale)
    return out, DensePrefillState(keys, values, q[:, :, -1].clone(), budgets, config, scale)


def exact_finish(state: DensePrefillState) -> ReferenceKVCache:
    """Compress with the last chunk's last query: the same cache as a one-shot prefill (section 5)."""
    selection = select(state.last_query[:, :, None], state.keys, state.budgets, state.config, state.scale)
    # The budgets are recorded, so the cache can later take streaming chunks with the same p.
    return cache_from_selection(state.keys, state.values, selection, state.budgets, state.config, state.scale,
                                num_query_heads=state.last_query.shape[1], record_budgets=True)


def empty_cache(batch_size: int, num_kv_heads: int, head_dim: int, dtype, device, budgets, config, scale):
    """The cache of a streaming prefill before its first chunk: no token for any head."""
    B, H = batch_size, num_kv_heads

    def nothing(shape, dt):
        return [[torch.empty(shape, dtype=dt, device=device) for _ in range(H)] for _ in range(B)]

    cache = ReferenceKVCache(
        keys=nothing((0, head_dim), dtype),
        values=nothing((0, head_dim), dtype),
        positions=nothing((0,), torch.int64),
        keep_per_block=block_keep_count(budgets).cpu(),
        config=config,
        scale=scale,
        seq_len=0,
        budgets=budgets,
    )
    return cache


def streaming_chunk(q, k, v, cache: ReferenceKVCache, budgets: torch.Tensor) -> torch.Tensor:
    """One streaming chunk: append, compress the blocks that left the window, attend. Mutates `cache`.

    q: [B, HQ, n, D], k, v: [B, HKV, n, D], budgets: [HKV, len(K)]  ->  out [B, HQ, n, D].
    [choice: the blocks leaving during a chunk are budgeted together by Eqs. 5-8, scored by the chunk's last
    query] [choice: compress before attending, as decoding does]
    """
    config, scale = cache.config, cache.scale
    b_size, w = config.block_size, config.window
    s, n = cache.seq_len, k.shape[2]
    e = s + n
    lo_before = window_start(s - 1, b_size, w) if s > 0 else 0
    lo_after = window_start(e - 1, b_size, w)
    B, HQ = q.shape[:2]
    H = cache.num_kv_heads
    G = HQ // H
    dt = compute_dtype(q.dtype)
    query_positions = torch.arange(s, e, device=q.device)
    lo = window_start(query_positions, b_size, w)[:, None]  # [n, 1]
    out = torch.empty_like(q)
    new_keys, new_values, new_positions = [], [], []
    for bi in range(B):
        row_keys, row_values, row_positions = [], [], []
        for h in range(H):
            keys = torch.cat([cache.keys[bi][h], k[bi, h]])
            values = torch.cat([cache.values[bi][h], v[bi, h]])
            positions = torch.cat([cache.positions[bi][h], query_positions.to(cache.positions[bi][h].device)])
            queries = q[bi, h * G : (h + 1) * G]  # [G, n, D]
            kept = torch.ones_like(positions, dtype=torch.bool)
            if lo_after > lo_before:
                leaving = (positions >= lo_before) & (positions < lo_after)  # contiguous, whole blocks
                kept[leaving] = _select_in_leaving_blocks(
                    queries[:, -1], keys, leaving, budgets[h : h + 1], config, scale
                )
            positions_row = positions.to(q.device)
            visible = (kept & (positions_row < lo)) | (
                (positions_row >= lo) & (positions_row <= query_positions[:, None])
            )
            logits = einsum(queries.to(dt), keys.to(dt), "g i d, n d -> g i n") * scale
            weights = logits.masked_fill(~visible, float("-inf")).softmax(-1)
            out[bi, h * G : (h + 1) * G] = einsum(weights, values.to(dt), "g i n, n d -> g i d").to(q.dtype)
            row_keys.append(keys[kept])
            row_values.append(values[kept])
            row_positions.append(positions[kept])
        new_keys.append(row_keys)
        new_values.append(row_values)
        new_positions.append(row_positions)
    # Every head done: only now does the cache change (an error above leaves it as it was).
    cache.keys, cache.values, cache.positions, cache.seq_len = new_keys, new_values, new_positions, e
    return out


def _select_in_leaving_blocks(q_last, keys, leaving, budgets, config: TCAConfig, scale: float) -> torch.Tensor:
    """Sections 3.1-3.4 on the leaving blocks of one KV head: which of their tokens stay.

    q_last: [G, D] (the chunk's last query, the group's heads), keys: [n, D] (all the head holds),
    leaving: [n] bool over J_c * b consecutive positions, budgets: [1, len(K)]  ->  [J_c * b] bool.
    """
    b_size = config.block_size
    # Eq. 5 over every key the cache holds (kept past, window, chunk), then restricted to the leaving blocks.
    importance = last_query_importance(rearrange(q_last, "g d -> 1 g d"), rearrange(keys, "n d -> 1 1 n d"), scale)
    in_blocks = importance[..., leaving]  # [1, 1, J_c * b]
    num_blocks = in_blocks.shape[-1] // b_size
    priority = block_priority(in_blocks, num_blocks, b_size, config.alpha, config.mass_scale)  # Eq. 6, J = J_c
    per_block = block_budgets(priority, budgets, b_size)  # Eq. 7 over the J_c blocks
    return select_tokens(in_blocks, per_block, b_size)[0, 0]  # Eq. 8

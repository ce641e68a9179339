"""Chunked and streaming prefill (docs/semantics.md section 5b) over the PackedKVCache, in torch ops.

Shared by the backends that prefill into the PackedKVCache: a backend supplies its own attention and selection
functions (as callables), so the torch backend runs it with its chunked torch attention and Triton with its
sparse kernel. Streaming chunks choose within the leaving blocks with the one torch copy of Eqs. 5-8
(selection_torch.py) on every backend.

- Exact: the dense keys and values grow chunk by chunk in one buffer (capacity doubles, so appending is
  amortised O(n)); each chunk is the backend's stateless attention on the prefix; finishing selects with the
  last chunk's last query and builds the cache a one-shot prefill builds.
- Streaming: each chunk appends, compresses the J_c blocks that left the window with the chunk's last query
  (Eqs. 5-8 over those blocks), then attends. The chunk's queries see a *virtual sequence*: the kept global
  tokens of each head (padded to a multiple of b rows, the padding never selected) followed densely by
  positions [lo(s - 1), e). Position p >= lo(s - 1) sits at row N_pad + p - lo(s - 1), a shift by a multiple
  of b, so the window starts, block boundaries and "selected before lo(i)" of the virtual sequence are those of
  the real one, and any attention given a selection (section 4 with LQ < L) computes step 3 exactly.

Shape letters: B batch, HQ query heads, HKV key/value heads, G = HQ / HKV, n chunk tokens, D head dim,
b block size, J_c blocks leaving during the chunk, N_pad padded global rows, V virtual keys, P selectable rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...budgets import block_keep_count
from ...config import TCAConfig
from ...geometry import window_start
from .packed_cache import PackedKVCache
from .selection_torch import choose_leaving, last_query_importance


@dataclass
class DenseKV:
    """An exact chunked prefill in progress: the dense keys and values of every position so far.

    buffer_k, buffer_v: [B, HKV, capacity, D], the first `length` positions valid (a later chunk appends past
    them, so an earlier state stays valid if that chunk fails); last_query: [B, HQ, D] of the latest chunk.
    """

    buffer_k: torch.Tensor
    buffer_v: torch.Tensor
    length: int
    last_query: torch.Tensor
    budgets: torch.Tensor
    config: TCAConfig
    scale: float

    @property
    def keys(self) -> torch.Tensor:
        return self.buffer_k[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self.buffer_v[:, :, : self.length]

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the dense keys and values (capacity included)."""
        return sum(t.numel() * t.element_size() for t in (self.buffer_k, self.buffer_v))


def append_dense(state: DenseKV | None, q, k, v, budgets, config: TCAConfig, scale: float) -> DenseKV:
    """A new DenseKV holding `state`'s positions then the chunk k, v [B, HKV, n, D]; `state` stays valid."""
    n = k.shape[2]
    start = 0 if state is None else state.length
    end = start + n
    if state is None or state.buffer_k.shape[2] < end:
        capacity = max(end, 2 * (0 if state is None else state.buffer_k.shape[2]))
        B, HKV, _, D = k.shape
        buffer_k, buffer_v = k.new_empty(B, HKV, capacity, D), v.new_empty(B, HKV, capacity, D)
        if state is not None:
            buffer_k[:, :, :start], buffer_v[:, :, :start] = state.keys, state.values
    else:
        buffer_k, buffer_v = state.buffer_k, state.buffer_v
    buffer_k[:, :, start:end], buffer_v[:, :, start:end] = k, v
    return DenseKV(buffer_k, buffer_v, end, q[:, :, -1].clone(), budgets, config, scale)


def exact_chunk(attention, q, k, v, state: DenseKV | None, budgets, config: TCAConfig, scale: float):
    """One exact chunk: `attention` (a backend's stateless section 4) of the chunk's queries over every key so
    far. q [B, HQ, n, D], k, v [B, HKV, n, D] -> (out [B, HQ, n, D], new DenseKV).
    [choice: each chunk is the stateless rule on its prefix]"""
    new = append_dense(state, q, k, v, budgets, config, scale)
    return attention(q, new.keys, new.values, budgets, config, scale), new


def exact_finish(select_indices, kernels, state: DenseKV) -> PackedKVCache:
    """The one-shot prefill's cache: selection from the last chunk's last query over the dense keys.
    select_indices(q, k, budgets, config, scale) -> (indices [B, HKV, N] sorted, counts [B, HKV]); the cache takes
    its counts from the budgets, on the host."""
    keys, values = state.keys, state.values
    indices, _ = select_indices(state.last_query[:, :, None], keys, state.budgets, state.config, state.scale)
    # The budgets are recorded: the cache can take streaming chunks with the same p later.
    return PackedKVCache.from_selected(keys, values, indices, state.budgets, state.config, state.scale, kernels=kernels,
                                       num_query_heads=state.last_query.shape[1], record_budgets=True)


def empty_cache(batch_size, num_kv_heads, head_dim, dtype, device, budgets, config: TCAConfig, scale: float, kernels):
    """A PackedKVCache holding no token (a streaming prefill's start): an empty ring, empty segments."""
    B, H, D = batch_size, num_kv_heads, head_dim
    cache = PackedKVCache(
        config=config, scale=scale, keep_per_block=block_keep_count(budgets), seq_lens=[0] * B,
        local_k=torch.zeros(B, H, 0, D, dtype=dtype, device=device),
        local_v=torch.zeros(B, H, 0, D, dtype=dtype, device=device),
        global_k=torch.zeros(1, D, dtype=dtype, device=device), global_v=torch.zeros(1, D, dtype=dtype, device=device),
        global_pos=torch.zeros(1, dtype=torch.int64, device=device),
        global_len_host=torch.zeros(B, H, dtype=torch.int64), global_cap=torch.zeros(B, H, dtype=torch.int64),
        budgets=budgets, kernels=kernels,
    )
    return cache


def streaming_chunk(attend, q, k, v, cache: PackedKVCache, budgets) -> torch.Tensor:
    """One streaming chunk [s, e) on a PackedKVCache: append, compress the blocks that left the window, attend.

    q [B, HQ, n, D], k, v [B, HKV, n, D], budgets [HKV, len(K)] -> out [B, HQ, n, D]. Mutates `cache` only
    once the output is computed (an error before leaves it as it was).
    attend(q, keys [B, HKV, V, D], values, selected [B, HKV, P] bool, config, scale) -> out, section 4 on the
    virtual sequence with the queries at its end.
    [choice: the blocks leaving during a chunk are budgeted together by Eqs. 5-8, scored by the chunk's last
    query] [choice: compress before attending, as decoding does]
    """
    if len(set(cache.seq_lens)) > 1:
        raise ValueError(
            f"this cache holds sequences of different lengths {cache.seq_lens} (a left-padded batch); a streaming "
            "chunk continues sequences of one length: prefill them one at a time"
        )
    config = cache.config
    b, w = config.block_size, config.window
    s, n = cache.seq_len, k.shape[2]
    e = s + n
    lo_before = window_start(s - 1, b, w) if s else 0
    lo_after = window_start(e - 1, b, w)
    num_leaving = (lo_after - lo_before) // b
    keys, values, held, n_pad = _virtual_sequence(cache, k, v, lo_before)
    kept = held.new_zeros(*held.shape[:2], 0)
    if num_leaving:
        # Eq. 5 over every key held after appending (holes excluded), then the leaving blocks' share of it.
        importance = last_query_importance(q[:, :, -1], keys, cache.scale, held)
        leaving = importance[..., n_pad : n_pad + num_leaving * b]
        kept = choose_leaving(leaving, num_leaving, budgets.to(q.device), config)
    selected = torch.cat([held, kept], dim=-1)  # [B, HKV, P]: P = N_pad + J_c * b
    out = attend(q, keys, values, selected, config, cache.scale)
    _commit(cache, keys, values, kept, n_pad, lo_before, k, v)
    cache.record(budgets=budgets)
    return out


def entry_points(*, attend) -> type:
    """A base class giving a backend the four chunked-prefill entry points of the registry (exact_chunk,
    exact_finish, empty_cache, streaming_chunk) over the functions above.

    What the backend already has, it is read from the backend class at call time: its stateless `attention`
    (exact chunks), `select_indices` (finishing) and `cache_kernels` (the PackedKVCache's decode kernels). What
    only streaming chunks need is passed here: attend, as streaming_chunk takes it.
    """

    class ChunkedPrefill:
        @classmethod
        def exact_chunk(cls, q, k, v, state, budgets, config, scale):
            return exact_chunk(cls.attention, q, k, v, state, budgets, config, scale)

        @classmethod
        def exact_finish(cls, state):
            return exact_finish(cls.select_indices, cls.cache_kernels, state)

        @classmethod
        def empty_cache(cls, batch_size, num_kv_heads, head_dim, dtype, device, budgets, config, scale):
            return empty_cache(
                batch_size, num_kv_heads, head_dim, dtype, device, budgets, config, scale, cls.cache_kernels
            )

        @staticmethod
        def streaming_chunk(q, k, v, cache, budgets):
            return streaming_chunk(attend, q, k, v, cache, budgets)

    return ChunkedPrefill


def _virtual_sequence(cache: PackedKVCache, k, v, lo_before: int):
    """keys, values [B, HKV, N_pad + (s - lo_before) + n, D]: each head's kept global tokens (padded with holes to
    N_pad rows, a multiple of b), then positions [lo_before, s) from the ring, then the chunk. Also held
    [B, HKV, N_pad] bool (the real global rows) and N_pad."""
    b = cache.config.block_size
    s = cache.seq_len
    longest = int(cache.global_len_host.max()) if cache.global_len_host.numel() else 0
    n_pad = -(-longest // b) * b
    offsets = torch.arange(n_pad, device=cache.device)
    held = offsets < cache.global_len[..., None]  # [B, HKV, N_pad]
    rows = torch.where(held, cache.global_start[..., None] + offsets, cache.global_k.shape[0] - 1)
    parts_k, parts_v = [cache.global_k[rows]], [cache.global_v[rows]]
    if s > lo_before:
        slots = torch.arange(lo_before, s, device=cache.device) % cache.window_slots
        parts_k.append(cache.local_k[:, :, slots])
        parts_v.append(cache.local_v[:, :, slots])
    parts_k.append(k.to(cache.dtype))
    parts_v.append(v.to(cache.dtype))
    return torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2), held, n_pad


def _commit(cache: PackedKVCache, keys, values, kept, n_pad: int, lo_before: int, k, v) -> None:
    """Append the kept tokens of the leaving blocks to the global segments, the chunk to the ring; advance."""
    if kept.shape[-1]:
        counts = kept.sum(-1)
        counts_host = counts.cpu()  # the chunk's one host synchronisation
        width = int(counts_host.max())
        # Block offsets of the kept tokens, in order, padded to the widest head (stable sort puts kept first).
        within = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices[..., :width]  # [B, HKV, width]
        gather = (n_pad + within)[..., None].expand(-1, -1, -1, keys.shape[-1])
        cache.append_kept(keys.gather(2, gather), values.gather(2, gather), lo_before + within, counts_host)
    cache.append_chunk(k, v)

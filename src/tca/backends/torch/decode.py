"""Stateful decoding on the PackedKVCache (docs/semantics.md section 5), vectorised over batch and KV heads.

Token i = cache.seq_len: (1) if the window moves, the block [lo(i-1), lo(i)) leaving it is scored by the current
query (mean over the group of a softmax over the block) and its top-t go to the global segments (ties to the
smaller position); (2) k_i, v_i go into ring slot i % W; (3) one softmax over global segment + local window.

Shape letters: B batch, HQ query heads, HKV key/value heads, G = HQ / HKV, D head dim, b block size,
T kept tokens of the leaving block (max over heads), N global tokens (padded to the max over heads), W ring slots.
"""

from __future__ import annotations

import math

import torch

from ...packed_cache import PackedKVCache
from .selection import compute_dtype


def compress_leaving_block(cache: PackedKVCache, q: torch.Tensor, start: int, end: int) -> None:
    """Append the top-t tokens of positions [start, end) to the global segments. q: [B, HKV, G, D] in compute dtype."""
    dt = q.dtype
    block_k = cache.local_k[:, :, cache.local_slot_range(start, end)]  # [B, HKV, b, D]
    block_v = cache.local_v[:, :, cache.local_slot_range(start, end)]
    scores = torch.matmul(q, block_k.to(dt).transpose(-1, -2)).mul(cache.scale).softmax(-1).mean(2)  # [B, HKV, b]
    keep = cache.keep_per_block.to(q.device)  # [HKV]
    T = int(cache.keep_per_block.max())  # the host copy: no device sync
    top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :T]  # ties: smaller offset first
    valid = torch.arange(T, device=q.device) < keep[:, None]  # [HKV, T]
    # Position order inside the segment: sort the kept offsets, invalid ones last.
    top = torch.where(valid, top, end - start).sort(dim=-1).values
    rows = top.clamp_max(end - start - 1)[..., None].expand(-1, -1, -1, block_k.shape[-1])
    B = q.shape[0]
    cache.append_global(block_k.gather(2, rows), block_v.gather(2, rows), start + top, keep.expand(B, -1))


def attend_cache(cache: PackedKVCache, q: torch.Tensor) -> torch.Tensor:
    """One softmax over everything the cache holds per (b, h). q: [B, HKV, G, D] compute dtype -> [B, HKV, G, D]."""
    dt, scale = q.dtype, cache.scale
    g_k, g_v, _, g_valid = cache.global_padded()  # [B, HKV, N, D], [B, HKV, N]
    l_valid = cache.local_valid_slots()  # [W]
    logits_g = torch.matmul(q, g_k.to(dt).transpose(-1, -2)).mul_(scale)
    logits_g.masked_fill_(~g_valid[:, :, None], -math.inf)
    logits_l = torch.matmul(q, cache.local_k.to(dt).transpose(-1, -2)).mul_(scale)
    logits_l.masked_fill_(~l_valid, -math.inf)
    weights = torch.cat([logits_g, logits_l], dim=-1).softmax(-1)  # [B, HKV, G, N + W]
    n = logits_g.shape[-1]
    return torch.matmul(weights[..., :n], g_v.to(dt)) + torch.matmul(weights[..., n:], cache.local_v.to(dt))


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PackedKVCache) -> torch.Tensor:
    """q [B, HQ, 1, D], k, v [B, HKV, 1, D] of position cache.seq_len -> out [B, HQ, 1, D]. Mutates the cache."""
    B, HQ, _, D = q.shape
    HKV = cache.num_kv_heads
    qg = q[:, :, 0].to(compute_dtype(q.dtype)).reshape(B, HKV, HQ // HKV, D)
    block = cache.leaving_block()
    if block is not None:
        compress_leaving_block(cache, qg, *block)
    cache.append_local(k.to(cache.dtype), v.to(cache.dtype))
    return attend_cache(cache, qg).reshape(B, HQ, 1, D).to(q.dtype)

"""The device work of a decode step in torch (any device; the caches' default `kernels`).

On the PackedKVCache every operation is predicated on the device (no host branch on data, no host read of a
length), so a step can be captured in a CUDA graph: a sequence whose window does not move writes its compressed
rows to the scratch row. `attend_dense` serves the DenseKVCache (its length is a host number: eager steps only;
graph decoding captures the cache's packed copy).

Shape letters: B batch, HQ query heads, HKV key/value heads, G = HQ / HKV, D head dim, b block size,
T = max keep count, N padded global rows, W ring slots.
"""

from __future__ import annotations

import math

import torch

from ...dtypes import compute_dtype
from ...geometry import window_start


def grouped_query(cache, q: torch.Tensor) -> torch.Tensor:
    """q [B, HQ, 1, D] -> [B, HKV, G, D] in the compute dtype."""
    B, HQ, _, D = q.shape
    return q[:, :, 0].to(compute_dtype(q.dtype)).reshape(B, cache.num_kv_heads, HQ // cache.num_kv_heads, D)


def ring_write(cache, k: torch.Tensor, v: torch.Tensor) -> None:
    """k, v [B, HKV, 1, D] of position positions_t[b] into slot positions_t[b] % W of each sequence."""
    B = cache.batch_size
    slot = cache.positions_t % cache.window_slots  # [B]
    rows = torch.arange(B, device=cache.device)
    cache.local_k[rows, :, slot] = k[:, :, 0].to(cache.dtype)
    cache.local_v[rows, :, slot] = v[:, :, 0].to(cache.dtype)


def leaving_block_importance(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Section 5's importance of the tokens of a block leaving the window: the group's mean of a softmax over the
    block of scale q . k, a non-finite logit left out (scores 0; section 8). q [..., G, D], k [..., b, D] -> [..., b]."""
    logits = torch.matmul(q, k.to(q.dtype).transpose(-1, -2)).mul(scale)
    # [choice: non-finite] a non-finite logit is left out of the block's softmax: it scores 0 (section 8)
    logits = logits.masked_fill(~torch.isfinite(logits), -math.inf)
    return logits.softmax(-1).nan_to_num(nan=0.0).mean(-2)


def compress(cache, q: torch.Tensor) -> None:
    """Section 5 step 1 for every sequence: block [lo(i-1), lo(i)) of position i = positions_t[b] is scored by
    the group mean of a softmax over the block; its keep[h] best tokens (ties: smaller position) are appended,
    in position order, to segment (b, h). Sequences whose window does not move append nothing."""
    bsz, w, W = cache.config.block_size, cache.config.window, cache.window_slots
    T = cache.keep_max
    if T == 0:
        return
    qg = grouped_query(cache, q)
    B, HKV, G, D = qg.shape
    i = cache.positions_t  # [B]
    start = window_start(i - 1, bsz, w)
    moves = window_start(i, bsz, w) > start  # [B]
    offsets = torch.arange(bsz, device=cache.device)
    slots = (start[:, None] + offsets) % W  # [B, b]
    gather = slots[:, None, :, None].expand(B, HKV, bsz, D)
    block_k = cache.local_k.gather(2, gather)  # [B, HKV, b, D]
    block_v = cache.local_v.gather(2, gather)
    scores = leaving_block_importance(qg, block_k, cache.scale)  # [B, HKV, b]
    top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :T]  # [B, HKV, T]
    keep = cache.keep[None, :] * moves[:, None]  # [B, HKV] rows appended
    valid = torch.arange(T, device=cache.device) < keep[..., None]  # [B, HKV, T]
    top = torch.where(valid, top, bsz).sort(dim=-1).values  # position order, invalid last
    picked = top.clamp_max(bsz - 1)[..., None].expand(-1, -1, -1, D)
    scratch = cache.global_k.shape[0] - 1
    rows = torch.where(valid, (cache.global_start + cache.global_len)[..., None] + torch.arange(T, device=cache.device), scratch)
    cache.global_k[rows] = block_k.gather(2, picked)
    cache.global_v[rows] = block_v.gather(2, picked)
    cache.global_pos[rows] = start[:, None, None] + top
    cache.global_len += keep


def local_valid(cache) -> torch.Tensor:
    """[B, W] bool: ring slots holding a position of each sequence's current window [lo(i), i]."""
    i = cache.positions_t - 1  # the newest position (after append)
    W = cache.window_slots
    slots = torch.arange(W, device=cache.device)
    held = i[:, None] - (i[:, None] - slots) % W  # the position each slot holds: the latest p <= i with p % W == slot
    lo = window_start(i, cache.config.block_size, cache.config.window)
    return (held >= lo[:, None]) & (held >= 0)


def attend(cache, q: torch.Tensor) -> torch.Tensor:
    """One softmax over the global segment and the local window of every (b, h): q [B, HQ, 1, D] -> same."""
    qg = grouped_query(cache, q)
    B, HKV, G, D = qg.shape
    dt = qg.dtype
    # Static shapes when replaying a graph: pad to the largest capacity; else to the longest segment (host).
    n = int(cache.global_cap.max() if cache.static else cache.global_len_host.max()) if cache.global_cap.numel() else 0
    offsets = torch.arange(n, device=cache.device)
    g_valid = offsets < cache.global_len[..., None]  # [B, HKV, N]
    rows = torch.where(g_valid, cache.global_start[..., None] + offsets, cache.global_k.shape[0] - 1)
    logits_g = torch.matmul(qg, cache.global_k[rows].to(dt).transpose(-1, -2)).mul_(cache.scale)
    logits_g.masked_fill_(~g_valid[:, :, None], -math.inf)
    logits_l = torch.matmul(qg, cache.local_k.to(dt).transpose(-1, -2)).mul_(cache.scale)
    logits_l.masked_fill_(~local_valid(cache)[:, None, None], -math.inf)
    weights = torch.cat([logits_g, logits_l], dim=-1).softmax(-1)  # [B, HKV, G, N + W]
    out = torch.matmul(weights[..., :n], cache.global_v[rows].to(dt)) + torch.matmul(weights[..., n:], cache.local_v.to(dt))
    return out.reshape(B, HKV * G, 1, D).to(q.dtype)


def attend_dense(cache, q: torch.Tensor) -> torch.Tensor:
    """Exact attention of q [B, HQ, 1, D] over every token of a DenseKVCache (SDPA; padding columns masked)."""
    n = cache.columns
    keys, values = cache.keys[:, :, :n], cache.values[:, :, :n]
    G = q.shape[1] // cache.num_kv_heads
    mask = cache.key_mask()[..., :n] if any(cache.pads) else None
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=cache.scale,
                                                            enable_gqa=G > 1)

"""Exact dense causal attention, TCA with dense budgets (every token kept): what backend="auto" runs below the
measured crossover, where the sparse kernels cannot beat the fused dense ones (its cache: dense_cache.py).

With all budget mass on k = b, TCA keeps every token of every budgeted block (docs/semantics.md section 1):
its attention is causal attention and its cache holds every position, so nothing is selected here.
Shape letters: B batch, HQ query heads, HKV key/value heads, L keys, LQ queries, D head dim, b block size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...budgets import dense_budgets
from ...geometry import num_budgeted_blocks
from .packed_cache import PackedKVCache


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA, causal, queries aligned to the end of the keys. q [B, HQ, LQ, D], k, v [B, HKV, L, D]."""
    LQ, L = q.shape[2], k.shape[2]
    G = q.shape[1] // k.shape[1]
    if LQ not in (L, 1):
        mask = torch.ones(LQ, L, dtype=torch.bool, device=q.device).tril(L - LQ)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=G > 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=LQ == L and L > 1, scale=scale, enable_gqa=G > 1)


def packed_cache(k, v, config, scale: float, kernels=None) -> PackedKVCache:
    """Every position of k, v [B, HKV, L, D] as a PackedKVCache decoding with dense budgets (keep = b per leaving
    block): the dense path's cache in the form a CUDA graph captures (DenseKVCache.to_packed)."""
    B, HKV, L, _ = k.shape
    n = num_budgeted_blocks(L, config.block_size, config.window) * config.block_size
    indices = torch.arange(n, device=k.device, dtype=torch.int64).expand(B, HKV, n)
    counts = torch.full((B, HKV), n, dtype=torch.int64)
    keep = torch.full((HKV,), config.block_size, dtype=torch.int64)
    return PackedKVCache.from_indices(k, v, indices, counts, keep, config, scale, kernels=kernels)


def budgets(num_kv_heads: int, config) -> torch.Tensor:
    """Dense budgets [HKV, len(K)] float64 (the budgets the dense path stands for)."""
    return dense_budgets(config.block_size).expand(num_kv_heads, -1).clone()

"""TCA attention given a selection (docs/semantics.md section 4, paper Eq. 2), readable and exact.

Legend (einops letters):
    b  batch     h  key/value head (HKV)     g  query head within its group (G)
    i  query row (LQ; aligned to the end of the keys)     l  key position (L)     d  head dim
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange, repeat

from ..dtypes import compute_dtype
from ..geometry import window_start
from ..selection import Selection


def kept_key_mask(selection: Selection, query_positions: torch.Tensor) -> torch.Tensor:
    """S(i) as a mask: selected global keys before lo(i), plus the local keys [lo(i), i].

    query_positions: [LQ] int64  ->  [B, HKV, LQ, L] bool. Local and global parts never overlap.
    """
    L, b, w = selection.seq_len, selection.block_size, selection.window
    keys = torch.arange(L, device=query_positions.device)
    lo = window_start(query_positions, b, w)[:, None]  # [LQ, 1]
    local = (keys >= lo) & (keys <= query_positions[:, None])  # [LQ, L]
    global_ = selection.full_mask().to(query_positions.device)[:, :, None, :] & (keys < lo)
    return global_ | local


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    scale: float,
    return_lse: bool = False,
):
    """Eq. 2: one softmax over the kept set S(i) of each query row (global and local together).

    q: [B, HQ, LQ, D], k, v: [B, HKV, L, D]; query row r sits at position L - LQ + r.
    Returns out [B, HQ, LQ, D] in q's dtype, and lse [B, HQ, LQ] (fp32 or fp64) when asked for.
    """
    dt = compute_dtype(q.dtype)
    L, LQ, HKV = k.shape[2], q.shape[2], k.shape[1]
    positions = torch.arange(L - LQ, L, device=q.device)
    kept = kept_key_mask(selection, positions)  # [B, HKV, LQ, L]
    qg = rearrange(q.to(dt), "b (h g) i d -> b h g i d", h=HKV)
    logits = einsum(qg, k.to(dt), "b h g i d, b h l d -> b h g i l") * scale
    logits = logits.masked_fill(~kept[:, :, None], float("-inf"))
    weights = logits.softmax(dim=-1)
    out = weighted_values(weights, kept, v.to(dt))
    out = rearrange(out, "b h g i d -> b (h g) i d").to(q.dtype)
    if not return_lse:
        return out
    lse = rearrange(logits.logsumexp(dim=-1), "b h g i -> b (h g) i")
    return out, lse


def weighted_values(weights: torch.Tensor, kept: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_l weights[.., i, l] v[l] where a non-finite value reaches only the rows that keep it. [choice: non-finite]

    weights [B, HKV, G, LQ, L] (0 outside the kept set), kept [B, HKV, LQ, L] bool, v [B, HKV, L, D].
    Plain 0 * NaN would spread a NaN value to every row; instead the non-finite entries are zeroed and the
    output entries (row, d) whose kept set holds a non-finite v[:, d] are set to NaN.
    """
    bad = ~torch.isfinite(v)
    if not bool(bad.any()):
        return einsum(weights, v, "b h g i l, b h l d -> b h g i d")
    out = einsum(weights, v.masked_fill(bad, 0), "b h g i l, b h l d -> b h g i d")
    hit = einsum(kept.to(v.dtype), bad.to(v.dtype), "b h i l, b h l d -> b h i d") > 0
    return out.masked_fill(hit[:, :, None], float("nan"))


def dense_causal_attention(q, k, v, scale: float) -> torch.Tensor:
    """Plain bottom-right causal attention in the compute dtype; the limit TCA reaches with dense budgets."""
    dt = compute_dtype(q.dtype)
    L, LQ, HKV = k.shape[2], q.shape[2], k.shape[1]
    G = q.shape[1] // HKV
    positions = torch.arange(L - LQ, L, device=q.device)
    causal = torch.arange(L, device=q.device) <= positions[:, None]
    logits = einsum(q.to(dt), repeat(k.to(dt), "b h l d -> b (h g) l d", g=G), "b q i d, b q l d -> b q i l") * scale
    weights = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    return einsum(weights, repeat(v.to(dt), "b h l d -> b (h g) l d", g=G), "b q i l, b q l d -> b q i d")

"""The selection on the device in Triton kernels (docs/semantics.md section 3, Eqs. 5-8): the Triton backend's,
and the flash backend's where Triton runs (FlashAttention has no top-k). Imports triton: import it only where
Triton runs (the flash backend imports it lazily). Five kernels (kernels_selection.py): Eq. 5's logits, their
row statistics, Eq. 6 with each token's rank in its block, Eq. 7 with the blocks' offsets (the float64 counts of
block_budgets.py), and the compaction (Eq. 8). No torch operation runs in between except allocations.

No host synchronisation: every size follows from the shapes, per-head counts stay on the device. Shape letters:
B, HQ, HKV, G = HQ / HKV, L keys, D head dim, J budgeted blocks, b block size.
"""

from __future__ import annotations

import torch
import triton

from ...geometry import num_budgeted_blocks
from ...selection import Selection
from . import kernels_selection
from .triton_launch import LOG2E, precision, rows_pad


def last_query_importance_logits(q_last: torch.Tensor, k: torch.Tensor, scale: float, starts=None):
    """Eq. 5 statistics: logits [B, HKV, G, L] fp32 in log2 units, row max and row sum of exp2 [B, HKV, G].

    q_last: [B, HQ, D], k: [B, HKV, L, D]. One pass over K; the partial (max, sum) per chunk are merged
    with a few torch ops (O(G * L / BLOCK_L) numbers). starts: None, or [B] int32 on the device, the left
    padding of each sequence (its logits are then relative to its start, -inf past its end)."""
    B, HQ, D = q_last.shape
    HKV, L = k.shape[1], k.shape[2]
    G = HQ // HKV
    block_l = 128
    n_chunks = triton.cdiv(L, block_l)
    logits = torch.empty(B, HKV, G, L, device=k.device, dtype=torch.float32)
    part_max = torch.empty(B, HKV, G, n_chunks, device=k.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    kernels_selection.last_query_logits_kernel[(B * HKV, n_chunks)](
        q_last, k, logits, part_max, part_sum, logits if starts is None else starts,
        *q_last.stride(), *k.stride(),
        L, HKV, n_chunks, scale * LOG2E,
        G=G, G_PAD=rows_pad(G), D=D, BLOCK_L=block_l, PREC=precision(k.dtype), VARLEN=starts is not None,
        num_warps=4,
    )
    row_max = torch.empty(B, HKV, G, device=k.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    kernels_selection.row_stats_kernel[(B * HKV,)](part_max, part_sum, row_max, row_sum, n_chunks,
                                                  G=G, G_PAD=rows_pad(G), CHUNKS=64, num_warps=4)
    return logits, row_max, row_sum


def select_on_device(q: torch.Tensor, k: torch.Tensor, budgets: torch.Tensor, config, scale: float, padding=None) -> dict:
    """Sections 3.1-3.4 on the device. Returns rank [B,HKV,J*b] int32 (within-block rank), keep [B,HKV,J]
    int32 (t_j), offsets [B,HKV,J+1] int32, and the compact form of tca.backends.common.compact: indices
    [B,HKV,max(J*b,1)] int32 (ascending, padded with L), counts [B,HKV] int32.
    padding: None, or a LeftPadding: sequence b is k[b, :, starts[b]:], selected on its own (its J_b budgeted
    blocks, positions relative to its start; blocks j >= J_b keep nothing)."""
    B, HQ = q.shape[:2]
    HKV, L = k.shape[1], k.shape[2]
    G = HQ // HKV
    b = config.block_size
    J = num_budgeted_blocks(L, b, config.window)
    dev = k.device
    if J == 0:
        zeros = torch.zeros(B, HKV, 1, device=dev, dtype=torch.int32)
        return {
            "rank": zeros[..., :0], "keep": zeros[..., :0], "offsets": zeros,
            "indices": torch.full((B, HKV, 1), L, device=dev, dtype=torch.int32), "counts": zeros[..., 0],
        }
    starts = None if padding is None else padding.starts_on(dev)
    logits, row_max, row_sum = last_query_importance_logits(q[:, :, -1], k, scale, starts)
    priority = torch.empty(B, HKV, J, device=dev, dtype=torch.float32)
    rank = torch.empty(B, HKV, J * b, device=dev, dtype=torch.int32)
    blocks = None if padding is None else padding.blocks_on(dev, config)
    kernels_selection.block_scores_kernel[(B * HKV, J)](
        logits, row_max, row_sum, priority, rank, priority if blocks is None else blocks,
        L, J, HKV, float(config.alpha),
        G=G, G_PAD=rows_pad(G), BS=b, MASS_MEAN=config.mass_scale == "mean", VARLEN=blocks is not None,
        num_warps=4 if b <= 128 else 8,
    )
    keep = torch.empty(B, HKV, J, device=dev, dtype=torch.int32)
    offsets = torch.empty(B, HKV, J + 1, device=dev, dtype=torch.int32)
    budgets = budgets.to(dev).contiguous()
    K = budgets.shape[-1]
    kernels_selection.block_keep_kernel[(B * HKV,)](
        priority, budgets, priority if blocks is None else blocks, keep, offsets, J, HKV, budgets.stride(0),
        K=K, K_PAD=triton.next_power_of_2(K), TILE=128, OTHERS=32, VARLEN=blocks is not None, num_warps=4,
    )
    indices = torch.empty(B, HKV, J * b, device=dev, dtype=torch.int32)
    kernels_selection.compact_kernel[(B * HKV, J)](rank, keep, offsets, indices, J, L, indices.stride(1), BS=b)
    return {"rank": rank, "keep": keep, "offsets": offsets, "indices": indices, "counts": offsets[..., -1]}


def select_indices(q, k, budgets, config, scale):
    """The selection in the compact form (tca.backends.common.compact): indices [B, HKV, N] int32 ascending,
    padded with L to N = max(J*b, 1) (no host sync); counts [B, HKV] int32.
    q: [B, HQ, LQ, D] (last row used), k: [B, HKV, L, D], budgets [HKV, len(K)]."""
    sel = select_on_device(q, k, budgets, config, scale)
    return sel["indices"], sel["counts"]


def to_selection(sel: dict, config, seq_len: int) -> Selection:
    """A tca.Selection (mask form) from the device selection (for tests and the cache; not a hot path)."""
    b = config.block_size
    rank, keep = sel["rank"], sel["keep"]
    B, H, J = keep.shape
    mask = (rank.view(B, H, J, b) < keep[..., None]).reshape(B, H, J * b)
    return Selection(mask=mask, block_budgets=keep.long(), block_size=b, window=config.window, seq_len=seq_len)

"""The online selection (semantics.md section 3) for the flash backend: FlashAttention has no top-k, so the
selection comes from the Triton kernels on a GPU with Triton, else from the torch backend (same function).

Shape letters: B batch, HKV key/value heads, N selected positions (padded to the largest count).
"""

from __future__ import annotations

import functools

import torch

from .plan import PAD_POSITION


def _triton_ops(device: torch.device):
    return _import_triton_ops() if device.type == "cuda" else None


@functools.cache
def _import_triton_ops():
    """The Triton selection, or None where triton is not installed (looked up once). Other import errors
    are bugs and propagate: a silent fallback would hide them behind equal outputs."""
    try:
        from ..triton import ops
    except ImportError:
        return None
    return ops


def select_indices(q, k, budgets, config, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [B, HKV, N] int64 ascending, padded with PAD_POSITION; counts [B, HKV] int64).

    q: [B, HQ, LQ, D] (its last row selects), k: [B, HKV, L, D], budgets: [HKV, len(K)] float64.
    """
    ops = _triton_ops(q.device)
    if ops is None:
        from ..torch.selection import select_indices as torch_select_indices

        indices, counts = torch_select_indices(q, k, budgets, config, scale)
    else:
        indices, counts = ops.select_indices(q, k, budgets, config, scale)
    return pad_indices(indices, counts)


def pad_indices(indices: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise any padding (-1 from Triton, L from torch, fill from Selection) to PAD_POSITION, int64,
    trimmed to the largest count, so rows stay ascending for searchsorted."""
    counts = counts.to(torch.int64)
    n_max = int(counts.max()) if counts.numel() else 0
    indices = indices[..., :n_max].to(torch.int64)
    valid = torch.arange(n_max, device=indices.device) < counts[..., None]
    return torch.where(valid, indices, PAD_POSITION), counts

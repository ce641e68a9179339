"""The compact form of a selection, the one every non-oracle producer emits and every consumer reads.

    indices [B, HKV, N] int32: per (batch element, KV head) the selected global positions in ascending order,
        the first counts[b, h] entries valid, every later entry equal to L (the number of keys);
    counts  [B, HKV] int32: how many positions each head selected.

Why L as padding: it lies past every key and every window start lo(i) <= L - 1, so each row stays sorted and
`searchsorted(indices, lo)` returns the number of selected positions below lo (the global prefix a query
block sees) without looking at counts; a consumer that gathers keys clamps to L - 1 and masks by counts.
N is at least max(counts) and may be larger (Triton allocates N = J * b so that no host sync is needed;
`trim` cuts it down where a consumer wants the tight size).

L is this form's padding only. Other padded lists of positions state their own: Selection.padded_indices pads
with `fill` (L unless told), PackedKVCache.from_indices ignores whatever follows counts (from_prefill passes 0),
and the vLLM plugin's SequenceState marks empty slots with -1.

Shape letters: B batch, HKV key/value heads, N padded selected positions, J budgeted blocks, b block size,
P = J * b budgeted positions.
"""

from __future__ import annotations

import torch

from ...geometry import num_budgeted_blocks
from ...selection import Selection

INDEX_DTYPE = torch.int32


def from_mask(mask: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The compact form of a selection mask [B, HKV, P] bool (P <= L = seq_len): (indices, counts).

    O(P) by a prefix sum, no sort. One host sync (N = the largest count)."""
    B, H, P = mask.shape
    counts = mask.sum(-1)
    n_max = int(counts.max()) if counts.numel() else 0
    dest = torch.where(mask, mask.long().cumsum(-1) - 1, n_max)  # unselected positions go to a spare column
    out = torch.full((B, H, n_max + 1), seq_len, dtype=INDEX_DTYPE, device=mask.device)
    out.scatter_(-1, dest, torch.arange(P, device=mask.device, dtype=INDEX_DTYPE).expand(B, H, P))
    return out[..., :n_max].contiguous(), counts.to(INDEX_DTYPE)


def from_selection(selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
    """The compact form of a (mask-form) tca.Selection."""
    return from_mask(selection.mask, selection.seq_len)


def to_selection(indices: torch.Tensor, counts: torch.Tensor, block_size: int, window: int, seq_len: int) -> Selection:
    """A tca.Selection (mask form, for tests and inspection; not a hot path) from the compact form."""
    return Selection.from_indices(indices, counts.long(), block_size, window, seq_len)


def trim(indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """indices cut to N = max(counts) columns (one host sync)."""
    n_max = int(counts.max()) if counts.numel() else 0
    return indices[..., :n_max]


def block_offsets(indices: torch.Tensor, seq_len: int, block_size: int, window: int) -> torch.Tensor:
    """offsets [B, HKV, J + 1] int32: offsets[..., j] = number of selected positions below j * b.

    Kernels that walk the selection per query block read offsets[lo // b] as the length of the global prefix."""
    J = num_budgeted_blocks(seq_len, block_size, window)
    B, H, _ = indices.shape
    bounds = (torch.arange(J + 1, device=indices.device, dtype=indices.dtype) * block_size).expand(B, H, J + 1)
    return torch.searchsorted(indices.contiguous(), bounds.contiguous()).to(INDEX_DTYPE)


def check(indices: torch.Tensor, counts: torch.Tensor, seq_len: int) -> None:
    """Raise ValueError unless (indices, counts) follow the convention above (for tests and new producers)."""
    if indices.dtype != INDEX_DTYPE or counts.dtype != INDEX_DTYPE:
        raise ValueError(f"indices and counts must be {INDEX_DTYPE}, got {indices.dtype} and {counts.dtype}")
    if indices.dim() != 3 or tuple(counts.shape) != tuple(indices.shape[:2]):
        raise ValueError(f"indices must be [B, HKV, N] and counts [B, HKV], got {tuple(indices.shape)}, "
                         f"{tuple(counts.shape)}")
    N = indices.shape[-1]
    if counts.numel() and int(counts.max()) > N:
        raise ValueError(f"counts reach {int(counts.max())} but indices hold only {N} columns")
    valid = torch.arange(N, device=indices.device) < counts[..., None]
    if (indices[~valid] != seq_len).any():
        raise ValueError(f"padding after the valid entries must be L = {seq_len}")
    if (indices[valid] < 0).any() or (indices[valid] >= seq_len).any():
        raise ValueError(f"selected positions must lie in [0, {seq_len})")
    if N > 1 and (indices[..., 1:] <= indices[..., :-1])[valid[..., 1:]].any():
        raise ValueError("selected positions must be strictly ascending")

"""The Selection: which global tokens each KV head keeps (docs/semantics.md section 3).

A backend-neutral record, so that a selection made by one implementation can drive the attention of
another (tests feed fixed selections to kernels, as fla does for NSA).

Shape letters: B batch, HKV key/value heads, J budgeted blocks, b block size, N selected tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import num_budgeted_blocks


@dataclass(frozen=True)
class Selection:
    """Selected global positions per batch element and KV head.

    mask: [B, HKV, J * b] bool, True at the selected positions of the budgeted blocks.
    block_budgets: [B, HKV, J] int64, t_j, tokens kept in block j (Eq. 7).
    block_size, window: the geometry (b, w) the selection was made for.
    seq_len: L, the number of keys it was made for.
    """

    mask: torch.Tensor
    block_budgets: torch.Tensor
    block_size: int
    window: int
    seq_len: int

    def __post_init__(self) -> None:
        J = num_budgeted_blocks(self.seq_len, self.block_size, self.window)
        if self.mask.dtype != torch.bool or self.mask.dim() != 3 or self.mask.shape[-1] != J * self.block_size:
            raise ValueError(
                f"Selection.mask must be a bool tensor [B, HKV, J*b] = [*, *, {J * self.block_size}] for "
                f"L={self.seq_len}, b={self.block_size}, w={self.window}; got {tuple(self.mask.shape)} {self.mask.dtype}"
            )
        if tuple(self.block_budgets.shape) != (*self.mask.shape[:2], J):
            raise ValueError(
                f"Selection.block_budgets must have shape {(*self.mask.shape[:2], J)}, "
                f"got {tuple(self.block_budgets.shape)}"
            )

    @property
    def num_blocks(self) -> int:
        """J, the number of budgeted blocks."""
        return self.block_budgets.shape[-1]

    @property
    def counts(self) -> torch.Tensor:
        """[B, HKV] number of selected tokens."""
        return self.mask.sum(-1)

    def full_mask(self) -> torch.Tensor:
        """[B, HKV, L] bool: the mask padded with False over the non-budgeted (always local) keys."""
        B, H, _ = self.mask.shape
        pad = self.mask.new_zeros(B, H, self.seq_len - self.mask.shape[-1])
        return torch.cat([self.mask, pad], dim=-1)

    def padded_indices(self, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted selected positions, padded: ([B, HKV, N_max] int64 with `fill` after the end, counts [B, HKV]).

        fill: the value of every entry past counts[b, h]. None (the default) gives L (seq_len), the padding of the
        backends' compact form (tca.backends.common.compact, where it keeps rows sorted for searchsorted); a caller
        that needs another marker passes it and says why (PackedKVCache.from_prefill: 0, the vLLM plugin's
        SequenceState: -1)."""
        fill = self.seq_len if fill is None else fill
        counts = self.counts
        n_max = int(counts.max()) if counts.numel() else 0
        positions = torch.arange(self.mask.shape[-1], device=self.mask.device).expand_as(self.mask)
        # Unselected positions sort after every selected one; a stable sort keeps positions ascending.
        key = torch.where(self.mask, positions, self.mask.shape[-1])
        idx = key.sort(dim=-1, stable=True).values[..., :n_max]
        idx = torch.where(idx < self.mask.shape[-1], idx, torch.full_like(idx, fill))
        return idx, counts

    @classmethod
    def from_indices(
        cls,
        indices: torch.Tensor,
        counts: torch.Tensor,
        block_size: int,
        window: int,
        seq_len: int,
    ) -> Selection:
        """Build from padded indices [B, HKV, N] (valid entries first, `counts` [B, HKV] of them)."""
        J = num_budgeted_blocks(seq_len, block_size, window)
        B, H, N = indices.shape
        valid = torch.arange(N, device=indices.device) < counts[..., None]
        mask = torch.zeros(B, H, J * block_size + 1, dtype=torch.bool, device=indices.device)
        target = torch.where(valid, indices.long(), J * block_size)  # dump invalid into the spare slot
        mask.scatter_(-1, target, True)
        mask = mask[..., :-1]
        budgets = mask.view(B, H, J, block_size).sum(-1)
        return cls(mask, budgets, block_size, window, seq_len)

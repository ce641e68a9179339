"""Block geometry of TCA (docs/semantics.md section 2): local windows and budgeted blocks (causal).

Positions are 0-based; the block of position i is i // b.
"""

from __future__ import annotations

import torch


def window_start(position, block_size: int, window: int):
    """lo(i) = max(0, (i // b + 1) * b - w): first key that query i sees densely. [choice: block-aligned]

    Works on ints and on integer tensors (elementwise).
    """
    if isinstance(position, torch.Tensor):
        return ((position // block_size + 1) * block_size - window).clamp_min(0)
    return max(0, (position // block_size + 1) * block_size - window)


def num_budgeted_blocks(seq_len: int, block_size: int, window: int) -> int:
    """J = lo(L - 1) / b: complete blocks lying wholly before the last query's window (0 if L <= w)."""
    return window_start(seq_len - 1, block_size, window) // block_size

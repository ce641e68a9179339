"""Block geometry of TCA (docs/semantics.md section 2): local windows and budgeted blocks (causal), and the rows
calibration evaluates (section 6).

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


DEFAULT_CALIBRATION_ROWS = 256  # R: query rows calibration evaluates (docs/semantics.md section 6)


def evaluated_rows(seq_len: int, window: int, num_rows: int = DEFAULT_CALIBRATION_ROWS) -> torch.Tensor:
    """The query rows calibration evaluates (section 6): rows w .. L-1, or R of them evenly spread with both ends
    included (integer arithmetic). -> [R] int64."""
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 2:
        # The spread formula divides by R - 1, and one row cannot include both ends.
        raise ValueError(f"num_rows must be an int >= 2 (the rows include both w and L-1), got {num_rows!r}")
    if seq_len - window <= num_rows:
        return torch.arange(window, seq_len)
    m = torch.arange(num_rows)
    return window + (m * (seq_len - 1 - window) + (num_rows - 1) // 2) // (num_rows - 1)

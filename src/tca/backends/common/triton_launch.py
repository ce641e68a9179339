"""Launch helpers shared by every module that starts a Triton kernel (the Triton backend's, and the on-device
selection in selection_triton.py that the flash backend reuses). Imports triton: import it only where Triton runs."""

from __future__ import annotations

import torch
import triton

LOG2E = 1.4426950408889634


def precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 on GPUs: the tolerance table assumes full fp32 products.
    return "ieee" if dtype == torch.float32 else "tf32"


def rows_pad(G: int) -> int:
    """Rows of a single-query tile: G query heads padded to a power of two, at least 16 (tl.dot minimum)."""
    return max(16, triton.next_power_of_2(G))

"""The dtype TCA computes in (section 3.1): float64 input stays float64; everything else (float16, bfloat16,
float32) is scored, softmaxed and accumulated in float32, never lower. One rule for the reference, the
backends and the serving path, so they agree on precision."""

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 -> float64, any other floating dtype -> float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32

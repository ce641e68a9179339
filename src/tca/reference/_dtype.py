"""The reference computes in float64 for float64 input and in float32 otherwise (never lower)."""

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32

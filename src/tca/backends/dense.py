"""Declares exact causal attention as a backend, "dense": TCA with dense budgets (every token kept), which
routing runs below the measured crossover (backends/crossover.py) and a user may name for a dense baseline on the
same path. Its implementation (common/dense_backend.py) is imported on first use, like every backend's.
"""

from __future__ import annotations

import torch

from .registry import Backend

SPEC = Backend(
    name="dense",
    summary="exact causal attention (SDPA) with a plain KV cache: TCA with dense budgets, every token kept",
    implementation="tca.backends.common.dense_backend:DenseBackend",
    devices=("cpu", "cuda"),
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    lacks=(
        ("lse", "SDPA returns no log-sum-exp; a TCA backend returns it"),
        ("varlen", "a padded batch runs one sequence at a time (SDPA per sequence), the caches joined into one"),
        ("calibration", "dense attention has no budgets to calibrate"),
        ("chunked_prefill", "not wired; a TCA backend with dense budgets (tca.budgets.dense_budgets) prefills exactly, chunk by chunk"),
    ),
    priority=-1,  # never auto's choice by priority: routing puts it first below the crossover
    computes="dense",
)

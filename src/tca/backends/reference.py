"""Declares the oracle (`tca.reference`) as a backend: exact, any dtype, O(LQ x L) memory.

It is the last resort of backend="auto" and the twin every other backend is checked against. Its
implementation (tca.reference.ReferenceBackend) is imported on first use, like every backend's.
"""

from __future__ import annotations

import torch

from .registry import Backend

SPEC = Backend(
    name="reference",
    summary="readable PyTorch + einops oracle; exact, O(Lq x L) memory, for tests and small inputs",
    implementation="tca.reference:ReferenceBackend",
    lacks=(("varlen", "its cache holds one length for the whole batch: a padded prefill is refused; stateless attention runs one sequence at a time"),),
    devices=("cpu", "cuda"),
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    priority=0,
    own_cache=True,
)

"""The `torch` backend: pure PyTorch, memory-efficient (chunked over query blocks, no L x L tensor), any device.

It is what backend="auto" runs where no Triton or flash-attn backend can (CPU, GPUs without Triton).
"""

from __future__ import annotations

import torch

from ..registry import Backend

SPEC = Backend(
    name="torch",
    summary="pure PyTorch, chunked over query blocks, no L x L tensors; CPU/CUDA, any head dim, decode on PackedKVCache",
    implementation="tca.backends.torch.impl:TorchBackend",
    devices=("cpu", "cuda"),  # MPS has no float64, which the budgets and the fp64 path use
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    head_dims=None,
    lacks=(("varlen", "one length per prefill call: a left-padded batch is prefilled one sequence at a time (same result), then decoded together"),),
    priority=10,
    decode_priority=10,
)

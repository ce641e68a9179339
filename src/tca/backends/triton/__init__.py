"""The Triton backend: fused selection, sparse prefill attention and compressed-cache decoding kernels.

Declared here without importing triton (the registry imports `ops` on first use).
"""

from __future__ import annotations

import torch

from ..common.environment import TRITON_HEAD_DIMS, triton_interpret
from ..registry import Backend


def _environment() -> list[str]:
    if torch.cuda.is_available() or triton_interpret():
        return []
    return ["no CUDA device, and TRITON_INTERPRET=1 is not set (the CPU interpreter runs fp32 only, slowly)"]


_INTERPRET = triton_interpret()

SPEC = Backend(
    name="triton",
    summary="Triton kernels: on-device selection, GQA-packed sparse prefill, split-K compressed decode",
    implementation="tca.backends.triton.ops:TritonBackend",
    # CUDA: fp16/bf16/fp32; the CPU interpreter computes bf16 wrongly, so it runs fp32 only.
    devices=("cuda", "cpu") if _INTERPRET else ("cuda",),
    dtypes=(torch.float32,) if _INTERPRET and not torch.cuda.is_available() else (torch.float16, torch.bfloat16, torch.float32),
    head_dims=TRITON_HEAD_DIMS,
    lacks=(
        ("gradients", "the kernels have no backward pass; use backend='torch' (or 'auto') for inputs that require grad"),
        ("calibration", "no calibration kernel; the torch backend's chunked calibration runs on CUDA too"),
    ),
    priority=30,
    decode_priority=30,
    requires=(("triton", 'pip install "tca[triton]"'),),
    environment=_environment,
)

"""The Triton backend: fused selection, sparse prefill attention and compressed-cache decoding kernels.

Declared here without importing triton (the registry imports `ops` on first use).
"""

from __future__ import annotations

import os

import torch

from ..registry import Backend


def _environment() -> list[str]:
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return []
    return ["no CUDA device, and TRITON_INTERPRET=1 is not set (the CPU interpreter runs fp32 only, slowly)"]


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SPEC = Backend(
    name="triton",
    summary="Triton kernels: on-device selection, GQA-packed sparse prefill, split-K compressed decode",
    implementation="tca.backends.triton.ops:TritonBackend",
    # CUDA: fp16/bf16/fp32; the CPU interpreter computes bf16 wrongly, so it runs fp32 only.
    devices=("cuda", "cpu") if _INTERPRET else ("cuda",),
    dtypes=(torch.float32,) if _INTERPRET and not torch.cuda.is_available() else (torch.float16, torch.bfloat16, torch.float32),
    head_dims=(16, 32, 64, 128),
    has_decode=True,
    has_chunked_prefill=True,
    priority=30,
    decode_priority=30,
    requires=(("triton", 'pip install "tca[triton]"'),),
    environment=_environment,
)

"""The oracle (`tca.reference`) as a backend: exact, any device and dtype, O(LQ x L) memory.

It is the last resort of backend="auto" and the twin every other backend is checked against.
"""

from __future__ import annotations

import torch

from .. import reference
from .registry import Backend


class ReferenceBackend:
    attention = staticmethod(reference.attention)
    select = staticmethod(reference.select)
    attend = staticmethod(reference.attend)
    prefill = staticmethod(reference.prefill)
    decode = staticmethod(reference.decode_step)


SPEC = Backend(
    name="reference",
    summary="readable PyTorch + einops oracle; exact, O(Lq x L) memory, for tests and small inputs",
    implementation="tca.backends.reference:ReferenceBackend",
    devices=("cpu", "cuda", "mps", "xpu"),
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    priority=0,
)

"""Interchangeable implementations of TCA-Attention, chosen through the registry (see registry.py).

Each backend module below only *declares* its backend; the implementation is imported on first use.
"""

from . import registry
from .flash import SPEC as _FLASH
from .reference import SPEC as _REFERENCE
from .torch import SPEC as _TORCH
from .triton import SPEC as _TRITON

registry.register(_REFERENCE)
registry.register(_TORCH)
registry.register(_TRITON)
registry.register(_FLASH)

__all__ = ["registry"]

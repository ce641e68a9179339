"""Interchangeable implementations of TCA-Attention, chosen through the registry (see registry.py).

Each backend module below only *declares* its backend; the implementation is imported on first use. The
registry holds the declarations; routing.py chooses among them.
"""

from . import registry, routing
from .dense import SPEC as _DENSE
from .flash import SPEC as _FLASH
from .reference import SPEC as _REFERENCE
from .torch import SPEC as _TORCH
from .triton import SPEC as _TRITON

registry.register(_REFERENCE)
registry.register(_TORCH)
registry.register(_TRITON)
registry.register(_FLASH)
registry.register(_DENSE)

__all__ = ["registry", "routing"]

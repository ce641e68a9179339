"""Interchangeable implementations of TCA-Attention, chosen through the registry (see registry.py).

Each backend module below only *declares* its backend; the implementation is imported on first use.
"""

from . import registry
from .reference import SPEC as _REFERENCE

registry.register(_REFERENCE)

__all__ = ["registry"]

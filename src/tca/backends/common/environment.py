"""Environment switches the backends read, each parsed in one place."""

from __future__ import annotations

import importlib.util
import os

import torch

TRUE_VALUES = ("1", "true", "yes", "on", "y")  # what Triton itself accepts for its boolean switches


def triton_interpret() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET set to a true value, as Triton reads it).

    Read when called, not cached: Triton reads the variable when it compiles, and tests set it per process.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in TRUE_VALUES


# The head dims the Triton kernels are built for (the triton backend's, and the shared selection kernels of
# selection_triton.py that the flash backend also runs).
TRITON_HEAD_DIMS = (16, 32, 64, 128)


def triton_runs_on_gpu(device: torch.device, head_dim: int) -> bool:
    """Whether the Triton kernels run compiled on this device for this head dim: a CUDA device, triton installed
    (the CPU interpreter is for tests, too slow for a backend that merely borrows the kernels)."""
    return (torch.device(device).type == "cuda" and head_dim in TRITON_HEAD_DIMS
            and importlib.util.find_spec("triton") is not None)

"""Environment switches the backends read, each parsed in one place."""

from __future__ import annotations

import os

TRUE_VALUES = ("1", "true", "yes", "on", "y")  # what Triton itself accepts for its boolean switches


def triton_interpret() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET set to a true value, as Triton reads it).

    Read when called, not cached: Triton reads the variable when it compiles, and tests set it per process.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in TRUE_VALUES

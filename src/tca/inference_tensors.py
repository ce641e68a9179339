"""Caches filled under `torch.inference_mode()` and continued outside it.

A prefill (or decode step) run in inference mode leaves inference tensors in the cache, and PyTorch refuses to
update those in place outside inference mode, which every decode step of the shared caches does. Before such a
step their inference tensors are copied once into normal tensors; a cache made outside inference mode and
continued inside it needs nothing.
"""

from __future__ import annotations

import torch

# The reference's caches hold ragged lists [b][h] of tensors under these names.
_RAGGED = ("keys", "values", "positions", "evicted_keys", "evicted_values", "evicted_positions")


def leave_inference_tensors(cache) -> None:
    """Copy every inference tensor of a tca cache (and of the active set a re-selecting cache wraps) into a normal
    tensor, in place of the original. Call it outside inference mode, before a step that updates the cache."""
    for state in (cache, getattr(cache, "active", None)):
        if state is not None:
            _clone_inference_tensors(state)


def _clone_inference_tensors(state) -> None:
    tensors = {name: t for name, t in vars(state).items() if isinstance(t, torch.Tensor) and t.is_inference()}
    for name, t in tensors.items():
        setattr(state, name, _normal_copy(t))
    for rows_name in _RAGGED:
        rows = getattr(state, rows_name, None)
        if isinstance(rows, list):
            setattr(state, rows_name, [[_normal_copy(t) if t.is_inference() else t for t in row] for row in rows])


def _normal_copy(t: torch.Tensor) -> torch.Tensor:
    """A normal copy of t; host memory pinned for asynchronous copies (an offloaded store) stays pinned."""
    copy = t.clone()
    if t.device.type == "cpu" and torch.cuda.is_available() and t.is_pinned():
        copy = copy.pin_memory()
    return copy

"""Which adapter runs: the generation chosen by tca.backends.flash.chosen_generation(), imported on first use."""

from __future__ import annotations

import importlib

import torch

from ..registry import BackendUnavailableError
from . import GENERATIONS, chosen_generation, environment_reasons

_ADAPTER_CLASSES = {"fa4": ("fa4", "FA4Adapter"), "fa3": ("fa3", "FA3Adapter"), "fa2": ("fa2", "FA2Adapter")}
_LOADED: dict[str, object] = {}


def adapter_module(generation: str):
    """The tca adapter module (fa2, fa3 or fa4) of a generation (light: it does not import flash_attn)."""
    module, _ = _ADAPTER_CLASSES[generation]
    return importlib.import_module(f"{__package__}.{module}")


def get_adapter(generation: str | None = None):
    """The adapter of `generation` (default: the chosen one), created once; raises with the reasons if none."""
    generation = generation or chosen_generation()
    if generation is None:
        raise BackendUnavailableError("backend 'flash' cannot run here: " + "; ".join(environment_reasons()))
    if generation not in _LOADED:
        _, cls = _ADAPTER_CLASSES[generation]
        _LOADED[generation] = getattr(adapter_module(generation), cls)()
    return _LOADED[generation]


def input_reasons(generation: str, dtype: torch.dtype, head_dim: int, capability: tuple[int, int]) -> list[str]:
    """Why `generation` cannot run this dtype and head dim on a GPU of this capability (empty when it can): what
    the flash declaration adds to its lists (registry.Backend.input_check), so routing refuses such inputs
    before any call."""
    module = adapter_module(generation)
    reasons = []
    if dtype not in module.DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in module.DTYPES)
        reasons.append(f"dtype {str(dtype).removeprefix('torch.')} is not supported by {generation.upper()} "
                       f"(supports {names}; cast q, k, v)")
    why = module.head_dim_reason(head_dim, capability)
    if why:
        reasons.append(f"{why} ({generation.upper()}, {GENERATIONS[generation][0]})")
    return reasons

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


def check_inputs(adapter, q: torch.Tensor) -> None:
    """Raise BackendUnavailableError when this generation cannot run q's dtype or head dim on its device."""
    module = adapter_module(adapter.generation)
    reasons = []
    if q.dtype not in module.DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in module.DTYPES)
        reasons.append(f"dtype {str(q.dtype).removeprefix('torch.')} is not supported by {adapter.generation.upper()} "
                       f"(supports {names}; cast q, k, v)")
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else (0, 0)
    why = module.head_dim_reason(q.shape[-1], capability)
    if why:
        reasons.append(why)
    if reasons:
        raise BackendUnavailableError(
            f"backend 'flash' ({adapter.generation.upper()}, {GENERATIONS[adapter.generation][0]}) cannot run "
            "these inputs: " + "; ".join(reasons)
        )

"""The flash backend: TCA-Attention on FlashAttention kernels (FA2, FA3 or FA4, whichever is installed).

This module only *declares* the backend: it never imports flash_attn (importing FA2 loads a CUDA extension,
FA4 a JIT compiler), it only looks for the packages on disk. The implementation (impl.py) and the thin
per-generation adapters (fa2.py, fa3.py, fa4.py) are imported on first use.

Generations, in the order `backend="flash"` prefers them (override with TCA_FLASH_GENERATION=fa2|fa3|fa4):
    fa4  `flash_attn.cute`         (PyPI flash-attn-4; Hopper and Blackwell)
    fa3  `flash_attn_interface`    (the `hopper/` build of flash-attention; Hopper)
    fa2  `flash_attn`              (PyPI flash-attn 2.x; Ampere and later)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from ..registry import Backend

# generation -> (module, how to install, minimum CUDA capability (major, minor))
GENERATIONS: dict[str, tuple[str, str, tuple[int, int]]] = {
    "fa4": ("flash_attn.cute", "pip install flash-attn-4 (Hopper or Blackwell GPU)", (9, 0)),
    "fa3": ("flash_attn_interface", "build flash-attention's hopper/ folder: cd hopper && python setup.py install", (9, 0)),
    "fa2": ("flash_attn", "pip install flash-attn --no-build-isolation (Ampere or newer GPU)", (8, 0)),
}
PREFERENCE = ("fa4", "fa3", "fa2")
GENERATION_ENV = "TCA_FLASH_GENERATION"


def _module_on_disk(module: str) -> bool:
    """Whether `module` can be imported, found without importing it or its parents' __init__ code.

    FA2 installs a regular package `flash_attn` (whose __init__ loads the CUDA extension); FA4 installs the
    namespace `flash_attn` with a `cute` sub-package, so FA2's `flash_attn` may exist without FA4 and vice
    versa: sub-packages are looked up in the parent's search path, not imported.
    """
    parent, _, child = module.partition(".")
    try:
        spec = importlib.util.find_spec(parent)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if not child:
        # A bare namespace folder (FA4 alone) is not FA2: FA2 ships flash_attn/__init__.py.
        return spec.origin is not None and spec.origin != "namespace"
    return any((Path(p) / child / "__init__.py").is_file() for p in (spec.submodule_search_locations or ()))


def installed_generations() -> list[str]:
    """The FlashAttention generations found on this machine, in preference order."""
    return [g for g in PREFERENCE if _module_on_disk(GENERATIONS[g][0])]


def chosen_generation() -> str | None:
    """The generation the backend will use: TCA_FLASH_GENERATION if set (and installed), else the newest."""
    found = installed_generations()
    wanted = os.environ.get(GENERATION_ENV, "").strip().lower()
    if wanted:
        return wanted if wanted in found else None
    return found[0] if found else None


def environment_reasons() -> list[str]:
    """Why the flash backend cannot run on this machine at all (no package, GPU too old)."""
    wanted = os.environ.get(GENERATION_ENV, "").strip().lower()
    if wanted and wanted not in GENERATIONS:
        return [f"{GENERATION_ENV}={wanted!r} is not a FlashAttention generation (use one of {', '.join(PREFERENCE)})"]
    generation = chosen_generation()
    if generation is None:
        if wanted:
            module, hint, _ = GENERATIONS[wanted]
            return [f"{GENERATION_ENV}={wanted} but package '{module}' is not installed ({hint})"]
        return [
            "no FlashAttention package is installed; install one of: "
            + "; ".join(f"{g.upper()} '{m}' ({hint})" for g, (m, hint, _) in GENERATIONS.items())
        ]
    if torch.cuda.is_available():
        need = GENERATIONS[generation][2]
        have = torch.cuda.get_device_capability()
        if have < need:
            return [
                f"{generation.upper()} needs a GPU of compute capability >= {need[0]}.{need[1]}, "
                f"this one has {have[0]}.{have[1]} (install flash-attn 2.x for Ampere)"
            ]
    return []


def input_check(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    """What the chosen generation cannot run of the inputs the declaration's lists allow (its own dtypes, its head
    dims on this GPU); its adapter module is read, flash_attn is not imported."""
    generation = chosen_generation()
    if generation is None:  # environment_reasons says why
        return []
    if device.type != "cuda" or not torch.cuda.is_available():
        return ["no CUDA device is available here"]
    from .generations import input_reasons

    capability = torch.cuda.get_device_capability(device)
    return input_reasons(generation, dtype, head_dim, capability)


SPEC = Backend(
    name="flash",
    summary="FlashAttention kernels (FA4, FA3 or FA2): local window and selected tokens as two varlen calls merged by LSE",
    implementation="tca.backends.flash.impl:FlashBackend",
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16),
    # The head dims every generation runs (FA4 on Blackwell: <= 128 or 256; FA3: 64, 96, 128, 192, 256).
    head_dims=(64, 96, 128, 256),
    lacks=(
        ("gradients", "the LSE merge and the in-place key segments have no backward pass; use backend='torch' "
         "(or 'auto') for inputs that require grad"),
        ("varlen", "every batch element has the same length (the varlen calls are internal)"),
        ("calibration", "FlashAttention returns no attention weights; use the torch backend's calibration"),
        ("chunked_prefill", "not wired to the shared chunked prefill yet"),
    ),
    # Below triton (30), measured (docs/benchmarks.md, H100 + FA4): at 128K prefill flash is faster on the Llama
    # shape (55 vs 72 ms) but slower on SmolLM2's (16.5 vs 14.5 ms), slower below ~32K tokens, and ~40x slower per
    # decode step (FA4's Python overhead on 2-3 small calls). So auto prefills on flash only from the measured
    # length crossover (backends/crossover.py) and decodes on the fastest decode kernels (decode_priority).
    priority=20,
    decode_priority=0,
    environment=environment_reasons,
    input_check=input_check,
    needs="a FlashAttention package: FA4 `flash-attn-4` (the one exercised on an H100), FA3 or FA2; a CUDA GPU",
)

__all__ = ["SPEC", "GENERATIONS", "PREFERENCE", "installed_generations", "chosen_generation", "environment_reasons"]

"""Where TCA pays off, measured per device and attention shape: below `dense_below` tokens backend="auto" runs
exact dense attention (TCA with dense budgets), and from `flash_from` tokens it prefills on the flash backend
when that can run.

Each entry names the measurement that set it (docs/benchmarks.md, "Crossover"): time to first token of a
whole model with TCA against dense `sdpa` in the same run. A device's default entry comes from a model of the
Llama-3.1-8B shape (benchmarks/e2e_generate.py: 32 query / 8 KV heads, D = 128, bf16, default budgets);
shapes measured on their own (query heads, KV heads, head dim) override it, since attention's share of a
model's time, and so where TCA can win, depends on the shape. Name a backend explicitly to run the plan's
budgets at every length.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch


@dataclass(frozen=True)
class Crossover:
    dense_below: int  # prompts shorter than this run dense (TCA cannot win there)
    flash_from: int  # prompts at least this long prefill on flash, if it can run (faster than triton there)
    measured: str  # which run set these numbers


# Device name (a substring of torch.cuda.get_device_name) -> crossover. Unknown CUDA devices use the H100's.
MEASURED = {
    # TTFT of TCA over dense: 0.78x at 8K, 1.01x at 16K, 1.05x at 24K (triton); flash 1.12x vs triton 1.13x at 32K,
    # 1.45x vs 1.39x at 64K, 2.10x vs 1.88x at 128K (benchmarks/results/e2e_h100.json, e2e_flash_h100.json).
    "H100": Crossover(dense_below=16384, flash_from=65536,
                      measured="H100 80GB HBM3, torch 2.11, triton 3.6, FA4 4.0.0b36, transformers 5.17, 2026-11-26"),
}
# (device name substring, query heads, KV heads, head dim) -> crossover, for shapes measured on their own.
MEASURED_SHAPES = {
    # Qwen2.5-Coder-0.5B-Instruct (24 layers), its tau 0.9 plan: TTFT of TCA over dense 0.67x at 16K, 0.97x at
    # 32K, its longest context (benchmarks/results/bench_qwen_h100_tau09.json): TCA never wins its first token.
    ("H100", 14, 2, 64): Crossover(dense_below=65536, flash_from=65536,
                                   measured="H100 80GB HBM3, Qwen2.5-Coder-0.5B, torch 2.11, triton 3.6, 2026-11-26"),
}
DEFAULT_CUDA = MEASURED["H100"]
# CPU: the torch backend is not slower than SDPA at the lengths a CPU runs, so TCA runs everywhere.
CPU = Crossover(dense_below=0, flash_from=1 << 62, measured="CPU: no crossover (TCA's torch backend is not slower)")


def lookup(device_name: str, shape: tuple[int, int, int] | None = None) -> Crossover:
    """The crossover of a CUDA device named `device_name` for attention of `shape` (query heads, KV heads,
    head dim): the shape's own entry if it was measured on this device, else the device's, else the H100's."""
    if shape is not None:
        for (key, *measured_shape), entry in MEASURED_SHAPES.items():
            if key in device_name and tuple(measured_shape) == tuple(shape):
                return entry
    return next((c for key, c in MEASURED.items() if key in device_name), DEFAULT_CUDA)


@cache
def for_device(device_type: str, index: int = 0, shape: tuple[int, int, int] | None = None) -> Crossover:
    """The crossover of this device and shape (memoised: one name lookup per device and shape)."""
    if device_type != "cuda":
        return CPU
    return lookup(torch.cuda.get_device_name(index), shape)


def crossover(device: torch.device, shape: tuple[int, int, int] | None = None) -> Crossover:
    """shape: (query heads, KV heads, head dim) of the attention call, or None for the device's default."""
    device = torch.device(device)
    return for_device(device.type, device.index or 0, None if shape is None else tuple(shape))

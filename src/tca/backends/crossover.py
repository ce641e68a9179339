"""Where TCA pays off, measured per device: below `dense_below` tokens backend="auto" runs exact dense attention
(TCA with dense budgets), and from `flash_from` tokens it prefills on the flash backend when that can run.

Each entry names the measurement that set it (docs/benchmarks.md, "Crossover"): the end-to-end benchmark
benchmarks/e2e_generate.py on a model of the Llama-3.1-8B shape (32 query / 8 KV heads, D = 128, bf16),
time to first token of TCA (default budgets, b = 128, w = 4096) against dense `sdpa` in the same run.
Name a backend explicitly to run the plan's budgets at every length.
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
DEFAULT_CUDA = MEASURED["H100"]
# CPU: the torch backend is not slower than SDPA at the lengths a CPU runs, so TCA runs everywhere.
CPU = Crossover(dense_below=0, flash_from=1 << 62, measured="CPU: no crossover (TCA's torch backend is not slower)")


@cache
def for_device(device_type: str, index: int = 0) -> Crossover:
    """The crossover of this device (memoised: one name lookup per device)."""
    if device_type != "cuda":
        return CPU
    name = torch.cuda.get_device_name(index)
    return next((c for key, c in MEASURED.items() if key in name), DEFAULT_CUDA)


def crossover(device: torch.device) -> Crossover:
    device = torch.device(device)
    return for_device(device.type, device.index or 0)

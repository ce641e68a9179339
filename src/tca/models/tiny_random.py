"""Tiny random causal LMs (Llama, Qwen2, Mistral) for tests and examples: 2 layers, 4 query / 2 KV heads,
head dim 16, built in milliseconds with no download. Pair them with TCAConfig(block_size=16, window=32..64)
so that TCA is really sparse at L ~ 100-200.
"""

from __future__ import annotations

import torch

from . import _hf

ARCHITECTURES = ("llama", "qwen2", "mistral")


def tiny_config(arch: str = "llama", **overrides):
    """The transformers config of a tiny random model of `arch` (llama, qwen2 or mistral)."""
    transformers = _hf.require()
    common = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, eos_token_id=None, pad_token_id=None,
    )
    if arch == "llama":
        cls = transformers.LlamaConfig
    elif arch == "qwen2":
        cls = transformers.Qwen2Config
    elif arch == "mistral":
        cls = transformers.MistralConfig
        common["sliding_window"] = None  # full causal attention (Mistral's default window is 4096)
    else:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    common.update(overrides)
    return cls(**common)


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation="sdpa",
               **overrides):
    """A seeded tiny random causal LM in eval mode (see tiny_config for the shape)."""
    transformers = _hf.require()
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.to(dtype).eval()

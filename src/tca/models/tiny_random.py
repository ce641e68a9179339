"""Tiny random causal LMs for tests and examples: 2 layers, 4 query / 2 KV heads, head dim 16, built in
milliseconds with no download. Pair them with TCAConfig(block_size=16, window=32..64) so that TCA is really
sparse at L ~ 100-200.

Plain: llama, qwen2, mistral (sliding window off). Hybrid (layer 0 sliding_attention with a 24-token window,
layer 1 full_attention): gemma2 (eager, logit softcapping off), gemma3 (Gemma 3 text), ministral,
qwen2_hybrid (Qwen2 with use_sliding_window), gpt_oss (mixture of experts, attention sinks: refused by TCA).
"""

from __future__ import annotations

import torch

from . import _hf

ARCHITECTURES = ("llama", "qwen2", "mistral")
HYBRID_ARCHITECTURES = ("gemma2", "gemma3", "ministral", "qwen2_hybrid", "gpt_oss")
SLIDING_WINDOW = 24
HYBRID_LAYERS = ["sliding_attention", "full_attention"]
# The config class and its own settings per architecture; hybrid ones slide on layer 0 only.
_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),  # full causal attention (the default window is 4096)
    "gemma2": ("Gemma2Config", {"sliding_window": SLIDING_WINDOW, "layer_types": HYBRID_LAYERS,
                                "attn_logit_softcapping": None, "final_logit_softcapping": None}),
    "gemma3": ("Gemma3TextConfig", {"sliding_window": SLIDING_WINDOW, "layer_types": HYBRID_LAYERS}),
    "ministral": ("MinistralConfig", {"sliding_window": SLIDING_WINDOW, "layer_types": HYBRID_LAYERS}),
    "qwen2_hybrid": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": SLIDING_WINDOW,
                                     "max_window_layers": 0, "layer_types": HYBRID_LAYERS}),
    "gpt_oss": ("GptOssConfig", {"sliding_window": SLIDING_WINDOW, "layer_types": HYBRID_LAYERS,
                                 "num_local_experts": 4, "num_experts_per_tok": 2,
                                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
}
_NATIVE = {"gemma2": "eager", "gpt_oss": "eager"}  # what their modeling code supports (no sdpa)


def tiny_config(arch: str = "llama", **overrides):
    """The transformers config of a tiny random model of `arch` (ARCHITECTURES or HYBRID_ARCHITECTURES)."""
    transformers = _hf.require()
    if arch not in _CONFIGS:
        raise ValueError(f"arch must be one of {ARCHITECTURES + HYBRID_ARCHITECTURES}, got {arch!r}")
    name, own = _CONFIGS[arch]
    common = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, eos_token_id=None, pad_token_id=None,
    )
    common.update(own)
    common.update(overrides)
    return getattr(transformers, name)(**common)


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation=None,
               **overrides):
    """A seeded tiny random causal LM in eval mode (see tiny_config for the shape); attn_implementation None:
    "sdpa" (Gemma 2 and gpt-oss: "eager")."""
    transformers = _hf.require()
    attn_implementation = attn_implementation or _NATIVE.get(arch, "sdpa")
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.to(dtype).eval()

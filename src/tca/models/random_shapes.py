"""Models of a real model's shape with random weights, built from a config (no download): for speed and memory
benchmarks, where values do not matter but every matrix has its real size.

    model = random_model(SHAPES["llama-3.1-8b-shape"], max_positions=1 << 17, dtype=torch.bfloat16, device="cuda")
"""

from __future__ import annotations

import torch

from . import _hf

SHAPES = {
    # Llama-3.1-8B: 32 layers, 32 query / 8 KV heads of dim 128 (16 GB of bf16 weights).
    "llama-3.1-8b-shape": dict(
        architecture="llama",
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    # Qwen2.5-Coder-0.5B-Instruct: 24 layers, 14 query / 2 KV heads of dim 64, q/k/v biases, tied embeddings.
    "qwen2.5-0.5b-shape": dict(
        architecture="qwen2",
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    # The Llama architecture at toy size: CPU smoke runs of the benchmarks.
    "llama-tiny-shape": dict(
        architecture="llama",
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
}
_CONFIGS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def random_model(shape: dict, max_positions: int, dtype: torch.dtype, device, seed: int = 0):
    """A causal LM of `shape` (a SHAPES entry: its architecture and config values) with seeded random weights, in
    eval mode. The weights are made in `dtype` on `device` directly: no float32 copy of an 8B model on the host."""
    transformers = _hf.require()
    values = dict(shape)
    config_name, model_name = _CONFIGS[values.pop("architecture", "llama")]
    config = getattr(transformers, config_name)(
        **values, max_position_embeddings=max_positions, eos_token_id=None, pad_token_id=None
    )
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = getattr(transformers, model_name)(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()

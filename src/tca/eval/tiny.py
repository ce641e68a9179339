"""A tiny random Llama and a byte tokenizer: the harness end to end in seconds (tests, `--model tiny`).

Its scores mean nothing (random weights); it checks that every part of the harness runs.
"""

from __future__ import annotations

import torch


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; 256 is end of sequence. No chat template."""

    vocab_size = 257
    eos_token_id = 256
    pad_token_id = 256
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer Llama, 4 query / 2 KV heads of dim 16, random weights (seeded), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        eos_token_id=ByteTokenizer.eos_token_id, pad_token_id=ByteTokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).to(dtype).eval(), ByteTokenizer()

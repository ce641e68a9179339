"""The harness's `--model tiny`: a byte tokenizer and tca.models.tiny_random's Llama sized for it (tests, smoke
runs end to end in seconds).

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
    """tca.models.tiny_random's Llama (2 layers, 4 query / 2 KV heads of dim 16, seeded random weights) with the
    byte tokenizer's vocabulary, and that tokenizer."""
    from ..models.tiny_random import tiny_model

    model = tiny_model(
        "llama", seed=seed, dtype=dtype, vocab_size=ByteTokenizer.vocab_size, max_position_embeddings=4096,
        eos_token_id=ByteTokenizer.eos_token_id, pad_token_id=ByteTokenizer.pad_token_id,
    )
    return model, ByteTokenizer()

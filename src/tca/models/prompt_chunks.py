"""Prefill a long prompt through a transformers model chunk by chunk (docs/semantics.md section 5b).

Each chunk runs the whole model (embeddings, every layer, the last position's logits only), so the activations
of one chunk, not of the prompt, are live; the TCACache keeps each layer's state between chunks. Shape letters:
B batch, L prompt tokens, n chunk tokens, V vocabulary.
"""

from __future__ import annotations

import torch

from .attention import layer_settings
from .cache import TCACache
from .cache_argument import cache_kwargs
from .enable import attention_modules


def prefill_in_chunks(model, input_ids: torch.Tensor, cache: TCACache, *, chunk_size: int, mode: str = "exact",
                      progress: bool = False) -> torch.Tensor:
    """Prefill input_ids [B, L] into `cache`, `chunk_size` tokens per forward call (chunks end at multiples of
    chunk_size counted from position 0); returns the logits of the last position [B, V] (the next token's). The
    cache is then ready to decode:

        logits = tca.models.prefill_in_chunks(model, ids, cache, chunk_size=4096, mode="streaming")
        first = logits.argmax(-1, keepdim=True)
        out = model.generate(torch.cat([ids, first], 1), **cache_kwargs(model, cache), max_new_tokens=31)

    mode: "exact" (an empty cache; each chunk is stateless TCA on its prefix and the end compresses as a
    one-shot prefill does: equal to one forward call while every chunk but the last ends within the window) or
    "streaming" (bounded memory: the cache never holds more than the window plus the kept tokens; chunk_size
    must be a multiple of the block size; continues a filled cache, e.g. with a follow-up question).
    The sequences must have one length (no padding). On an error the chunked prefill stays open with the chunks
    that went through (`cache.seq_len`): go on from there, or `cache.reset()`.
    """
    if not isinstance(cache, TCACache):
        raise TypeError(f"cache must be a tca.models.TCACache, got {type(cache).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, L] tensor of token ids, got {getattr(input_ids, 'shape', input_ids)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids holds no token: nothing to prefill")
    if mode == "streaming":
        modules = attention_modules(model, len(cache.layers))
        blocks = sorted({layer_settings(m).config.block_size for m in modules})
        if any(chunk_size % b for b in blocks):
            raise ValueError(
                f"streaming chunks must be multiples of the block size ({', '.join(map(str, blocks))}), got "
                f"chunk_size={chunk_size}; try {max(blocks[-1], chunk_size // blocks[-1] * blocks[-1])}"
            )
    cache.begin_chunked_prefill(mode)
    B, L = input_ids.shape
    start = cache.seq_len
    # Chunk ends at multiples of chunk_size counted from position 0, so a streaming prefill that continues a
    # cache at a position inside a block first completes that block (streaming chunks end on block boundaries).
    ends = list(range((start // chunk_size + 1) * chunk_size, start + L, chunk_size)) + [start + L]
    bounds = list(zip([start, *ends[:-1]], ends, strict=True))
    if progress:
        from tqdm.auto import tqdm

        bounds = tqdm(bounds, desc=f"{mode} prefill", unit="chunk")
    with torch.no_grad():
        for s, e in bounds:
            chunk = input_ids[:, s - start : e - start]
            positions = torch.arange(s, e, device=chunk.device).expand(B, -1)
            logits = model(
                input_ids=chunk, position_ids=positions, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)
            ).logits[:, -1]
    cache.end_chunked_prefill()
    return logits

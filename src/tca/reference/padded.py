"""Left-padded batches (docs/semantics.md section 9.1), readable and exact: each sequence is its own prompt.

Legend: b batch element, h query head, l position, d head dim.
"""

from __future__ import annotations

import torch

from ..config import TCAConfig
from .cache import ReferenceKVCache, prefill


def prefill_padded(q, k, v, starts: list[int], budgets: torch.Tensor, config: TCAConfig, scale: float):
    """Prefill of a left-padded batch: sequence b is q, k, v[b, :, starts[b]:], prefilled alone.

    q [b, h, l, d], k, v [b, h_kv, l, d] "bhsd". Returns (out [b, h, l, d], its padding rows 0; one
    ReferenceKVCache per sequence, holding it at its own length in positions relative to its start)."""
    out = torch.zeros_like(q)
    caches: list[ReferenceKVCache] = []
    for b, start in enumerate(starts):
        own = (x[b : b + 1, :, start:] for x in (q, k, v))
        out_b, cache_b = prefill(*own, budgets, config, scale)
        out[b : b + 1, :, start:] = out_b
        caches.append(cache_b)
    return out, caches

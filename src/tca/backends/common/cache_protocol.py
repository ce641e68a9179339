"""The cache contract: what every compressed KV cache implements (docs/architecture.md, "the cache contract").

A decode step of token i (docs/semantics.md section 5) is always, in this order:

    cache.compress_leaving(q)   # the block leaving the window is scored by the current query; its top-t stay
    cache.append(k, v)          # the new token enters the local window
    out = cache.attend(q)       # one softmax over everything the cache holds

`decode_on_cache` below runs the three. A policy with another memory implements the same three calls:
`compress_leaving` decides where evicted tokens go and which of them to read back, as ReselectingCache does
(section 5c: evicted tokens kept, on the device or offloaded, and re-selected every N steps).

Shape letters: B batch, HQ query heads, HKV key/value heads, D head dim.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class KVCache(Protocol):
    """A compressed KV cache of one attention layer, for B sequences and HKV KV heads."""

    num_query_heads: int | None

    def compress_leaving(self, q: torch.Tensor) -> None:
        """Score the block that leaves the window when the next token arrives (q [B, HQ, 1, D]); keep its top-t."""

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the next token's k, v [B, HKV, 1, D] into the local window; advance every sequence by one."""

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """One softmax over everything held: q [B, HQ, 1, D] -> out [B, HQ, 1, D]."""

    @property
    def lengths(self) -> torch.Tensor:
        """[B, HKV] int64 tokens held per sequence and KV head (a host tensor: reading it never syncs)."""

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""

    def reset(self) -> None:
        """Forget every token (the cache can be prefilled again)."""


def decode_on_cache(cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One decode step of section 5 on any cache that follows the contract. Mutates the cache."""
    cache.compress_leaving(q)
    cache.append(k, v)
    return cache.attend(q)

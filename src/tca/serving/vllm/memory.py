"""What the KV cache really holds and what TCA reads of it (the honest numbers of docs/serving_vllm.md).

vLLM's block manager gives every KV head the same pages, so the pool still holds every token of every
running sequence: TCA's selection decides what is *read* (and computed), not what is *allocated*.
`kv_usage()` reports both, summed over the attention layers of this process, for the last forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerUsage:
    """One layer's numbers for its last forward (pool bytes, bytes of the batch's tokens, bytes TCA attends) and
    how many rows of each kind it ran since the engine started (prompts, later prompt chunks, decode steps)."""

    pool_bytes: int = 0
    sequence_bytes: int = 0
    kept_bytes: int = 0
    prompts: int = 0
    chunks: int = 0
    decodes: int = 0

    def begin(self, kv_cache: torch.Tensor) -> None:
        self.pool_bytes = kv_cache.numel() * kv_cache.element_size()
        self.sequence_bytes = self.kept_bytes = 0

    def add(self, kind: str, seq_len: int, kept_per_head: torch.Tensor, head_dim: int, element_size: int) -> None:
        """A row of `kind` ("prompts", "chunks" or "decodes") over seq_len tokens whose heads keep
        kept_per_head [HKV] tokens (keys and values)."""
        setattr(self, kind, getattr(self, kind) + 1)
        per_token = 2 * head_dim * element_size
        self.sequence_bytes += seq_len * kept_per_head.numel() * per_token
        self.kept_bytes += int(kept_per_head.sum()) * per_token


@dataclass(frozen=True)
class KVUsage:
    """Summed over layers. pool_bytes: vLLM's KV pool (allocated up front); sequence_bytes: the pages' worth of
    the last batch's tokens (what a dense backend reads); kept_bytes: what TCA's states keep and read."""

    pool_bytes: int
    sequence_bytes: int
    kept_bytes: int
    prompts: int
    chunks: int
    decodes: int

    @property
    def kept_fraction(self) -> float:
        return self.kept_bytes / self.sequence_bytes if self.sequence_bytes else 1.0


def kv_usage() -> KVUsage:
    """KV bytes of the TCA layers in this process (run the engine in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    from .backend import LIVE_IMPLS

    layers = [impl.usage for impl in list(LIVE_IMPLS)]
    return KVUsage(
        pool_bytes=sum(u.pool_bytes for u in layers),
        sequence_bytes=sum(u.sequence_bytes for u in layers),
        kept_bytes=sum(u.kept_bytes for u in layers),
        prompts=sum(u.prompts for u in layers),
        chunks=sum(u.chunks for u in layers),
        decodes=sum(u.decodes for u in layers),
    )

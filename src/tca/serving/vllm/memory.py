"""What the KV cache really holds and what TCA reads of it (the honest numbers of docs/serving_vllm.md).

vLLM's block manager gives every KV head the same pages, so the pool still holds every token of every
running sequence: TCA's selection decides what is *read* (and computed), not what is *allocated*.
`kv_usage()` reports both, summed over the attention layers of this process since their engine started.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

# Every live TCA layer implementation (CPU or CUDA backend), for kv_usage(): weak, so finished engines are not kept.
LIVE_IMPLS: weakref.WeakSet = weakref.WeakSet()
# Every live CUDA metadata builder, whose batched decode step keeps its counters on the device (its `usage`).
LIVE_BUILDERS: weakref.WeakSet = weakref.WeakSet()


@dataclass
class LayerUsage:
    """One layer's counters: its pool bytes, rows of each kind run (prompts, later prompt chunks, decode
    steps), forwards that mixed decode rows with prompt or chunk rows, and over the decode steps the KV bytes
    dense attention would read and the bytes TCA read."""

    pool_bytes: int = 0
    state_bytes: int = 0
    prompts: int = 0
    chunks: int = 0
    mixed: int = 0
    host_decodes: int = 0
    host_dense_bytes: int = 0
    # Summed where kept_per_head lives (the device): reading it back at every step would stall each layer until
    # the device caught up. `read_bytes` reads it when asked.
    read_on_device: torch.Tensor | int = 0
    # [3] int64 (decode rows with a state, dense bytes, read bytes) that the paged decode kernels add to on the
    # device (CUDA, where decode steps replay from CUDA graphs and no host code runs per step)
    paged: torch.Tensor | None = None

    def _paged(self, index: int) -> int:
        return 0 if self.paged is None else int(self.paged[index])

    @property
    def decodes(self) -> int:
        return self.host_decodes + self._paged(0)

    @property
    def dense_bytes(self) -> int:
        return self.host_dense_bytes + self._paged(1)

    @property
    def read_bytes(self) -> int:
        return int(self.read_on_device) + self._paged(2)

    def add(self, kind: str, seq_len: int, kept_per_head: torch.Tensor, head_dim: int, element_size: int) -> None:
        """A row of `kind` ("prompts", "chunks" or "decodes") over seq_len tokens, after which its heads keep
        kept_per_head [HKV] tokens. Prompts and chunks read every key (the selection scores them all)."""
        if kind == "decodes":
            per_token = 2 * head_dim * element_size  # a key and a value
            self.host_decodes += 1
            self.host_dense_bytes += seq_len * kept_per_head.numel() * per_token
            self.read_on_device = self.read_on_device + kept_per_head.sum() * per_token
        else:
            setattr(self, kind, getattr(self, kind) + 1)


@dataclass(frozen=True)
class KVUsage:
    """Summed over layers. pool_bytes: vLLM's KV pool (allocated up front, every head, every token);
    state_bytes: the CUDA backend's decode-state pools beside it (allocated up front, outside vLLM's memory
    profile; 0 on the CPU, whose states grow with what the sequences keep);
    prompts, chunks, decodes: rows run; mixed: forwards with decode and prompt/chunk rows together;
    dense_bytes / read_bytes: KV bytes a dense backend would have read over the decode steps / TCA read."""

    pool_bytes: int
    state_bytes: int
    prompts: int
    chunks: int
    decodes: int
    mixed: int
    dense_bytes: int
    read_bytes: int

    @property
    def read_fraction(self) -> float:
        """read_bytes / dense_bytes (1 when nothing was decoded)."""
        return self.read_bytes / self.dense_bytes if self.dense_bytes else 1.0


def kv_usage() -> KVUsage:
    """KV numbers of the TCA layers in this process (run the engine in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    layers = [holder.usage for holder in [*LIVE_IMPLS, *LIVE_BUILDERS]]
    return KVUsage(**{name: sum(getattr(u, name) for u in layers) for name in KVUsage.__dataclass_fields__})

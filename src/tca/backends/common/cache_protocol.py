"""The cache contract: what every KV cache of tca implements, and the capabilities some add
(docs/architecture.md, "Cache contract").

`KVCache`, the base, is what callers read of any cache `tca.prefill` returns (the oracle's included): its
shapes, sizes, config, and `record`, the one way to add what a prefill knows beyond the tensors. The
capabilities, each a runtime-checkable protocol that `isinstance` answers:

- `StepDecoding`: a decode step of token i (docs/semantics.md section 5) as three calls, always in this order,

      cache.compress_leaving(q)   # the block leaving the window is scored by the current query; its top-t stay
      cache.append(k, v)          # the new token enters the local window
      out = cache.attend(q)       # one softmax over everything the cache holds

  which `decode_on_cache` below runs. A policy with another memory implements the same three calls:
  `compress_leaving` decides where evicted tokens go and which of them to read back, as ReselectingCache does
  (section 5c: evicted tokens kept, on the device or offloaded, and re-selected every N steps).
- `Joinable`: `concat`, one batch from caches of single sequences (a left-padded batch prefilled one by one).
- `GraphCapturable`: a decode step a CUDA graph can capture and replay (tca.models.graphs).
- `Reselecting`: section 5c, evicted tokens kept in a store and chosen again every `every` steps.
- `Packable`: the same tokens as a PackedKVCache (the dense path's cache: what continues a streaming prefill,
  and what graph decoding captures in its place).

Shape letters: B batch, HQ query heads, HKV key/value heads, D head dim.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ...geometry import window_start


class HoldsPrefillFacts:
    """`record` and `use_kernels` for a cache that holds `num_query_heads`, `budgets` and `kernels` itself (the
    packed and the dense path's caches); a cache that wraps another forwards them instead."""

    def record(self, *, num_query_heads: int | None = None, budgets: torch.Tensor | None = None) -> None:
        """Record what a prefill knows beyond the tensors (each one given; None leaves it as it is)."""
        if num_query_heads is not None:
            self.num_query_heads = num_query_heads
        if budgets is not None:
            self.budgets = budgets

    def use_kernels(self, kernels) -> None:
        """Decode on `kernels` (a backend's decode kernels for this cache type) from now on."""
        self.kernels = kernels


@runtime_checkable
class KVCache(Protocol):
    """A KV cache of one attention layer, for B sequences and HKV KV heads: what any caller may read."""

    config: Any  # the TCAConfig it was made with
    scale: float
    num_query_heads: int | None  # HQ of the prefill (decode checks it); None where unknown
    budgets: torch.Tensor | None  # the [HKV, len(K)] budgets recorded for later streaming chunks, or None
    backend: str | None  # the backend a cache of its own type decodes on ("reference"), or None: any decode backend

    @property
    def batch_size(self) -> int:
        """B."""

    @property
    def num_kv_heads(self) -> int:
        """HKV."""

    @property
    def head_dim(self) -> int:
        """D."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the keys and values."""

    @property
    def device(self) -> torch.device:
        """Where the keys and values attention reads live."""

    @property
    def seq_len(self) -> int:
        """Tokens seen by the longest sequence (the next token's position, when the batch has one length)."""

    @property
    def seq_lens(self) -> list[int]:
        """[B] tokens seen by each sequence (padding excluded), on the host."""

    @property
    def lengths(self) -> torch.Tensor:
        """[B, HKV] int64 tokens held per sequence and KV head (a host tensor: reading it never syncs)."""

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values, device and host."""

    @property
    def used_nbytes(self) -> int:
        """Bytes of keys and values holding tokens (nbytes without spare capacity)."""

    @property
    def offloaded_nbytes(self) -> int:
        """Bytes of keys and values in host memory (0 unless a store is offloaded)."""

    def record(self, *, num_query_heads: int | None = None, budgets: torch.Tensor | None = None) -> None:
        """Record what a prefill knows beyond the tensors (each one given; None leaves it as it is)."""


@runtime_checkable
class StepDecoding(Protocol):
    """A decode step as the three calls of section 5 (`decode_on_cache`), on a backend's `kernels`."""

    def compress_leaving(self, q: torch.Tensor) -> None:
        """Score the block that leaves the window when the next token arrives (q [B, HQ, 1, D]); keep its top-t."""

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the next token's k, v [B, HKV, 1, D] into the local window; advance every sequence by one."""

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """One softmax over everything held: q [B, HQ, 1, D] -> out [B, HQ, 1, D]."""

    def use_kernels(self, kernels) -> None:
        """Decode on `kernels` (the decode backend's) from now on."""

    def reset(self) -> None:
        """Forget every token (the cache can be prefilled again)."""


@runtime_checkable
class Joinable(Protocol):
    """Caches of single sequences join into one batch of per-sequence lengths."""

    @classmethod
    def concat(cls, caches: list) -> Joinable:
        """One batch from `caches` (all of this type, same config, scale, heads, dtype and device)."""


@runtime_checkable
class GraphCapturable(Protocol):
    """A decode step with static shapes, which a CUDA graph captures and replays (tca.models.graphs): all its device
    work is predicated on device tensors, and its host bookkeeping is separate from it."""

    def prepare_capture(self, tokens: int) -> None:
        """Room for `tokens` more steps, allocated now, and static shapes from now on (every step does the same
        device work, as a replay will)."""

    def host_state(self) -> Any:
        """What the host knows of the cache (lengths, positions), to undo a capture's bookkeeping."""

    def restore_host_state(self, state: Any) -> None:
        """Put back what `host_state` returned."""

    def advance_host(self) -> None:
        """The host half of one decode step, after a replay ran its device half."""


@runtime_checkable
class Reselecting(Protocol):
    """Section 5c: the tokens section 5 evicts are kept in a store, and the active ones re-selected every `every`
    decode steps (such a cache cannot continue a streaming prefill)."""

    every: int
    active: KVCache  # the section 5 cache of the active set: what attention reads

    @property
    def evicted_lengths(self) -> torch.Tensor:
        """[B, HKV] int64 tokens in the evicted store, on the host."""

    @property
    def evicted_nbytes(self) -> int:
        """Bytes of keys and values in the evicted store."""


def reselection_read_bytes(cache: Reselecting) -> int:
    """KV bytes one decode step of a re-selecting cache reads, over all its sequences and heads, averaged over its
    period (docs/semantics.md section 5c, "cost"): the active set's keys and values at every step, and once per
    `every` steps the keys of every candidate (the tokens before the window), or with candidate blocks the active
    global keys, at most `blocks` x b evicted keys per head and the two summary rows of every block."""
    active = cache.active
    b, w = active.config.block_size, active.config.window
    before = torch.tensor([window_start(n - 1, b, w) for n in active.seq_lens])[:, None]  # [B, 1]
    candidates = before.expand(-1, active.num_kv_heads)
    blocks = getattr(cache, "blocks", None)
    if blocks is not None:
        evicted = cache.evicted_lengths.to(torch.int64)
        candidates = before - evicted + evicted.clamp_max(blocks * b) + 2 * (before // b)
    return int(active.used_nbytes) + int(candidates.sum()) * active.head_dim * active.dtype.itemsize // cache.every


@runtime_checkable
class Packable(Protocol):
    """A cache whose tokens can be held as a PackedKVCache (dense budgets: every token kept), with the same kernels."""

    def to_packed(self, kernels=None) -> Any:
        """The same tokens as a PackedKVCache (a new cache; this one is left as it is)."""


def decode_on_cache(cache: StepDecoding, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One decode step of section 5 on any cache with the three calls. Mutates the cache."""
    cache.compress_leaving(q)
    cache.append(k, v)
    return cache.attend(q)

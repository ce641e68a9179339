"""DenseKVCache: the cache of the dense path (backend="auto" below the measured crossover), every token kept.

TCA with dense budgets keeps every token (docs/semantics.md section 1), so its section 5 cache is a plain KV
cache and its decode step is exact dense attention. Holding it as one contiguous buffer per layer makes that path
cost what a model's own dense cache costs: no gather at prefill, no ragged segments, no compression step; two
small copies and one attention call per decode step.

Storage: keys, values [B, HKV, C, D]; every sequence's tokens end at column `columns`, so a left-padded batch
is right-aligned and sequence b occupies columns [pads[b], columns). The capacity C grows in whole blocks
(at most one block of spare room per head), copying the held tokens once per block of decoded tokens.
The attention of a decode step is the decode backend's (`kernels.attend_dense`: SDPA in torch, the split-K
kernel on Triton, which reads each (b, h)'s rows through the device tensors row_start / row_len).
`to_packed` gives the same tokens as a PackedKVCache with dense budgets, whose decode step a CUDA graph can
capture (graph decoding converts to it).

Shape letters: B batch, HQ query heads, HKV key/value heads, C columns of capacity, D head dim.
"""

from __future__ import annotations

import torch

from ...config import TCAConfig
from ...devices import to_device
from . import decode_torch, dense
from .cache_protocol import HoldsPrefillFacts
from .packed_cache import PackedKVCache


class DenseKVCache(HoldsPrefillFacts):
    """Every token of B sequences (HKV heads each), contiguous: the cache contract (cache_protocol.KVCache) with
    nothing to compress (capabilities StepDecoding and Joinable; not GraphCapturable: graph decoding captures its
    packed copy, `to_packed`). `kernels` supplies the attention of a decode step (`attend_dense(cache, q)`)."""

    backend = None  # any decode backend's kernels decode it

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, columns: int, pads: list[int], config: TCAConfig,
                 scale: float, num_query_heads: int | None = None, kernels=None, budgets=None) -> None:
        self.keys, self.values = keys, values
        self.budgets = budgets  # recorded budgets, if any (dense budgets keep every token whatever they say)
        self.columns = int(columns)
        self.pads = [int(p) for p in pads]
        self.config = config
        self.scale = float(scale)
        self.num_query_heads = num_query_heads
        self.kernels = kernels or decode_torch
        self._key_mask = None  # [B, 1, 1, C] bool on the device: which columns hold tokens (padded batches only)
        self._place_rows()

    @classmethod
    def from_prompt(cls, k: torch.Tensor, v: torch.Tensor, config: TCAConfig, scale: float,
                    num_query_heads: int | None = None) -> DenseKVCache:
        """The cache after a dense prefill of k, v [B, HKV, L, D] (one length for the batch)."""
        L = k.shape[2]
        B, H, _, D = k.shape
        capacity = _round_up(L, config.block_size)
        keys, values = k.new_empty(B, H, capacity, D), v.new_empty(B, H, capacity, D)
        keys[:, :, :L] = k
        values[:, :, :L] = v
        return cls(keys, values, L, [0] * B, config, scale, num_query_heads)

    @classmethod
    def concat(cls, caches: list[DenseKVCache]) -> DenseKVCache:
        """One batch from caches of single sequences of different lengths (a left-padded prompt prefilled one
        sequence at a time): right-aligned, so every sequence's next token goes to the same column."""
        first = caches[0]
        for other in caches[1:]:
            if (other.config, other.scale, other.num_kv_heads, other.head_dim, other.dtype, other.device) != (
                first.config, first.scale, first.num_kv_heads, first.head_dim, first.dtype, first.device
            ):
                raise ValueError("caches joined into one batch must share config, scale, heads, dtype and device")
        columns = max(c.columns for c in caches)
        capacity = _round_up(columns, first.config.block_size)
        H, D = first.num_kv_heads, first.head_dim
        keys = first.keys.new_zeros(sum(c.batch_size for c in caches), H, capacity, D)
        values = torch.zeros_like(keys)
        pads, row = [], 0
        for c in caches:
            shift = columns - c.columns
            keys[row : row + c.batch_size, :, shift:columns] = c.keys[:, :, : c.columns]
            values[row : row + c.batch_size, :, shift:columns] = c.values[:, :, : c.columns]
            pads += [p + shift for p in c.pads]
            row += c.batch_size
        return cls(keys, values, columns, pads, first.config, first.scale, first.num_query_heads, first.kernels)

    # ------------------------------------------------------------------ shape and size

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def seq_lens(self) -> list[int]:
        """Tokens of each sequence (padding excluded), on the host."""
        return [self.columns - p for p in self.pads]

    @property
    def seq_len(self) -> int:
        """Tokens of the longest sequence."""
        return self.columns - min(self.pads) if self.pads else 0

    @property
    def lengths(self) -> torch.Tensor:
        """[B, HKV] int64 tokens held per sequence and KV head (host): every token."""
        return torch.tensor(self.seq_lens, dtype=torch.int64)[:, None].expand(-1, self.num_kv_heads).clone()

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (capacity included: at most one block per head beyond the tokens)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    @property
    def used_nbytes(self) -> int:
        """Bytes of keys and values holding tokens."""
        return 2 * int(self.lengths.sum()) * self.head_dim * self.keys.element_size()

    @property
    def offloaded_nbytes(self) -> int:
        """Bytes of keys and values in host memory: none."""
        return 0

    # ------------------------------------------------------------------ the cache contract

    def compress_leaving(self, q: torch.Tensor) -> None:
        """Dense budgets keep every token of a leaving block: nothing to do."""

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [B, HKV, 1, D] of every sequence's next token into the next column."""
        self._grow(self.columns + 1)
        self.keys[:, :, self.columns] = k[:, :, 0]
        self.values[:, :, self.columns] = v[:, :, 0]
        self.columns += 1
        self.row_len += 1

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """Exact attention of q [B, HQ, 1, D] over every held token -> [B, HQ, 1, D]."""
        return self.kernels.attend_dense(self, q)

    def reset(self) -> None:
        """Forget every token (the buffers are released)."""
        self.keys, self.values = self.keys[:, :, :0].clone(), self.values[:, :, :0].clone()
        self.columns, self.pads, self._key_mask = 0, [0] * self.batch_size, None
        self._place_rows()

    # ------------------------------------------------------------------ capacity and conversion

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` more decode steps, allocated now (rounded up to a block)."""
        self._grow(self.columns + tokens)

    def key_mask(self) -> torch.Tensor:
        """[B, 1, 1, C] bool: True where a column holds a token of that sequence (made once per capacity)."""
        if self._key_mask is None or self._key_mask.shape[-1] != self.keys.shape[2]:
            pads = to_device(torch.tensor(self.pads), self.device)
            self._key_mask = (torch.arange(self.keys.shape[2], device=self.device) >= pads[:, None])[:, None, None]
        return self._key_mask

    def to_packed(self, kernels=None) -> PackedKVCache:
        """The same tokens as a PackedKVCache with dense budgets (its decode steps are capturable in a CUDA graph)."""
        n = self.columns
        kernels = kernels or self.kernels  # it decodes on the kernels this cache was bound to
        parts = [
            dense.packed_cache(self.keys[b : b + 1, :, p:n], self.values[b : b + 1, :, p:n], self.config, self.scale, kernels)
            for b, p in enumerate(self.pads)
        ] if any(self.pads) else [dense.packed_cache(self.keys[:, :, :n], self.values[:, :, :n], self.config, self.scale, kernels)]
        packed = parts[0] if len(parts) == 1 else PackedKVCache.concat(parts)
        packed.record(num_query_heads=self.num_query_heads)
        return packed

    def _grow(self, columns: int) -> None:
        if columns <= self.keys.shape[2]:
            return
        B, H, _, D = self.keys.shape
        capacity = _round_up(columns, self.config.block_size)
        for name in ("keys", "values"):
            old = getattr(self, name)
            grown = old.new_empty(B, H, capacity, D)
            grown[:, :, : self.columns] = old[:, :, : self.columns]
            setattr(self, name, grown)
        self._place_rows()

    def _place_rows(self) -> None:
        """Where each (b, h)'s tokens are in the flat buffer [B * HKV * C, D], on the device (split-K kernels read
        them there, with no host synchronisation): row_start [B, HKV] and row_len [B, HKV] int64, the latter
        advanced on the device by every append. Remade when the buffer is reallocated."""
        B, H, C = self.keys.shape[:3]
        device = self.device
        self.row_start = torch.arange(B * H, device=device, dtype=torch.int64).view(B, H) * C
        self.row_len = torch.full((B, H), self.columns, device=device, dtype=torch.int64)
        if any(self.pads):
            pads = to_device(torch.tensor(self.pads, dtype=torch.int64)[:, None], device)
            self.row_start += pads
            self.row_len -= pads
        self.no_local_positions = torch.zeros(B, device=device, dtype=torch.int64)

    def __repr__(self) -> str:
        return (f"DenseKVCache(B={self.batch_size}, HKV={self.num_kv_heads}, D={self.head_dim}, "
                f"seq_lens={self.seq_lens}, capacity={self.keys.shape[2]}, nbytes={self.nbytes})")


def prefill(q, k, v, config: TCAConfig, scale: float):
    """Dense prefill: (out [B, HQ, L, D] exact causal attention, the DenseKVCache holding every position)."""
    cache = DenseKVCache.from_prompt(k, v, config, scale, num_query_heads=q.shape[1])
    return dense.causal_attention(q, k, v, scale), cache


def _round_up(n: int, block: int) -> int:
    return -(-max(n, 1) // block) * block

"""What a backend implementation provides: the `TCABackend` protocol (typing.Protocol, checked by tests).

The registry (registry.py) declares each backend (devices, dtypes, head dims, and the capabilities it lacks,
with reasons) and imports its implementation on first use; the implementation is an object, usually a class
of static methods, with these entry points. All take validated "bhsd" tensors: q [B, HQ, LQ, D], k, v
[B, HKV, L, D] (LQ <= L, queries aligned to the end of the keys), budgets [HKV, K] float64 normalised (each row
sums to 1), a TCAConfig and a float scale.

Shape letters: B batch, HQ query heads, HKV key/value heads, LQ queries, L keys, D head dim, K retain counts,
N selected positions (padded), M calibration candidates.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..config import TCAConfig
from ..selection import Selection


@runtime_checkable
class TCABackend(Protocol):
    """Every backend: stateless attention, its two halves (for layered tests), and stateful decoding.

    A backend that declares it lacks "decode" may leave prefill/decode raising NotImplementedError.
    """

    @staticmethod
    def attention(q, k, v, budgets: torch.Tensor, config: TCAConfig, scale: float, return_lse: bool = False) -> Any:
        """Section 4: out [B, HQ, LQ, D] in q's dtype (and lse [B, HQ, LQ] fp32, fp64 for fp64 inputs)."""

    @staticmethod
    def select(q, k, budgets: torch.Tensor, config: TCAConfig, scale: float) -> Selection:
        """Section 3 from the last query row, as a (mask-form) tca.Selection."""

    @staticmethod
    def attend(q, k, v, selection: Selection, scale: float, return_lse: bool = False) -> Any:
        """Eq. 2 given a selection (possibly made by another backend)."""

    @staticmethod
    def prefill(q, k, v, budgets: torch.Tensor, config: TCAConfig, scale: float) -> tuple[torch.Tensor, Any]:
        """Attention over a prompt (LQ == L) and the compressed cache of section 5 (a KVCache)."""

    @staticmethod
    def decode(q, k, v, cache) -> torch.Tensor:
        """One token (LQ == L == 1) at position cache.seq_len: out [B, HQ, 1, D]; mutates the cache."""


@runtime_checkable
class CompactSelector(Protocol):
    """Backends that emit the selection in the compact form of tca.backends.common.compact (for kernels and
    for backends without a top-k of their own, such as flash)."""

    @staticmethod
    def select_indices(q, k, budgets: torch.Tensor, config: TCAConfig, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [B, HKV, N] int32 ascending, padded with L; counts [B, HKV] int32)."""


@runtime_checkable
class PaddedBatches(Protocol):
    """Backends without "varlen" in their lacks: a left-padded batch attended or prefilled in one call (section 9.1)."""

    @staticmethod
    def attention_padded(q, k, v, padding, budgets: torch.Tensor, config: TCAConfig, scale: float, return_lse: bool = False) -> Any:
        """Section 4 for sequence b = rows padding.starts[b]: of q, k, v (LQ == L) as if alone: out, its padding
        rows 0 (and lse [B, HQ, L] fp32, -inf on padding rows)."""

    @staticmethod
    def prefill_padded(q, k, v, padding, budgets: torch.Tensor, config: TCAConfig, scale: float) -> tuple[torch.Tensor, Any]:
        """prefill of sequence b = rows padding.starts[b]: of q, k, v (a tca.padding.LeftPadding; LQ == L) as if
        alone: (out, its padding rows 0; one cache of per-sequence lengths)."""


@runtime_checkable
class Calibrator(Protocol):
    """Backends without "calibration" in their lacks: the retained mass of section 6 for every candidate, and the
    retrieval mass of the calibration rules beyond the paper (section 6.1)."""

    @staticmethod
    def retained_mass(q, k, candidates: torch.Tensor, config: TCAConfig, scale: float, num_rows: int = ...):
        """a_m per KV head: q [B, HQ, L, D], k [B, HKV, L, D], candidates [M, K] -> [M, HKV] float64."""

    @staticmethod
    def retrieval_mass(q, k, candidates: torch.Tensor, config: TCAConfig, scale: float, answer_start: int):
        """a_m^ret per KV head on one probe: q [B, HQ, L, D], k [B, HKV, L, D], candidates [M, K], the answer rows
        answer_start .. L-1 -> [M, HKV] float64."""

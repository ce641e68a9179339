"""TorchBackend: the `torch` backend's entry points on validated "bhsd" inputs (see backends/registry.py).

Shape letters: B batch, HQ query heads, HKV key/value heads, LQ queries, L keys, D head dim, K retain counts.
"""

from __future__ import annotations

import torch

from ...config import TCAConfig
from ...geometry import num_budgeted_blocks
from ...selection import Selection
from ..common import chunked_prefill, compact, decode_torch
from ..common import selection_torch as _selection
from ..common.cache_protocol import decode_on_cache
from ..common.packed_cache import PackedKVCache
from .attention import attend_indices, causal_sdpa
from .calibration import retained_mass
from .retrieval_mass import retrieval_mass


def attend_virtual(q, keys, values, selected, config: TCAConfig, scale: float):
    """Section 4 given the selection mask selected [B, HKV, P] over the first P keys; q at the end of keys."""
    indices, counts = compact.from_mask(selected, keys.shape[2])
    return attend_indices(q, keys, values, indices, counts, selected, config.block_size, config.window, scale)


# Chunked prefill (section 5b) over the PackedKVCache: backends/common/chunked_prefill.py with this
# backend's attention and selection.
class TorchBackend(chunked_prefill.entry_points(attend=attend_virtual)):
    """Pure PyTorch, chunked over query blocks: O(L (w + N)) work and O(R (w + N)) memory, any device."""

    select = staticmethod(_selection.select)
    select_indices = staticmethod(_selection.select_indices)
    retained_mass = staticmethod(retained_mass)
    retrieval_mass = staticmethod(retrieval_mass)  # calibration rules beyond the paper (section 6.1)

    @staticmethod
    def attend(q, k, v, selection: Selection, scale: float, return_lse: bool = False):
        """Eq. 2 given a selection. q [B, HQ, LQ, D], k, v [B, HKV, L, D] -> out (, lse [B, HQ, LQ])."""
        indices, counts = compact.from_mask(selection.mask.to(q.device), k.shape[2])
        return attend_indices(
            q,
            k,
            v,
            indices,
            counts,
            selection.mask.to(q.device),
            selection.block_size,
            selection.window,
            scale,
            return_lse,
        )

    @staticmethod
    def attention(q, k, v, budgets: torch.Tensor, config: TCAConfig, scale: float, return_lse: bool = False):
        """Section 4: select from the last query row, attend. budgets [HKV, K] float64."""
        L, LQ = k.shape[2], q.shape[2]
        if num_budgeted_blocks(L, config.block_size, config.window) == 0 and not return_lse and LQ in (L, 1):
            return causal_sdpa(q, k, v, scale)  # L <= w: TCA is exact dense causal attention
        mask, _ = _selection.select_parts(q, k, budgets, config, scale)
        indices, counts = compact.from_mask(mask, L)
        return attend_indices(q, k, v, indices, counts, mask, config.block_size, config.window, scale, return_lse)

    @staticmethod
    def prefill(q, k, v, budgets: torch.Tensor, config: TCAConfig, scale: float):
        """Attention over the prompt (LQ == L) and the PackedKVCache holding Sel U [J*b, L) per KV head."""
        L = k.shape[2]
        mask, _ = _selection.select_parts(q, k, budgets, config, scale)
        indices, counts = compact.from_mask(mask, L)
        if mask.shape[-1] == 0:
            out = causal_sdpa(q, k, v, scale)
        else:
            out = attend_indices(q, k, v, indices, counts, mask, config.block_size, config.window, scale)
        cache = PackedKVCache.from_selected(k, v, indices, budgets, config, scale, kernels=decode_torch,
                                            num_query_heads=q.shape[1])
        return out, cache

    @staticmethod
    def decode(q, k, v, cache: PackedKVCache):
        """One token at position cache.seq_len: compress the leaving block, append, attend. Mutates the cache."""
        cache.use_kernels(decode_torch)
        return decode_on_cache(cache, q, k, v)

    cache_kernels = decode_torch

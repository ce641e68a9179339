"""DenseBackend: exact causal attention as a registered backend (registry name "dense", declared in
backends/dense.py), what TCA is with dense budgets: every token selected, every token kept.

Routing (backends/routing.py) puts it first below the measured crossover, where the sparse kernels cannot beat
the fused dense ones; named explicitly it runs dense attention at every length (an A/B baseline on the same
path). Its cache is the DenseKVCache (dense_cache.py), decoded on the decode backend's `attend_dense`.

Shape letters: B batch, HQ query heads, HKV key/value heads, LQ queries, L keys, D head dim, J budgeted blocks,
b block size.
"""

from __future__ import annotations

import torch

from ...config import TCAConfig
from ...geometry import num_budgeted_blocks
from ...selection import Selection
from . import dense, dense_cache
from .cache_protocol import decode_on_cache


class DenseBackend:
    """The `dense` backend's entry points on validated "bhsd" inputs (budgets are accepted and not read: dense
    budgets keep every token whatever the plan says)."""

    @staticmethod
    def attention(q, k, v, budgets: torch.Tensor, config: TCAConfig, scale: float, return_lse: bool = False):
        if return_lse:  # routing never sends such a call (the declaration lacks "lse"); a direct caller learns why
            raise ValueError("the dense backend returns no log-sum-exp (SDPA gives none); use a TCA backend")
        return dense.causal_attention(q, k, v, scale)

    @staticmethod
    def select(q, k, budgets: torch.Tensor, config: TCAConfig, scale: float) -> Selection:
        """Every position of every budgeted block: the selection of dense budgets (t_j = b)."""
        B, HKV, L = k.shape[0], k.shape[1], k.shape[2]
        J = num_budgeted_blocks(L, config.block_size, config.window)
        mask = torch.ones(B, HKV, J * config.block_size, dtype=torch.bool, device=k.device)
        block_budgets = torch.full((B, HKV, J), config.block_size, dtype=torch.int64, device=k.device)
        return Selection(mask, block_budgets, config.block_size, config.window, L)

    @staticmethod
    def attend(q, k, v, selection: Selection, scale: float, return_lse: bool = False):
        if return_lse:
            raise ValueError("the dense backend returns no log-sum-exp (SDPA gives none); use a TCA backend")
        if not bool(selection.mask.all()):
            raise ValueError("the dense backend attends every token: it takes only the selection of dense budgets "
                             "(its own `select`); attend other selections on a TCA backend")
        return dense.causal_attention(q, k, v, scale)

    @staticmethod
    def prefill(q, k, v, budgets: torch.Tensor, config: TCAConfig, scale: float):
        """Exact causal attention over the prompt and the DenseKVCache holding every position."""
        return dense_cache.prefill(q, k, v, config, scale)

    @staticmethod
    def decode(q, k, v, cache):
        """One token on the cache's kernels (the decode backend routing chose at prefill). Mutates the cache."""
        return decode_on_cache(cache, q, k, v)

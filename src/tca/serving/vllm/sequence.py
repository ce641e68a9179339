"""TCA for one sequence of a vLLM batch, over the paged KV cache (pure PyTorch, no vLLM import).

* `attend_chunk`: queries at the last LQ positions of an L-token sequence (a whole prompt, a chunk of one, or
  several tokens at once): the selection of docs/semantics.md section 3 from the last query row over all L
  keys, then Eq. 2 over the kept pairs only (section 4), on a tca backend's `select` and `attend`. It returns
  the sequence's decode state: the selected global tokens and the window start.
  Decode steps continue that state: paged_states.py (every decode row of a batch at once).

Shape letters: HQ query heads, HKV key/value heads, G = HQ / HKV, LQ queries, L keys, D head dim, b TCA block
size, N kept global tokens (padded to the max over heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import TCAConfig
from ...geometry import window_start
from .paged import PagedSequence


@dataclass
class SequenceState:
    """What one sequence keeps of one layer, per KV head (section 5, positions only; K/V stay in the pages).

    seq_len: tokens the state covers. window_start: lo(seq_len - 1); every position from it on is kept.
    positions: [HKV, N] int64 kept global positions (ascending, before window_start), then -1 in every slot past
        counts (a hole: attention masks positions < 0; this is not the compact form, which pads with L);
    counts: [HKV] int64 how many of each row are valid.
    """

    seq_len: int
    window_start: int
    positions: torch.Tensor
    counts: torch.Tensor

    def kept_tokens(self) -> torch.Tensor:
        """[HKV] tokens attended per head by the next step (global + window)."""
        return self.counts + (self.seq_len - self.window_start)


def attend_chunk(
    query: torch.Tensor,
    paged: PagedSequence,
    seq_len: int,
    budgets: torch.Tensor,
    config: TCAConfig,
    scale: float,
    impl,
) -> tuple[torch.Tensor, SequenceState]:
    """query [LQ, HQ, D] at positions seq_len - LQ .. seq_len - 1 -> (out [LQ, HQ, D], the sequence's state).

    budgets: [HKV, len(K)] float64 on query's device. impl: a tca backend implementation with `select` and
    `attend` (tca.backends.registry). The keys 0 .. seq_len-1 must already be in the pages.
    """
    k, v = paged.prefix(seq_len)  # [HKV, L, D]
    q = query.transpose(0, 1)[None]  # [1, HQ, LQ, D]
    k, v = k[None].to(q.dtype), v[None].to(q.dtype)
    selection = impl.select(q, k, budgets, config, scale)
    out = impl.attend(q, k, v, selection, scale)
    indices, counts = selection.padded_indices(fill=-1)  # the state's empty-slot marker, not the compact form's L
    state = SequenceState(
        seq_len=seq_len,
        window_start=window_start(seq_len - 1, config.block_size, config.window),
        positions=indices[0].to(query.device),
        counts=counts[0].to(query.device),
    )
    return out[0].transpose(0, 1), state

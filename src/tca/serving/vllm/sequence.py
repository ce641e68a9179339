"""TCA for one sequence of a vLLM batch, over the paged KV cache (pure PyTorch, no vLLM import).

* `attend_chunk`: queries at the last LQ positions of an L-token sequence (a whole prompt, a chunk of one, or
  several tokens at once): the selection of docs/semantics.md section 3 from the last query row over all L
  keys, then Eq. 2 over the kept pairs only (section 4), on a tca backend's `select` and `attend`. It returns
  the sequence's decode state: the selected global tokens and the window start.
* `decode_token`: one new token with a state (section 5): if the window moved, the block that left it is
  compressed to its t = max(1, floor(E[p])) most important tokens under the current query; then one softmax
  over what the state keeps. Only the kept tokens are read from the pages.

Shape letters: HQ query heads, HKV key/value heads, G = HQ / HKV, LQ queries, L keys, D head dim, b TCA block
size, N kept global tokens (padded to the max over heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...backends.common.decode_torch import leaving_block_importance
from ...config import TCAConfig
from ...dtypes import compute_dtype
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

    def append_global(self, new_positions: torch.Tensor, new_counts: torch.Tensor) -> None:
        """Add per-head positions [HKV, T] (the first new_counts[h] valid, ascending) after the current ones."""
        heads, n = self.positions.shape
        total = self.counts + new_counts
        width = max(n, int(total.max()))
        grown = self.positions.new_full((heads, width + 1), -1)  # the last column catches invalid entries
        grown[:, :n] = self.positions
        offsets = torch.arange(new_positions.shape[1], device=grown.device)
        valid = offsets < new_counts[:, None]
        grown.scatter_(1, torch.where(valid, self.counts[:, None] + offsets, width), torch.where(valid, new_positions, -1))
        self.positions, self.counts = grown[:, :width], total


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


def compress_leaving_block(
    q: torch.Tensor, paged: PagedSequence, state: SequenceState, start: int, end: int, keep: torch.Tensor, scale: float
) -> None:
    """Keep the top keep[h] tokens of positions [start, end) per KV head, scored by q [HKV, G, D] (fp32+).

    Importance: the group's mean of a softmax over the block (tca.backends.common.decode_torch, shared with the
    torch backend); ties go to the smaller position (stable sort).
    """
    width = int(keep.max())  # keep lives on the host (LayerRunner): no wait for the device
    keep = keep.to(q.device)
    block = torch.arange(start, end, device=paged.pages.device)
    k, _ = paged.gather(block)  # [HKV, b, D]
    scores = leaving_block_importance(q, k, scale)  # [HKV, b], section 8's rule for non-finite logits
    top = scores.sort(dim=-1, descending=True, stable=True).indices[:, :width]  # [HKV, T]
    valid = torch.arange(width, device=top.device) < keep[:, None]
    top = torch.where(valid, top, end - start).sort(dim=-1).values  # kept offsets ascending, invalid last
    state.append_global(torch.where(valid, start + top, -1), keep)


def decode_token(
    query: torch.Tensor,
    paged: PagedSequence,
    state: SequenceState,
    keep: torch.Tensor,
    config: TCAConfig,
    scale: float,
) -> torch.Tensor:
    """query [HQ, D] of position state.seq_len (its key/value already in the pages) -> out [HQ, D].

    keep: [HKV] int64 tokens kept of a block that leaves the window (tca.budgets.block_keep_count).
    Mutates the state (section 5: compress the leaving block with the current query, then attend).
    """
    HQ, D = query.shape
    HKV = state.positions.shape[0]
    position = state.seq_len
    dt = compute_dtype(query.dtype)
    q = query.to(dt).reshape(HKV, HQ // HKV, D)
    lo = window_start(position, config.block_size, config.window)
    if lo > state.window_start:  # a block boundary was crossed: [lo(i-1), lo(i)) leaves the window
        compress_leaving_block(q, paged, state, state.window_start, lo, keep, scale)
    state.seq_len, state.window_start = position + 1, lo
    # One gather of every kept position (globals, then the window) per head, and one fused masked softmax.
    window = torch.arange(lo, position + 1, device=state.positions.device).expand(HKV, -1)
    positions = torch.cat([state.positions, window], dim=1)  # [HKV, N + W], -1 where a head keeps fewer
    keys, values = paged.gather_per_head(positions.clamp_min(0))  # [HKV, N + W, D]
    mask = (positions >= 0)[:, None, None]  # [HKV, 1, 1, N + W]
    # On CUDA, half-precision pages go to SDPA as they are (its kernels accumulate in float32): no float32 copy of
    # the kept keys and values each step. Elsewhere the float64-or-float32 rule of tca.dtypes.
    at = query.dtype if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) else dt
    # Not cuDNN's kernel: its execution plans are cached per key length, which grows at every step. (Leaving it
    # out did not make vLLM's decode steps faster on an H100; their time is host-side, docs/benchmarks.md.)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(  # heads as the batch, each group's G queries as its rows
            q[:, None].to(at), keys[:, None].to(at), values[:, None].to(at), attn_mask=mask, scale=scale
        )  # [HKV, 1, G, D]
    return out.reshape(HQ, D).to(query.dtype)

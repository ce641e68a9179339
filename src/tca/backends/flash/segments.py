"""The packed ("varlen") segments the flash backend sends to FlashAttention, reproducing semantics.md section 4.

Pure torch, no flash import: tests check these plans on CPU.

Shape letters: B batch, HQ query heads, HKV key/value heads, G = HQ / HKV, L keys, LQ query rows (aligned
to the end of the keys), D head dim, b block size, w window, C query blocks touched by the LQ rows,
N selected tokens per (batch, KV head) (padded to the largest count).

The kept set of the query at position i is S(i) = {selected j < lo(i)} U [lo(i), i], with lo(i) block aligned
(all rows of a query block share it). Both parts are *per query block*, so each (batch, query head, query
block) becomes one varlen sequence of at most b rows, in two flash calls:
  local:  keys [lo(c), end(c)) of the original K, causal (bottom-right: row at position p sees keys <= p);
  global: the first n(c) = #{selected < lo(c)} entries of the gathered selected keys (a prefix, because the
          selection is sorted by position), not causal.
The two results are merged by their log-sum-exps (merge.py): one softmax over S(i), no overlap since the
global part stops before lo(c) where the local part starts.
Key segments of different query blocks overlap (consecutive windows share w - b keys; every global prefix
starts at the same row): generations that read (offset, length) in place (FA3, FA4) need no copy at all,
so the memory is O(L + N) per head, never O(L / b * w) or O(L / b * N).
One sequence per *query* head (not per KV head) lets q, k, v and the output keep the "bhsd" layout as free
views: q [B, HQ, LQ, D] is [(B HQ LQ), 1, D]; k [B, HKV, L, D] is [(B HKV L), 1, D].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...geometry import window_start


@dataclass(frozen=True)
class Segments:
    """One flash varlen call: S sequences (S = B * HQ * C, ordered by batch, query head, query block).

    cu_seqlens_q: [S + 1] int32 rows of the packed queries (contiguous, in order).
    k_starts, k_lens: [S] int32, rows of the key buffer each sequence reads (segments may overlap).
    """

    cu_seqlens_q: torch.Tensor
    k_starts: torch.Tensor
    k_lens: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool


@dataclass(frozen=True)
class QueryBlocks:
    """The query blocks the LQ rows touch (positions L - LQ .. L - 1), per block c (first .. last).

    row_start: [C] first query row (0-based in q) of each block; rows: [C] its number of rows;
    end: [C] one past its last position; lo: [C] its window start lo(c).
    """

    row_start: torch.Tensor
    rows: torch.Tensor
    end: torch.Tensor
    lo: torch.Tensor

    @property
    def count(self) -> int:
        return self.rows.numel()


def query_blocks(L: int, LQ: int, block_size: int, window: int, device) -> QueryBlocks:
    first_pos = L - LQ
    c = torch.arange(first_pos // block_size, (L - 1) // block_size + 1, device=device, dtype=torch.int64)
    start = torch.clamp(c * block_size, min=first_pos)
    end = torch.clamp((c + 1) * block_size, max=L)
    lo = window_start(c * block_size, block_size, window)
    return QueryBlocks(row_start=start - first_pos, rows=end - start, end=end, lo=lo)


def _per_head(blocks: QueryBlocks, B: int, HQ: int, LQ: int):
    """cu_seqlens_q [S + 1] over (batch, query head, block), and the (batch, query head) index grids [B, HQ, 1]."""
    dev = blocks.rows.device
    bh = torch.arange(B * HQ, device=dev).view(B, HQ, 1)
    starts = bh * LQ + blocks.row_start.view(1, 1, -1)
    cu = torch.cat([starts.reshape(-1), torch.tensor([B * HQ * LQ], device=dev)])
    return cu.to(torch.int32), bh


def local_segments(B: int, HQ: int, HKV: int, L: int, LQ: int, block_size: int, window: int, device) -> Segments:
    """The local part: query block c reads keys [lo(c), end(c)) of its KV head, causal (bottom-right).

    Key buffer: k as [(B HKV L), 1, D]. Bottom-right causal inside the sequence makes the row at position p
    see exactly keys lo(c) .. p (the sequence's last row is position end(c) - 1, its last key too).
    """
    blocks = query_blocks(L, LQ, block_size, window, device)
    cu, bh = _per_head(blocks, B, HQ, LQ)
    G = HQ // HKV
    kv_row = (bh // HQ) * HKV + (bh % HQ) // G  # [B, HQ, 1] flat (batch, KV head)
    k_starts = kv_row * L + blocks.lo.view(1, 1, -1)
    k_lens = (blocks.end - blocks.lo).view(1, 1, -1).expand(B, HQ, -1)
    return Segments(
        cu_seqlens_q=cu,
        k_starts=k_starts.reshape(-1).to(torch.int32),
        k_lens=k_lens.reshape(-1).to(torch.int32),
        max_seqlen_q=int(blocks.rows.max()),
        max_seqlen_k=int((blocks.end - blocks.lo).max()),
        causal=True,
    )


def global_prefix_counts(indices: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """n[b, h, c] = number of selected positions < lo(c): the selected prefix query block c sees.

    indices: [B, HKV, N] in the compact form (ascending, padded with L >= every lo)  ->  [B, HKV, C] int64.
    """
    B, H, _ = indices.shape
    values = lo.to(indices.dtype).view(1, 1, -1).expand(B, H, -1).contiguous()
    return torch.searchsorted(indices.contiguous(), values, right=False)


def global_segments(prefix: torch.Tensor, B: int, HQ: int, HKV: int, LQ: int, L: int, block_size: int, window: int,
                    n_max: int, device) -> Segments:
    """The global part: query block c reads the first prefix[b, h, c] gathered selected keys, not causal.

    Key buffer: the gathered selected keys [(B HKV N), 1, D] (N = n_max rows per (batch, KV head)).
    """
    blocks = query_blocks(L, LQ, block_size, window, device)
    cu, bh = _per_head(blocks, B, HQ, LQ)
    G = HQ // HKV
    kv_row = (bh // HQ) * HKV + (bh % HQ) // G  # [B, HQ, 1]
    k_starts = (kv_row * n_max).expand(B, HQ, blocks.count)
    k_lens = prefix.repeat_interleave(G, dim=1)  # [B, HQ, C]: query head h reads KV head h // G
    return Segments(
        cu_seqlens_q=cu,
        k_starts=k_starts.reshape(-1).to(torch.int32),
        k_lens=k_lens.reshape(-1).to(torch.int32),
        max_seqlen_q=int(blocks.rows.max()),
        max_seqlen_k=int(prefix.max()) if prefix.numel() else 0,
        causal=False,
    )


def rows_with_keys(segments: Segments, total_q: int) -> torch.Tensor:
    """[TQ] bool: rows whose sequence has at least one key (the others take no part in the merge)."""
    lens_q = (segments.cu_seqlens_q[1:] - segments.cu_seqlens_q[:-1]).long()
    has = segments.k_lens > 0
    return torch.repeat_interleave(has, lens_q, output_size=total_q)

"""The one call the flash backend makes, normalised over FlashAttention generations.

    varlen(q, k, v, cu_seqlens_q, k_starts, k_lens, max_seqlen_q, max_seqlen_k, causal, scale, window)
        -> out [TQ, H, D] (q's dtype), lse [TQ, H] float32 (natural log of sum exp(scale * q.k))

Packed ("varlen") layout, S sequences: q [TQ, H, D] with sequence s in rows cu_seqlens_q[s] .. [s+1];
its keys are rows k_starts[s] .. k_starts[s] + k_lens[s] of k, v [TK, HK, D] (HK divides H: GQA).
Key segments may overlap (several query blocks read the same window): FA3 and FA4 take the offsets as
cu_seqlens_k with the lengths as seqused_k and read in place; FA2's Python API has no seqused_k, so its
adapter copies each segment out (in chunks that bound the extra memory).
causal: bottom-right aligned inside each sequence (row r of a sequence of m rows and n keys sees keys
<= r + n - m). window: (left, right) in FA's per-row sense, None meaning unlimited (FA2/FA3 say -1, FA4 None).

A sequence with no keys gives out 0 and lse -inf on every generation we know, but callers must not rely on
it (tca's merge masks those rows by their known lengths).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VarlenResult:
    out: torch.Tensor  # [TQ, H, D]
    lse: torch.Tensor  # [TQ, H] float32


def fa_window(window: tuple[int | None, int | None] | None, unlimited) -> tuple:
    """(left, right) with None = unlimited, in the convention of a generation (`unlimited` is -1 or None)."""
    if window is None:
        return (unlimited, unlimited)
    left, right = window
    return (unlimited if left is None else int(left), unlimited if right is None else int(right))


def lse_rows_first(lse: torch.Tensor, total_q: int, heads: int) -> torch.Tensor:
    """FA's varlen LSE is [H, TQ] (FA2 >= 2.4, FA3, FA4); return it as [TQ, H] float32 (a view when possible)."""
    if tuple(lse.shape) != (heads, total_q):
        raise RuntimeError(
            f"FlashAttention returned a log-sum-exp of shape {tuple(lse.shape)}, expected ({heads}, {total_q}) "
            "as [heads, total_q]; flash-attn older than 2.4 pads it per batch: upgrade flash-attn"
        )
    return lse.float().transpose(0, 1)


def cu_seqlens_k_from_starts(k_starts: torch.Tensor, total_k: int) -> torch.Tensor:
    """[S + 1] int32 offsets for FA3/FA4: k_starts, then the buffer end (unused once seqused_k is given)."""
    end = torch.full((1,), total_k, dtype=torch.int32, device=k_starts.device)
    return torch.cat([k_starts.to(torch.int32), end]).contiguous()


def gather_segments(k_starts: torch.Tensor, k_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices that copy segments [start, start + len) one after another, and their cu_seqlens [S + 1].

    For generations that cannot read overlapping key segments in place (FA2).
    """
    lens = k_lens.long()
    cu = torch.zeros(lens.numel() + 1, dtype=torch.long, device=lens.device)
    torch.cumsum(lens, 0, out=cu[1:])
    total = int(cu[-1])
    seg = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens, output_size=total)
    rows = k_starts.long()[seg] + torch.arange(total, device=lens.device) - cu[:-1][seg]
    return rows, cu.to(torch.int32)


def chunk_sequences(k_lens: torch.Tensor, max_keys: int) -> list[tuple[int, int]]:
    """Split sequences 0..S-1 into consecutive ranges whose total keys stay under `max_keys` (>= 1 sequence each)."""
    lens = k_lens.long().cpu().tolist()
    chunks, start, total = [], 0, 0
    for s, n in enumerate(lens):
        if s > start and total + n > max_keys:
            chunks.append((start, s))
            start, total = s, 0
        total += n
    chunks.append((start, len(lens)))
    return chunks


MAX_PACKED_KEYS = 1 << 22  # copied key rows per flash call in copy mode (x HK x D x 2 bytes, for K and V)
COPY_KV_ENV = "TCA_FLASH_COPY_KV"  # "1": copy key segments out even where flash could read them in place


def packed_copies(q, k, v, cu_seqlens_q, k_starts, k_lens, max_keys: int, call) -> VarlenResult:
    """Run a varlen attention whose key segments may overlap on a flash API that needs them contiguous.

    Sequences are taken in chunks of at most `max_keys` copied key rows; each chunk's segments are copied
    into a packed buffer and `call(q_chunk, k_packed, v_packed, cu_q, cu_k)` runs flash on it, returning
    (out [TQc, H, D], lse [TQc, H]). A chunk without any key is not sent (out 0, lse -inf).
    """
    cu_q = cu_seqlens_q.long()
    outs, lses = [], []
    for first, last in chunk_sequences(k_lens, max_keys):
        q0, q1 = int(cu_q[first]), int(cu_q[last])
        rows, cu_k = gather_segments(k_starts[first:last], k_lens[first:last])
        if rows.numel() == 0:
            outs.append(q.new_zeros(q1 - q0, q.shape[1], v.shape[-1]))
            lses.append(torch.full((q1 - q0, q.shape[1]), float("-inf"), device=q.device))
            continue
        out, lse = call(q[q0:q1], k[rows], v[rows], (cu_q[first : last + 1] - q0).to(torch.int32), cu_k)
        outs.append(out)
        lses.append(lse)
    return VarlenResult(torch.cat(outs), torch.cat(lses))

"""Launch code of the Triton backend: shapes, grids, tile sizes; the `TritonBackend` implementation class.

Hot paths (select_indices, sparse_attention, decode) issue no host synchronisation: every size they need
(J, the padding of the selected list, the grid) follows from the shapes; per-head counts stay on the device.
Kernels live in kernels_*.py. Shape letters: B, HQ, HKV, G = HQ / HKV, L keys, LQ queries, D head dim,
J budgeted blocks, b block size, N padded selected positions per KV head (J * b: the dense upper bound).
"""

from __future__ import annotations

import os

import torch
import triton

from ...budgets import block_keep_count
from ...geometry import num_budgeted_blocks, window_start
from ...selection import Selection
from ..torch.selection import budget_counts  # Eq. 7 counts: vectorised torch, shared with the torch backend
from . import kernels_attention, kernels_decode, kernels_selection

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 on GPUs: the tolerance table assumes full fp32 products.
    return "ieee" if dtype == torch.float32 else "tf32"


def _rows_pad(G: int) -> int:
    """Rows of a single-query tile: G query heads padded to a power of two, at least 16 (tl.dot minimum)."""
    return max(16, triton.next_power_of_2(G))


# ----------------------------------------------------------------------------------------------- selection
def last_query_importance_logits(q_last: torch.Tensor, k: torch.Tensor, scale: float):
    """Eq. 5 statistics: logits [B, HKV, G, L] fp32 in log2 units, row max and row sum of exp2 [B, HKV, G].

    q_last: [B, HQ, D], k: [B, HKV, L, D]. One pass over K; the partial (max, sum) per chunk are merged
    with a few torch ops (O(G * L / BLOCK_L) numbers)."""
    B, HQ, D = q_last.shape
    HKV, L = k.shape[1], k.shape[2]
    G = HQ // HKV
    block_l = 128
    n_chunks = triton.cdiv(L, block_l)
    logits = torch.empty(B, HKV, G, L, device=k.device, dtype=torch.float32)
    part_max = torch.empty(B, HKV, G, n_chunks, device=k.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    kernels_selection.last_query_logits_kernel[(B * HKV, n_chunks)](
        q_last, k, logits, part_max, part_sum,
        *q_last.stride(), *k.stride(),
        L, HKV, n_chunks, scale * LOG2E,
        G=G, G_PAD=_rows_pad(G), D=D, BLOCK_L=block_l, PREC=_precision(k.dtype),
        num_warps=4,
    )
    row_max = part_max.amax(-1)
    # chunks with no finite logit (part_max = -inf, part_sum = 0) add 0, also when the whole row has none
    row_sum = torch.where(part_sum > 0, part_sum * torch.exp2(part_max - row_max[..., None]), 0.0).sum(-1)
    return logits, row_max, row_sum


def block_keep_from_ranks(ranks: torch.Tensor, budgets: torch.Tensor, block_size: int) -> torch.Tensor:
    """t_j = Psi[r_j]: ranks [B, HKV, J] int64, budgets [HKV, len(K)] -> int32 [B, HKV, J]."""
    B, H, J = ranks.shape
    counts = budget_counts(budgets, J)  # [HKV, len(K)]
    n = counts.shape[-1]
    k_desc = 2 ** torch.arange(n - 1, -1, -1, device=ranks.device)
    ends = counts.flip(-1).cumsum(-1)  # Psi[r] is the k of the first descending group whose end exceeds r
    group = torch.searchsorted(ends.expand(B, H, n).contiguous(), ranks.contiguous(), right=True).clamp_max(n - 1)
    return k_desc[group].to(torch.int32)


def _select(q: torch.Tensor, k: torch.Tensor, budgets: torch.Tensor, config, scale: float) -> dict:
    """Sections 3.1-3.4 on the device. Returns rank [B,HKV,J*b] int32 (within-block rank), keep [B,HKV,J]
    int32 (t_j), offsets [B,HKV,J+1] int32, indices [B,HKV,max(J*b,1)] int32 (sorted, padded with -1),
    counts [B,HKV] int32."""
    B, HQ = q.shape[:2]
    HKV, L = k.shape[1], k.shape[2]
    G = HQ // HKV
    b = config.block_size
    J = num_budgeted_blocks(L, b, config.window)
    dev = k.device
    if J == 0:
        zeros = torch.zeros(B, HKV, 1, device=dev, dtype=torch.int32)
        return {
            "rank": zeros[..., :0], "keep": zeros[..., :0], "offsets": zeros,
            "indices": torch.full((B, HKV, 1), -1, device=dev, dtype=torch.int32), "counts": zeros[..., 0],
        }
    logits, row_max, row_sum = last_query_importance_logits(q[:, :, -1], k, scale)
    priority = torch.empty(B, HKV, J, device=dev, dtype=torch.float32)
    rank = torch.empty(B, HKV, J * b, device=dev, dtype=torch.int32)
    mass_factor = float(J) if config.mass_scale == "mean" else 1.0
    kernels_selection.block_scores_kernel[(B * HKV, J)](
        logits, row_max, row_sum, priority, rank,
        L, J, mass_factor, float(config.alpha),
        G=G, G_PAD=_rows_pad(G), BS=b, num_warps=4 if b <= 128 else 8,
    )
    # Ranking of J blocks (ties to the smaller index): a stable sort, on the device.
    order = priority.sort(dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(J, device=dev).expand_as(order))
    keep = block_keep_from_ranks(ranks, budgets, b)
    offsets = torch.zeros(B, HKV, J + 1, device=dev, dtype=torch.int32)
    torch.cumsum(keep, dim=-1, out=offsets[..., 1:])
    indices = torch.full((B, HKV, J * b), -1, device=dev, dtype=torch.int32)
    kernels_selection.compact_kernel[(B * HKV, J)](rank, keep, offsets, indices, J, indices.stride(1), BS=b)
    return {"rank": rank, "keep": keep, "offsets": offsets, "indices": indices, "counts": offsets[..., -1]}


def select_indices(q, k, budgets, config, scale):
    """The selection as (indices [B, HKV, N] int32 sorted ascending, padded with -1 to N = max(J*b, 1);
    counts [B, HKV] int32). q: [B, HQ, LQ, D] (last row used), k: [B, HKV, L, D], budgets [HKV, len(K)]."""
    sel = _select(q, k, budgets, config, scale)
    return sel["indices"], sel["counts"]


def to_selection(sel: dict, config, seq_len: int) -> Selection:
    """A tca.Selection (mask form) from the device selection (for tests and the cache; not a hot path)."""
    b = config.block_size
    rank, keep = sel["rank"], sel["keep"]
    B, H, J = keep.shape
    mask = (rank.view(B, H, J, b) < keep[..., None]).reshape(B, H, J * b)
    return Selection(mask=mask, block_budgets=keep.long(), block_size=b, window=config.window, seq_len=seq_len)


# ----------------------------------------------------------------------------------------------- attention
# Tile overrides per (G padded, D): {"block_q", "block_n", "num_warps", "num_stages"}; the benchmark's short
# sweep may fill it. Defaults below come from a sweep on an H100 (Llama shape, 32K tokens, bf16).
TILE_OVERRIDES: dict[tuple[int, int], dict] = {}


def _attention_tiles(G: int, D: int, block_size: int) -> dict:
    g_pad = triton.next_power_of_2(G)
    tiles = {
        "block_q": min(block_size, max(16, 128 // g_pad)),
        "block_n": 64 if D <= 128 else 32,
        "num_warps": 8,
        "num_stages": 3,
    }
    tiles.update(TILE_OVERRIDES.get((g_pad, D), {}))
    return tiles


def sparse_attention(
    q, k, v, indices, offsets, block_size: int, window: int, scale: float, return_lse: bool = False, tiles=None
):
    """Eq. 2 given a selection in compact form. q: [B, HQ, LQ, D] (bottom-right aligned), k, v: [B, HKV, L, D];
    indices [B, HKV, N] int32 sorted selected positions; offsets [B, HKV, J+1] int32 (selected below block j).
    Returns out [B, HQ, LQ, D] (q's dtype) and lse [B, HQ, LQ] fp32 when asked.
    tiles: optional overrides {"block_q", "block_n", "num_warps", "num_stages"} (benchmark sweeps)."""
    B, HQ, LQ, D = q.shape
    HKV, L = k.shape[1], k.shape[2]
    G = HQ // HKV
    g_pad = triton.next_power_of_2(G)
    tiles = {**_attention_tiles(G, D, block_size), **(tiles or {})}
    block_q, block_n = tiles["block_q"], tiles["block_n"]
    if block_size % block_q:
        raise ValueError(f"the query tile ({block_q}) must divide the block size ({block_size})")
    out = torch.empty_like(q)
    lse = torch.empty(B, HQ, LQ, device=q.device, dtype=torch.float32) if return_lse else out
    first = ((L - LQ) // block_q) * block_q
    n_tiles = triton.cdiv(L - first, block_q)
    indices = indices.contiguous()
    offsets = offsets.contiguous()
    extra = {} if INTERPRET else {"num_warps": tiles["num_warps"], "num_stages": tiles["num_stages"]}
    kernels_attention.sparse_prefill_kernel[(n_tiles, B * HKV)](
        q, k, v, out, lse, indices, offsets,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        indices.stride(1), offsets.stride(1),
        HKV, HQ, L, LQ, first, block_size, window, scale * LOG2E,
        G=G, BLOCK_Q=block_q, G_PAD=g_pad, D=D, BLOCK_N=block_n,
        PREC=_precision(q.dtype), STORE_LSE=return_lse, **extra,
    )
    return (out, lse) if return_lse else out


def _compact_from_selection(selection: Selection):
    """(indices [B, HKV, N] int32, offsets [B, HKV, J+1] int32) of a mask-form Selection."""
    B, H, _ = selection.mask.shape
    J, b = selection.num_blocks, selection.block_size
    per_block = selection.mask.view(B, H, J, b).sum(-1)
    offsets = torch.zeros(B, H, J + 1, dtype=torch.int32, device=selection.mask.device)
    offsets[..., 1:] = per_block.cumsum(-1)
    if J == 0:
        return torch.full((B, H, 1), -1, dtype=torch.int32, device=offsets.device), offsets
    positions = torch.arange(J * b, device=offsets.device).expand_as(selection.mask)
    key = torch.where(selection.mask, positions, J * b)
    indices = key.sort(dim=-1).values
    indices = torch.where(indices < J * b, indices, -1).to(torch.int32)
    return indices, offsets


# ----------------------------------------------------------------------------------------------- decode
def _decode_splits(device: torch.device, bh: int, n_est: int, chunk: int) -> int:
    if INTERPRET or device.type != "cuda":
        return 2  # exercise the split-and-merge path cheaply
    # about two programs per SM in all, each walking at least two chunks: the partials stay small
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(n_est, 2 * chunk), triton.cdiv(2 * sms, bh)))


def compress_leaving_block(q, cache, start: int) -> None:
    """Section 5 step 2: keep the top-t tokens of the block [start, start + b) leaving the window, scored by
    the current query q [B, HQ, 1, D], and append them to the global segments (before the local write)."""
    B, HQ, _, D = q.shape
    HKV = cache.local_k.shape[1]
    W = cache.local_k.shape[2]
    b = cache.config.block_size
    G = HQ // HKV
    keep = cache.keep_per_block.to(device=q.device, dtype=torch.int32)
    out_k = torch.empty(B * HKV, b, D, device=q.device, dtype=cache.local_k.dtype)
    out_v = torch.empty_like(out_k)
    out_pos = torch.empty(B * HKV, b, device=q.device, dtype=torch.int64)
    q1 = q[:, :, 0]
    kernels_decode.compress_block_kernel[(B * HKV,)](
        q1, cache.local_k, cache.local_v, keep, out_k, out_v, out_pos,
        *q1.stride(), cache.local_k.stride(1), cache.local_k.stride(2),
        HKV, start % W, start, cache.scale,
        G=G, G_PAD=_rows_pad(G), BS=b, D=D, PREC=_precision(q.dtype),
    )
    counts = keep.long().expand(B, HKV)
    cache.append_global(out_k.view(B, HKV, b, D), out_v.view(B, HKV, b, D), out_pos.view(B, HKV, b), counts)


def decode_attention(q, cache, position: int):
    """One query per head over global segment + local ring positions [lo(position), position].
    q: [B, HQ, 1, D] -> out [B, HQ, 1, D]."""
    B, HQ, _, D = q.shape
    HKV, W = cache.local_k.shape[1], cache.local_k.shape[2]
    G = HQ // HKV
    g_pad = _rows_pad(G)
    lo = window_start(position, cache.config.block_size, cache.config.window)
    n_loc = position - lo + 1
    chunk = 64
    n_est = cache.global_k.shape[0] // max(1, B * HKV) + n_loc
    splits = _decode_splits(q.device, B * HKV, n_est, chunk)
    part_m = torch.empty(B * HKV, splits, g_pad, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(B * HKV, splits, g_pad, D, device=q.device, dtype=torch.float32)
    q1 = q[:, :, 0]
    gstart = cache.global_start.to(device=q.device).contiguous()
    glen = cache.global_len.to(device=q.device).contiguous()
    kernels_decode.decode_split_kernel[(B * HKV, splits)](
        q1, cache.global_k, cache.global_v, gstart, glen, cache.local_k, cache.local_v,
        part_m, part_l, part_acc,
        *q1.stride(), cache.local_k.stride(1), cache.local_k.stride(2),
        HKV, W, lo, n_loc, splits, cache.scale * LOG2E,
        G=G, G_PAD=g_pad, D=D, CHUNK=chunk, PREC=_precision(q.dtype),
    )
    out = torch.empty_like(q)
    o1 = out[:, :, 0]
    kernels_decode.decode_combine_kernel[(B * HKV, G)](
        part_m, part_l, part_acc, o1, *o1.stride(), HKV, splits, G=G, G_PAD=g_pad, D=D, S_BLOCK=32,
    )
    return out


# ----------------------------------------------------------------------------------------------- backend
class TritonBackend:
    """The `triton` backend (registry name "triton"): inputs are validated "bhsd" tensors."""

    @staticmethod
    def select(q, k, budgets, config, scale) -> Selection:
        return to_selection(_select(q, k, budgets, config, scale), config, k.shape[2])

    @staticmethod
    def attend(q, k, v, selection: Selection, scale, return_lse=False):
        indices, offsets = _compact_from_selection(selection)
        return sparse_attention(q, k, v, indices, offsets, selection.block_size, selection.window, scale, return_lse)

    @staticmethod
    def attention(q, k, v, budgets, config, scale, return_lse=False):
        sel = _select(q, k, budgets, config, scale)
        return sparse_attention(
            q, k, v, sel["indices"], sel["offsets"], config.block_size, config.window, scale, return_lse
        )

    @staticmethod
    def prefill(q, k, v, budgets, config, scale):
        from ...packed_cache import PackedKVCache

        sel = _select(q, k, budgets, config, scale)
        out = sparse_attention(q, k, v, sel["indices"], sel["offsets"], config.block_size, config.window, scale)
        selection = to_selection(sel, config, k.shape[2])
        cache = PackedKVCache.from_prefill(
            k, v, selection, block_keep_count(budgets), config, scale, backend="triton"
        )
        return out, cache

    @staticmethod
    def decode(q, k, v, cache):
        position = cache.seq_len
        leaving = cache.leaving_block()
        if leaving is not None:
            compress_leaving_block(q, cache, leaving[0])
        cache.append_local(k, v)
        return decode_attention(q, cache, position)

"""Launch code of the Triton backend: shapes, grids, tile sizes; the `TritonBackend` implementation class.
The on-device selection is shared with the flash backend (tca.backends.common.selection_triton).

Hot paths (select_indices, sparse_attention, decode) issue no host synchronisation: every size they need
(J, the padding of the selected list, the grid) follows from the shapes; per-head counts stay on the device.
Kernels live in kernels_*.py. Shape letters: B, HQ, HKV, G = HQ / HKV, L keys, LQ queries, D head dim,
J budgeted blocks, b block size, N padded selected positions per KV head (J * b: the dense upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton

from ...selection import Selection
from ..common import chunked_prefill, compact
from ..common.cache_protocol import decode_on_cache
from ..common.environment import triton_interpret
from ..common.packed_cache import PackedKVCache
from ..common.selection_triton import select_indices, select_on_device, to_selection
from ..common.triton_launch import LOG2E, precision, rows_pad
from . import kernels_attention, kernels_decode

INTERPRET = triton_interpret()  # as Triton itself, fixed when this module is imported


# ----------------------------------------------------------------------------------------------- attention
@dataclass(frozen=True)
class AttentionTiles:
    """Launch parameters of the sparse prefill kernel. block_q must divide the block size b."""

    block_q: int
    block_n: int
    num_warps: int = 8
    num_stages: int = 3


def default_tiles(G: int, D: int, block_size: int, dtype: torch.dtype = torch.bfloat16) -> AttentionTiles:
    """The tiles used unless a caller passes its own. From a sweep on an H100 (Llama shape, 32K tokens, bf16);
    the benchmark's sweep passes its candidates explicitly. fp32 tiles take twice the shared memory, and the
    masked steps' non-finite check one more [M, N] x [N, D] operand: fp32 with D = 128 gets one pipeline stage
    (3 stages needed 288 KB of shared memory on an H100, whose limit is 227 KB)."""
    g_pad = triton.next_power_of_2(G)
    stages = 1 if dtype == torch.float32 and D >= 128 else 3
    return AttentionTiles(block_q=min(block_size, max(16, 128 // g_pad)), block_n=64 if D <= 128 else 32,
                          num_stages=stages)


def sparse_attention(
    q, k, v, indices, offsets, block_size: int, window: int, scale: float, return_lse: bool = False, tiles=None,
    padding=None,
):
    """Eq. 2 given a selection in compact form. q: [B, HQ, LQ, D] (bottom-right aligned), k, v: [B, HKV, L, D];
    indices [B, HKV, N] int32 sorted selected positions; offsets [B, HKV, J+1] int32 (selected below block j).
    Returns out [B, HQ, LQ, D] (q's dtype) and lse [B, HQ, LQ] fp32 when asked.
    tiles: an AttentionTiles (default: default_tiles(G, D, block_size)); a dict of some of its fields is
    merged over the defaults (benchmark sweeps).
    padding: None, or a LeftPadding of a whole padded prompt (LQ == L): sequence b is rows starts[b]: of q, k, v,
    its selection relative to its start; its padding rows of out are 0 (lse -inf)."""
    B, HQ, LQ, D = q.shape
    HKV, L = k.shape[1], k.shape[2]
    G = HQ // HKV
    g_pad = triton.next_power_of_2(G)
    if tiles is None or isinstance(tiles, dict):
        tiles = replace(default_tiles(G, D, block_size, q.dtype), **(tiles or {}))
    block_q, block_n = tiles.block_q, tiles.block_n
    if block_size % block_q:
        raise ValueError(f"the query tile ({block_q}) must divide the block size ({block_size})")
    if padding is not None and LQ != L:
        raise ValueError(f"a left-padded batch is attended as whole prompts (LQ == L), got LQ={LQ}, L={L}")
    out = torch.empty_like(q) if padding is None else torch.zeros_like(q)
    lse = out
    if return_lse:
        lse = q.new_empty(B, HQ, LQ, dtype=torch.float32) if padding is None else q.new_full((B, HQ, LQ), float("-inf"), dtype=torch.float32)
    first = ((L - LQ) // block_q) * block_q
    n_tiles = triton.cdiv(L - first, block_q)
    indices = indices.contiguous()
    offsets = offsets.contiguous()
    extra = {} if INTERPRET else {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
    kernels_attention.sparse_prefill_kernel[(n_tiles, B * HKV)](
        q, k, v, out, lse, indices, offsets, indices if padding is None else padding.starts_on(q.device),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        indices.stride(1), offsets.stride(1),
        HKV, HQ, L, LQ, first, block_size, window, scale * LOG2E,
        G=G, BLOCK_Q=block_q, G_PAD=g_pad, D=D, BLOCK_N=block_n,
        PREC=precision(q.dtype), STORE_LSE=return_lse, VARLEN=padding is not None, **extra,
    )
    return (out, lse) if return_lse else out


def attend_virtual(q, keys, values, selected, config, scale):
    """Section 4 given the selection mask selected [B, HKV, P] over the first P keys (the streaming prefill's
    virtual sequence); q at the end of keys."""
    L = keys.shape[2]
    indices, _ = compact.from_mask(selected, L)
    offsets = compact.block_offsets(indices, L, config.block_size, config.window)
    return sparse_attention(q, keys, values, indices, offsets, config.block_size, config.window, scale)


# ----------------------------------------------------------------------------------------------- decode
def _decode_splits(device: torch.device, bh: int, n_est: int, chunk: int) -> int:
    if INTERPRET or device.type != "cuda":
        return 2  # exercise the split-and-merge path cheaply
    # about two programs per SM in all, each walking at least two chunks: the partials stay small
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(n_est, 2 * chunk), triton.cdiv(2 * sms, bh)))


class CacheKernels:
    """The device work of a decode step on the PackedKVCache (its `kernels`), as Triton kernels: no host
    synchronisation, fixed grids, every length read on the device (so a step can be captured in a CUDA graph)."""

    @staticmethod
    def compress(cache, q) -> None:
        """Section 5 step 1 for every sequence: the block leaving its window (if it moves) keeps its top-t.
        q [B, HQ, 1, D]. The capacity must be reserved (PackedKVCache.compress_leaving does)."""
        B, HQ, _, D = q.shape
        HKV, W = cache.num_kv_heads, cache.window_slots
        G = HQ // HKV
        q1 = q[:, :, 0]
        kernels_decode.compress_block_kernel[(B * HKV,)](
            q1, cache.local_k, cache.local_v, cache.keep, cache.positions_t,
            cache.global_k, cache.global_v, cache.global_pos, cache.global_start, cache.global_len,
            *q1.stride(), cache.local_k.stride(1), cache.local_k.stride(2),
            HKV, W, cache.config.window, cache.global_k.shape[0] - 1, cache.scale,
            G=G, G_PAD=rows_pad(G), BS=cache.config.block_size, D=D, PREC=precision(q.dtype),
        )

    @staticmethod
    def attend(cache, q):
        """One query per head over its global segment + local window. q: [B, HQ, 1, D] -> out [B, HQ, 1, D]."""
        B, HKV = q.shape[0], cache.num_kv_heads
        n_est = cache.global_k.shape[0] // max(1, B * HKV) + cache.window_slots  # from shapes: fixed between reallocations
        return _split_k_attention(
            q, cache.global_k, cache.global_v, cache.global_start, cache.global_len, cache.local_k, cache.local_v,
            cache.positions_t, cache.config.block_size, cache.config.window, n_est, cache.scale,
        )

    @staticmethod
    def attend_dense(cache, q):
        """Exact attention of q [B, HQ, 1, D] over a DenseKVCache: every row of (b, h) is one global segment of
        the flat buffer, and the local window is empty (position 0 with block and window 1 hold nothing)."""
        B, HQ, _, D = q.shape
        HKV = cache.num_kv_heads
        empty = q.new_empty(B * HKV, 1, D)  # never read: no local token
        return _split_k_attention(
            q, cache.keys.view(-1, D), cache.values.view(-1, D), cache.row_start, cache.row_len, empty, empty,
            cache.no_local_positions, 1, 1, cache.keys.shape[2], cache.scale,
        )


def _split_k_attention(q, global_k, global_v, global_start, global_len, local_k, local_v, positions, block_size,
                       window, n_est: int, scale: float):
    """Split-K decode attention of q [B, HQ, 1, D] over, per (b, h), rows global_start .. + global_len of the flat
    global_k/v [N, D] and the local ring local_k/v [B*HKV, W, D] (positions [B]: next position of each sequence).
    n_est: keys per head, from shapes (fixed between reallocations, so a captured graph keeps its grid)."""
    B, HQ, _, D = q.shape
    HKV, W = global_start.shape[-1], local_k.shape[-2]
    G = HQ // HKV
    g_pad = rows_pad(G)
    chunk = 64
    splits = _decode_splits(q.device, B * HKV, n_est, chunk)
    part_m = torch.empty(B * HKV, splits, g_pad, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(B * HKV, splits, g_pad, D, device=q.device, dtype=torch.float32)
    q1 = q[:, :, 0]
    stride_bh, stride_slot = local_k.stride(-3), local_k.stride(-2)
    kernels_decode.decode_split_kernel[(B * HKV, splits)](
        q1, global_k, global_v, global_start, global_len, local_k, local_v,
        part_m, part_l, part_acc,
        *q1.stride(), stride_bh, stride_slot,
        positions, HKV, W, block_size, window, splits, scale * LOG2E,
        G=G, G_PAD=g_pad, D=D, CHUNK=chunk, PREC=precision(q.dtype),
    )
    out = torch.empty_like(q)
    o1 = out[:, :, 0]
    kernels_decode.decode_combine_kernel[(B * HKV, G)](
        part_m, part_l, part_acc, o1, *o1.stride(), HKV, splits, G=G, G_PAD=g_pad, D=D, S_BLOCK=32,
    )
    return out


# ----------------------------------------------------------------------------------------------- backend
# Chunked prefill (section 5b): backends/common/chunked_prefill.py with the sparse kernel and on-device
# selection; streaming chunks choose within the leaving blocks with the shared torch code (selection_torch.py).
class TritonBackend(chunked_prefill.entry_points(attend=attend_virtual)):
    """The `triton` backend (registry name "triton"): inputs are validated "bhsd" tensors."""

    select_indices = staticmethod(select_indices)

    @staticmethod
    def select(q, k, budgets, config, scale) -> Selection:
        return to_selection(select_on_device(q, k, budgets, config, scale), config, k.shape[2])

    @staticmethod
    def attend(q, k, v, selection: Selection, scale, return_lse=False):
        indices, _ = compact.from_selection(selection)
        offsets = compact.block_offsets(indices, selection.seq_len, selection.block_size, selection.window)
        return sparse_attention(q, k, v, indices, offsets, selection.block_size, selection.window, scale, return_lse)

    @staticmethod
    def attention(q, k, v, budgets, config, scale, return_lse=False, padding=None):
        """Section 4; padding: None, or the LeftPadding of a batch of whole prompts (section 9.1)."""
        sel = select_on_device(q, k, budgets, config, scale, padding)
        return sparse_attention(q, k, v, sel["indices"], sel["offsets"], config.block_size, config.window, scale,
                                return_lse, padding=padding)

    cache_kernels = CacheKernels

    @staticmethod
    def prefill(q, k, v, budgets, config, scale, padding=None):
        """Section 5's prefill; padding: None, or a LeftPadding (each sequence prefilled as if alone, the cache
        holding per-sequence lengths; its padding rows of out are 0)."""
        sel = select_on_device(q, k, budgets, config, scale, padding)
        out = sparse_attention(q, k, v, sel["indices"], sel["offsets"], config.block_size, config.window, scale,
                               padding=padding)
        starts = None if padding is None else padding.starts
        cache = PackedKVCache.from_selected(k, v, sel["indices"], budgets, config, scale, kernels=CacheKernels,
                                            starts=starts, num_query_heads=q.shape[1])
        return out, cache

    # A left-padded batch in one launch per kernel (section 9.1): the same entry points with its padding.
    @staticmethod
    def attention_padded(q, k, v, padding, budgets, config, scale, return_lse=False):
        return TritonBackend.attention(q, k, v, budgets, config, scale, return_lse, padding)

    @staticmethod
    def prefill_padded(q, k, v, padding, budgets, config, scale):
        return TritonBackend.prefill(q, k, v, budgets, config, scale, padding)

    @staticmethod
    def decode(q, k, v, cache):
        cache.use_kernels(CacheKernels)
        return decode_on_cache(cache, q, k, v)

"""One decode step of every row of a batch over a paged KV cache, in three Triton launches (compress, split-K
attention, combine) with no host synchronisation: the layout and the state are kernels_paged_decode.py's.

Used by the vLLM plugin on CUDA, where a batch of decode rows is replayed from a CUDA graph: every size here
follows from the shapes (rows, heads, the split count), never from a length on the device. The same step in
PyTorch, and the pools' writer (store_state), are in paged_decode_torch.py.
Shape letters: R rows, HQ query heads, HKV KV heads, G = HQ / HKV, D head dim, NP pages, P page size, S splits.
"""

from __future__ import annotations

import torch
import triton

from . import kernels_paged_decode as kernels
from .environment import triton_interpret
from .triton_launch import LOG2E, precision, rows_pad

CHUNK = 64  # keys per step of the split-K loop
MAX_SPLITS = 64


def splits_for(device: torch.device, rows: int, num_kv_heads: int, max_keys: int) -> int:
    """Programs per (row, KV head): about two per SM in all, each walking at least two chunks of max_keys."""
    if triton_interpret() or device.type != "cuda":
        return 2  # exercises the split-and-merge path cheaply
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(MAX_SPLITS, triton.cdiv(max_keys, 2 * CHUNK), triton.cdiv(2 * sms, rows * num_kv_heads)))


def paged_decode(query: torch.Tensor, key_pages: torch.Tensor, value_pages: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor, covered: torch.Tensor,
                 keep: torch.Tensor, usage: torch.Tensor, block_size: int, window: int, scale: float, splits: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Section 5 for R rows at once: query [R, HQ, D] at position seq_lens[r] - 1 of row r (its key and value
    already in the pages); key_pages, value_pages [NP, HKV, P, D]; block_table [R, pages] int32; seq_lens [R];
    positions [NP, HKV, P] int32, counts [NP, HKV] int32 and covered [NP] int32 the rows' states
    (kernels_paged_decode.py), advanced here; keep [HKV] int32 tokens a leaving block keeps; usage [3] int64
    counters (rows with a state, KV bytes a dense step reads, KV bytes read), added to. Returns out [R, HQ, D] in
    query's dtype."""
    R, HQ, D = query.shape
    HKV, P = key_pages.shape[1], key_pages.shape[2]
    G = HQ // HKV
    g_pad = rows_pad(G)
    d_pad = triton.next_power_of_2(D)
    if query.stride(-1) != 1 or key_pages.stride(-1) != 1 or value_pages.stride(-1) != 1:
        raise ValueError("paged_decode needs the head dim contiguous in the query and the pages")
    if not (positions.is_contiguous() and counts.is_contiguous() and covered.is_contiguous()):
        raise ValueError("paged_decode needs contiguous positions [NP, HKV, P], counts [NP, HKV] and covered [NP]")
    if out is None:
        out = torch.empty_like(query)
    if R == 0:
        return out
    prec = precision(query.dtype)
    token_bytes = 2 * D * key_pages.element_size()
    kernels.compress_kernel[(R, HKV)](
        query, key_pages, block_table, seq_lens, positions, counts, covered, keep, usage,
        query.stride(0), query.stride(1), *key_pages.stride()[:3], block_table.stride(0),
        HKV, P, window, scale, token_bytes,
        G=G, G_PAD=g_pad, BS=block_size, D=D, D_PAD=d_pad, PREC=prec,
    )
    part_m = torch.empty(R * HKV, splits, g_pad, device=query.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(R * HKV, splits, g_pad, d_pad, device=query.device, dtype=torch.float32)
    kernels.attend_split_kernel[(R * HKV, splits)](
        query, key_pages, value_pages, block_table, seq_lens, positions, counts, covered,
        part_m, part_l, part_acc,
        query.stride(0), query.stride(1), *key_pages.stride()[:3], *value_pages.stride()[:3], block_table.stride(0),
        HKV, P, block_size, window, splits, scale * LOG2E,
        G=G, G_PAD=g_pad, D=D, D_PAD=d_pad, CHUNK=CHUNK, PREC=prec,
    )
    kernels.combine_kernel[(R * HKV, G)](
        part_m, part_l, part_acc, out, block_table, seq_lens, counts, covered,
        out.stride(0), out.stride(1), block_table.stride(0), HKV, splits,
        G=G, G_PAD=g_pad, D=D, D_PAD=d_pad, S_BLOCK=32,
    )
    return out

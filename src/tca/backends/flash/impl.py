"""FlashBackend: TCA-Attention (semantics.md sections 4 and 5) as FlashAttention varlen calls merged by LSE.

Prefill / stateless attention (plan.py says exactly what is sent):
  1. selection: the compact form of tca.backends.common.compact, made by the shared on-device selection in
     Triton where the Triton backend could run these inputs (FlashAttention has no top-k), else by the shared
     torch selection (tca.backends.common: selection_triton.py, selection_torch.py);
  2. local call: one sequence per (batch, query head, query block c), keys [lo(c), end(c)) read in place
     from k, causal bottom-right: the block-aligned window of section 2, exactly;
  3. global call: the selected keys gathered once into [B, HKV, N, D]; query block c reads the prefix of
     those before lo(c), not causal;
  4. merge.py: one softmax over both (disjoint) parts.
segments.py says exactly what each call reads.
Decode over the PackedKVCache: compress the block leaving the window (scored by the current query, in torch),
append the new token to the ring, then one query row per (batch, KV head) with its G query heads (native
GQA) attends the global segment (read in place from the flat buffer) and the ring's window slots (one or two
contiguous ranges), each cut into chunks so the GPU is filled (split-KV), all merged by LSE.

Shape letters: B batch, HQ query heads, HKV key/value heads, G = HQ / HKV, L keys, LQ query rows, D head dim,
N selected tokens per (batch, KV head), W ring slots, b block size.
"""

from __future__ import annotations

import torch

from ...geometry import window_start
from ...selection import Selection
from ..common import compact, decode_torch, selection_torch
from ..common.cache_protocol import decode_on_cache
from ..common.environment import triton_runs_on_gpu
from ..common.packed_cache import PackedKVCache
from .generations import get_adapter
from .merge import merge
from .segments import global_prefix_counts, global_segments, local_segments, query_blocks, rows_with_keys


def select_indices(q, k, budgets, config, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Section 3 in the compact form (indices [B, HKV, N] int32 ascending, padded with L; counts [B, HKV] int32),
    trimmed to N = max(counts): on the device in the shared Triton kernels where they run (a GPU with triton),
    else in torch (the same function). q: [B, HQ, LQ, D] (last row), k: [B, HKV, L, D], budgets [HKV, K]."""
    select = selection_torch.select_indices
    if triton_runs_on_gpu(q.device, q.shape[-1]):
        from ..common import selection_triton  # imports triton: only where it runs

        select = selection_triton.select_indices
    indices, counts = select(q, k, budgets, config, scale)
    return compact.trim(indices, counts), counts


def _call(adapter, q, k, v, seg, scale):
    return adapter.varlen(
        q, k, v, seg.cu_seqlens_q, seg.k_starts, seg.k_lens, seg.max_seqlen_q, seg.max_seqlen_k, seg.causal, scale
    )


def attend_indices(q, k, v, indices, counts, block_size: int, window: int, scale: float, return_lse=False, adapter=None):
    """Section 4 given the selection: q [B, HQ, LQ, D], k, v [B, HKV, L, D] ("bhsd"), indices [B, HKV, N] and
    counts [B, HKV] in the compact form. Returns out [B, HQ, LQ, D] (and lse [B, HQ, LQ] fp32)."""
    adapter = adapter or get_adapter()
    B, HQ, LQ, D = q.shape
    HKV, L = k.shape[1], k.shape[2]
    TQ = B * HQ * LQ
    qf = q.contiguous().view(TQ, 1, D)  # one sequence per (batch, query head, block): free views of "bhsd"
    kf = k.contiguous().view(B * HKV * L, 1, D)
    vf = v.contiguous().view(B * HKV * L, 1, D)
    # Plan everything first: the plan needs a few host syncs (lengths for max_seqlen_k), which cost nothing
    # while the GPU queue is empty but would stall the host behind the first flash call if taken after it.
    local = local_segments(B, HQ, HKV, L, LQ, block_size, window, q.device)
    glob = None
    n_max = indices.shape[-1]
    if n_max > 0:
        lo = query_blocks(L, LQ, block_size, window, q.device).lo
        prefix = global_prefix_counts(indices, lo)  # [B, HKV, C]
        if int(prefix.max()) > 0:
            glob = global_segments(prefix, B, HQ, HKV, LQ, L, block_size, window, n_max, q.device)
            has_global = rows_with_keys(glob, TQ)
            # Gather the selected keys once: row (b, h, n) of [(B HKV N), 1, D] (padding reads key 0, never used).
            base = torch.arange(B * HKV, device=q.device).view(B, HKV, 1) * L
            rows = (base + indices.long().clamp_max(L - 1)).reshape(-1)
            ks, vs = kf.index_select(0, rows), vf.index_select(0, rows)
    res_local = _call(adapter, qf, kf, vf, local, scale)
    out, lse = res_local.out, res_local.lse
    if glob is not None:
        res_global = _call(adapter, qf, ks, vs, glob, scale)
        out, lse = merge(out, lse, res_global.out, res_global.lse, has_global, q.dtype)
    out = out.reshape(B, HQ, LQ, D)
    if return_lse:
        return out, lse.reshape(B, HQ, LQ)
    return out


def decode_splits(device: torch.device, sequences: int, longest: int) -> int:
    """How many chunks each decode key segment is cut into, so that the GPU has ~2 CTAs per SM to fill
    (one sequence per (batch, KV head) would leave most SMs idle); 2 on CPU, to exercise the path."""
    if device.type != "cuda":
        return 2 if longest > 1 else 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-2 * sms // sequences), -(-longest // 128)))


def _split_call(adapter, qf, buf_k, buf_v, starts, lens, longest: int, scale: float):
    """Attend each of the S query rows (G heads) to its key segment cut into P chunks (split-KV).

    qf [S, G, D]; starts, lens [S]. Returns out [S, P, G, D], lse [S, P, G], valid [S, P] (chunk not empty).
    """
    S, G, D = qf.shape
    parts = decode_splits(qf.device, S, longest)
    chunk = -(-longest // parts)
    offsets = torch.arange(parts, device=qf.device, dtype=torch.int64) * chunk
    seg_starts = (starts.long()[:, None] + offsets).reshape(-1).to(torch.int32)
    seg_lens = (lens.long()[:, None] - offsets).clamp(0, chunk).reshape(-1).to(torch.int32)
    q_rep = qf.repeat_interleave(parts, dim=0)  # [S*P, G, D], a few KB: one copy of the query per chunk
    cu_q = torch.arange(S * parts + 1, device=qf.device, dtype=torch.int32)
    res = adapter.varlen(q_rep, buf_k, buf_v, cu_q, seg_starts, seg_lens, 1, chunk, False, scale)
    return res.out.view(S, parts, G, D), res.lse.reshape(S, parts, G), (seg_lens > 0).view(S, parts)


def _combine(parts, out_dtype):
    """One softmax over every chunk of every part: parts of (out [S, P, G, D], lse [S, P, G], valid [S, P])."""
    out = torch.cat([p[0] for p in parts], dim=1).float()
    valid = torch.cat([p[2] for p in parts], dim=1)[..., None]  # [S, P, 1]
    lse = torch.where(valid, torch.cat([p[1] for p in parts], dim=1).float(), float("-inf"))
    weights = torch.exp(lse - torch.logsumexp(lse, dim=1, keepdim=True))  # 0 for empty chunks
    out = torch.where(valid[..., None], out, 0.0)
    return (weights[..., None] * out).sum(1).to(out_dtype)  # [S, G, D]


def decode_attention(q, cache: PackedKVCache, adapter=None) -> torch.Tensor:
    """One query row per sequence at its newest position over the whole cache (the ring already holds it).

    q [B, HQ, 1, D] -> out [B, HQ, 1, D]. Sequences: one per (batch, KV head) with its G query heads as heads
    (native GQA), each key segment read in place and cut into chunks (split-KV), all merged by LSE at the end.
    Lengths come from the cache's host mirror: no device synchronisation.
    """
    adapter = adapter or get_adapter()
    B, HQ, _, D = q.shape
    HKV, W = cache.num_kv_heads, cache.window_slots
    G, S = HQ // HKV, B * cache.num_kv_heads
    dev = q.device
    qf = q.contiguous().view(S, G, D)
    bh = torch.arange(S, device=dev, dtype=torch.int64)
    # Per sequence: the window's slots [first, first + count) of the ring, wrapping at W into [0, rest).
    newest = [n - 1 for n in cache.seq_lens]
    lo = [window_start(i, cache.config.block_size, cache.config.window) for i in newest]
    first = [low % W for low in lo]
    count = [i - low + 1 for i, low in zip(newest, lo, strict=True)]
    span = [min(c, W - f) for c, f in zip(count, first, strict=True)]
    rest = [c - s for c, s in zip(count, span, strict=True)]

    def per_head(values):  # [B] host ints -> [S] device, each sequence's value for each of its KV heads
        return torch.tensor(values, dtype=torch.int64).repeat_interleave(HKV).to(dev, non_blocking=True)

    ring_k = cache.local_k.view(S * W, 1, D)
    ring_v = cache.local_v.view(S * W, 1, D)
    parts = [_split_call(adapter, qf, ring_k, ring_v, bh * W + per_head(first), per_head(span), max(span), cache.scale)]
    if max(rest) > 0:
        parts.append(_split_call(adapter, qf, ring_k, ring_v, bh * W, per_head(rest), max(rest), cache.scale))
    n_max = int(cache.global_len_host.max()) if cache.global_len_host.numel() else 0
    if n_max > 0:
        gk, gv = cache.global_k.view(-1, 1, D), cache.global_v.view(-1, 1, D)
        parts.append(_split_call(adapter, qf, gk, gv, cache.global_start.reshape(S), cache.global_len.reshape(S),
                                 n_max, cache.scale))
    return _combine(parts, q.dtype).view(B, HQ, 1, D)


class CacheKernels:
    """The flash backend's decode work on the PackedKVCache: torch compression (FlashAttention has no top-k),
    FlashAttention split-KV attention."""

    compress = staticmethod(decode_torch.compress)
    attend_dense = staticmethod(decode_torch.attend_dense)

    @staticmethod
    def attend(cache, q):
        return decode_attention(q, cache)


class FlashBackend:
    """The registry's implementation object (see registry.Backend): static methods on validated "bhsd" inputs."""

    @staticmethod
    def select(q, k, budgets, config, scale) -> Selection:
        indices, counts = select_indices(q, k, budgets, config, scale)
        return compact.to_selection(indices, counts, config.block_size, config.window, k.shape[2])

    select_indices = staticmethod(select_indices)

    @staticmethod
    def attend(q, k, v, selection: Selection, scale, return_lse=False):
        indices, counts = compact.from_selection(selection)
        return attend_indices(q, k, v, indices, counts, selection.block_size, selection.window, scale, return_lse)

    @staticmethod
    def attention(q, k, v, budgets, config, scale, return_lse=False):
        indices, counts = select_indices(q, k, budgets, config, scale)
        return attend_indices(q, k, v, indices, counts, config.block_size, config.window, scale, return_lse)

    @staticmethod
    def prefill(q, k, v, budgets, config, scale):
        indices, counts = select_indices(q, k, budgets, config, scale)
        out = attend_indices(q, k, v, indices, counts, config.block_size, config.window, scale)
        cache = PackedKVCache.from_selected(k, v, indices, budgets, config, scale, kernels=CacheKernels,
                                            num_query_heads=q.shape[1])
        return out, cache

    cache_kernels = CacheKernels

    @staticmethod
    def decode(q, k, v, cache: PackedKVCache):
        """Section 5: compress the block leaving the window (if it moves), append the token, attend."""
        cache.use_kernels(CacheKernels)
        return decode_on_cache(cache, q, k, v)

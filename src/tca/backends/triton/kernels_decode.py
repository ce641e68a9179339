"""Triton kernels of stateful decoding over the compressed cache (docs/semantics.md section 5). @triton.jit only.

The cache layout is tca.backends.common.packed_cache.PackedKVCache: per (batch, KV head) a contiguous global
segment in a flat buffer global_k/global_v [N_cap, D] (offset global_start, length global_len) plus a ring
buffer of the local window local_k/local_v [B, HKV, W, D] (position p in slot p % W). A decode query of
sequence b attends to the global segment followed by the local positions [lo(i_b), i_b]: one virtual sequence
of n_glob + n_loc keys. Every length and position is read on the device (positions [B]: each sequence's next
position), so a step never synchronises with the host and can be captured in a CUDA graph.

Split-K: program (bh, s) walks the chunks s, s + S, s + 2S, ... of that virtual sequence (S programs per head,
fixed from shapes, so one query fills the GPU without reading any length on the host) and writes a partial
(max, sum, acc) per query head of the group; combine_kernel merges the S partials.
Shape letters: G query heads per KV head (padded to G_PAD >= 16 rows for tl.dot), CHUNK keys per step.
"""

import triton
import triton.language as tl


@triton.jit
def _decode_chunk(q, k, v, n_ok, m_i, l_i, acc, scale_log2, PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
    s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def decode_split_kernel(
    q_ptr, gk_ptr, gv_ptr, gstart_ptr, glen_ptr, lk_ptr, lv_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_lbh, stride_ls,
    pos_ptr, HKV, W, block_size, window, n_splits, scale_log2,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, PREC: tl.constexpr,
):
    """q: [B, HQ, D]; global_k/v: [N_cap, D] (contiguous rows); local_k/v: [B*HKV, W, D] (row stride
    stride_ls); pos: [B] int64 next position (the newest is pos - 1, already in the ring), so the local keys
    are lo(i) .. i with lo(i) = max(0, (i // b + 1) * b - w).
    part_m, part_l: [B*HKV, S, G_PAD] fp32; part_acc: [B*HKV, S, G_PAD, D] fp32.
    The global and the local chunks are walked in two loops with plain pointer arithmetic (a pointer chosen
    per row between two buffers would lose the alignment facts that make the loads vectorised)."""
    bh = tl.program_id(0)
    s_id = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    i = tl.load(pos_ptr + b).to(tl.int32) - 1
    lo = tl.maximum((i // block_size + 1) * block_size - window, 0)
    n_loc = i - lo + 1
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=(offs_g < G)[:, None], other=0.0)
    g_start = tl.load(gstart_ptr + bh)
    n_glob = tl.load(glen_ptr + bh).to(tl.int32)
    n_glob_chunks = tl.cdiv(n_glob, CHUNK)
    n_chunks = n_glob_chunks + tl.cdiv(n_loc, CHUNK)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    gk_base = gk_ptr + g_start * D
    gv_base = gv_ptr + g_start * D
    for c in range(s_id, n_glob_chunks, n_splits):
        offs_n = c * CHUNK + tl.arange(0, CHUNK)
        n_ok = offs_n < n_glob
        k = tl.load(gk_base + offs_n[:, None] * D + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(gv_base + offs_n[:, None] * D + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        m_i, l_i, acc = _decode_chunk(q, k, v, n_ok, m_i, l_i, acc, scale_log2, PREC)
    # local chunks continue the same round-robin over this head's chunk list
    first_local = n_glob_chunks + (s_id - n_glob_chunks % n_splits + n_splits) % n_splits
    lk_base = lk_ptr + bh * stride_lbh
    lv_base = lv_ptr + bh * stride_lbh
    for c in range(first_local, n_chunks, n_splits):
        offs_n = (c - n_glob_chunks) * CHUNK + tl.arange(0, CHUNK)
        n_ok = offs_n < n_loc
        slot = (lo + offs_n) % W
        k = tl.load(lk_base + slot[:, None] * stride_ls + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(lv_base + slot[:, None] * stride_ls + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        m_i, l_i, acc = _decode_chunk(q, k, v, n_ok, m_i, l_i, acc, scale_log2, PREC)
    base = bh * n_splits + s_id
    tl.store(part_m_ptr + base * G_PAD + offs_g, m_i)
    tl.store(part_l_ptr + base * G_PAD + offs_g, l_i)
    tl.store(part_acc_ptr + (base * G_PAD + offs_g)[:, None] * D + offs_d[None, :], acc)


@triton.jit
def decode_combine_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, o_ptr,
    stride_ob, stride_oh, stride_od,
    HKV, n_splits,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, S_BLOCK: tl.constexpr,
):
    """Merge the S partial softmaxes of one (batch, KV head, query head g): out [B, HQ, D] in o's dtype.
    One program per query head, S_BLOCK partials per step (a serial walk over S would be latency-bound)."""
    bh = tl.program_id(0)
    g = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    offs_d = tl.arange(0, D)
    m = tl.full([S_BLOCK], float("-inf"), tl.float32)
    for s0 in range(0, n_splits, S_BLOCK):
        offs_s = s0 + tl.arange(0, S_BLOCK)
        m = tl.maximum(m, tl.load(part_m_ptr + ((bh * n_splits + offs_s) * G_PAD + g), mask=offs_s < n_splits,
                                  other=float("-inf")))
    m_max = tl.max(m, axis=0)
    l_sum = tl.zeros([S_BLOCK], tl.float32)
    acc = tl.zeros([S_BLOCK, D], tl.float32)
    for s0 in range(0, n_splits, S_BLOCK):
        offs_s = s0 + tl.arange(0, S_BLOCK)
        ok = offs_s < n_splits
        row = (bh * n_splits + offs_s) * G_PAD + g
        m_s = tl.load(part_m_ptr + row, mask=ok, other=float("-inf"))
        w = tl.exp2(m_s - m_max)  # splits that saw no key have m = -inf: weight 0
        l_sum += tl.load(part_l_ptr + row, mask=ok, other=0.0) * w
        acc += tl.load(part_acc_ptr + row[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0) * w[:, None]
    out = tl.sum(acc, axis=0) / tl.sum(l_sum, axis=0)
    tl.store(o_ptr + b * stride_ob + (h * G + g) * stride_oh + offs_d * stride_od, out.to(o_ptr.dtype.element_ty))


@triton.jit
def compress_block_kernel(
    q_ptr, lk_ptr, lv_ptr, keep_ptr, pos_ptr,
    gk_ptr, gv_ptr, gpos_ptr, gstart_ptr, glen_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_lbh, stride_ls,
    HKV, W, window, scratch, scale,
    G: tl.constexpr, G_PAD: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
):
    """Section 5 step 1 for the next token i = pos[b] of every sequence: if the window moves, score the block
    [lo(i-1), lo(i)) leaving it with the current query (mean over the group of a softmax over the block), keep
    its t = keep[h] best tokens (ties to the smaller position) and append them, in position order, to the
    global segment of (b, h) (rows global_start + global_len ..), advancing global_len. Otherwise nothing is
    appended (the rows go to the scratch row). The capacity was reserved on the host beforehand."""
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    i = tl.load(pos_ptr + b)
    start = tl.maximum(((i - 1) // BS + 1) * BS - window, 0)
    moves = tl.maximum((i // BS + 1) * BS - window, 0) > start
    offs_g = tl.arange(0, G_PAD)
    offs_t = tl.arange(0, BS)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    q = tl.load(q_ptr + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None], other=0.0)
    slot0 = start % W
    rows = lk_ptr + bh * stride_lbh + (slot0 + offs_t)[:, None] * stride_ls + offs_d[None, :]
    k = tl.load(rows)
    x = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    # [choice: non-finite] a non-finite logit is left out of the block's softmax (scores 0); a row with no
    # finite logit scores 0 everywhere
    finite = (x == x) & (tl.abs(x) < float("inf"))
    x = tl.where(finite, x, float("-inf"))
    row_max = tl.max(x, axis=1)
    p = tl.where(finite, tl.exp(x - tl.where(row_max > float("-inf"), row_max, 0.0)[:, None]), 0.0)
    total = tl.sum(p, axis=1)
    p = p / tl.where(total > 0, total, 1.0)[:, None]
    p = tl.where(g_ok[:, None], p, 0.0)
    s = tl.sum(p, axis=0) / G
    before = (s[None, :] > s[:, None]) | ((s[None, :] == s[:, None]) & (offs_t[None, :] < offs_t[:, None]))
    rank = tl.sum(before.to(tl.int32), axis=1)
    t = tl.load(keep_ptr + h).to(tl.int32) * moves.to(tl.int32)
    keep = rank < t
    n_have = tl.load(glen_ptr + bh)
    dst_row = tl.load(gstart_ptr + bh) + n_have + tl.cumsum(keep.to(tl.int32), axis=0) - 1
    dst_row = tl.where(keep, dst_row, scratch)
    v = tl.load(lv_ptr + bh * stride_lbh + (slot0 + offs_t)[:, None] * stride_ls + offs_d[None, :])
    dst = dst_row[:, None] * D + offs_d[None, :]
    tl.store(gk_ptr + dst, k, mask=keep[:, None])
    tl.store(gv_ptr + dst, v, mask=keep[:, None])
    tl.store(gpos_ptr + dst_row, (start + offs_t).to(tl.int64), mask=keep)
    tl.store(glen_ptr + bh, n_have + t)

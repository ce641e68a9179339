"""Triton kernel of TCA sparse attention given a selection (docs/semantics.md section 4, Eq. 2). @triton.jit only.

One program per (query tile, batch element x KV head). Its rows pack the BLOCK_Q query positions of all G
query heads of that KV head (row r: head g = r // BLOCK_Q, position p0 + r % BLOCK_Q), so every K/V tile it
loads serves the whole group (pack GQA). BLOCK_Q divides b, so all rows of a tile share lo = window_start(p0):
the tile attends, in one online softmax, to the selected global positions below lo (a prefix of the sorted
selected list: offsets[lo // b] of them) and then to the local keys [lo, p0 + BLOCK_Q) with a causal mask.
Softmax in log2 units (exp2), accumulation in fp32; the step is online_softmax.py's.

VARLEN (a left-padded batch, LQ == L): sequence b is rows start[b]: of q, k, v and out, a prompt of its own of
L - start[b] tokens in positions relative to its start; the tiles past its end do nothing, and its padding
rows of out are not written.
"""

import triton
import triton.language as tl

from .online_softmax import online_softmax_step


@triton.jit
def sparse_prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, off_ptr, start_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_idx_bh, stride_off_bh,
    HKV, HQ, L, LQ, first_pos, block_size, window, scale_log2,
    G: tl.constexpr, BLOCK_Q: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, STORE_LSE: tl.constexpr, VARLEN: tl.constexpr,
):
    """q: [B, HQ, LQ, D] (row r at position L - LQ + r), k, v: [B, HKV, L, D]; idx: [B, HKV, N] int32 sorted
    selected positions; off: [B, HKV, J + 1] int32 (selected positions in blocks < j); out like q;
    lse: [B, HQ, LQ] fp32 (natural log)."""
    BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
    # the last query tiles see the most keys: launch them first so the short ones fill the tail
    t = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    lse_row_stride = LQ
    if VARLEN:
        pad = tl.load(start_ptr + b)  # its pad rows: move every pointer past them, then L and LQ are its own
        q_ptr += pad * stride_ql
        k_ptr += pad * stride_kl
        v_ptr += pad * stride_vl
        o_ptr += pad * stride_ol
        lse_ptr += pad
        L = L - pad
        LQ = LQ - pad
    p0 = first_pos + t * BLOCK_Q
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    g = offs_m // BLOCK_Q
    pos = p0 + offs_m % BLOCK_Q
    row = pos - (L - LQ)
    row_ok = (g < G) & (row >= 0) & (pos < L)
    head = h * G + g
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + row[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    lo = tl.maximum((p0 // block_size + 1) * block_size - window, 0)
    hi = tl.minimum(p0 + BLOCK_Q, L)
    if VARLEN:
        live = p0 < L  # a tile past a shorter sequence's end: every loop below is empty
        lo = tl.where(live, lo, hi)
    # global part: the selected positions below lo, gathered by index (full chunks unmasked, then the tail)
    if VARLEN:
        n_glob = tl.load(off_ptr + bh * stride_off_bh + lo // block_size, mask=live, other=0)
    else:
        n_glob = tl.load(off_ptr + bh * stride_off_bh + lo // block_size)
    idx_base = idx_ptr + bh * stride_idx_bh
    n_full = (n_glob // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kpos = tl.load(idx_base + offs_n)
        k = tl.load(k_base + kpos[:, None] * stride_kl + offs_d[None, :] * stride_kd)
        v = tl.load(v_base + kpos[:, None] * stride_vl + offs_d[None, :] * stride_vd)
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, None, scale_log2, PREC, False)
    if n_full < n_glob:
        offs_n = n_full + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_glob
        kpos = tl.load(idx_base + offs_n, mask=n_ok, other=0)
        k = tl.load(k_base + kpos[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=n_ok[:, None], other=0.0)
        v = tl.load(v_base + kpos[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=n_ok[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, n_ok[None, :], scale_log2, PREC, True)
    # local part: whole chunks of [lo, p0) are visible to every row (no mask); the rest up to the diagonal
    # gets the causal mask
    mid = lo + ((p0 - lo) // BLOCK_N) * BLOCK_N
    if VARLEN:
        mid = tl.where(live, mid, hi)
    for start in range(lo, mid, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd)
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, None, scale_log2, PREC, False)
    for start in range(mid, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=n_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=n_ok[:, None], other=0.0)
        valid = n_ok[None, :] & (offs_n[None, :] <= pos[:, None])
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, valid, scale_log2, PREC, True)
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * stride_ob + head[:, None] * stride_oh + row[:, None] * stride_ol + offs_d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    if STORE_LSE:
        lse = (m_i * scale_log2 + tl.log2(l_i)) * 0.6931471805599453
        tl.store(lse_ptr + (b * HQ + head) * lse_row_stride + row, lse, mask=row_ok)

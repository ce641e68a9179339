"""Triton kernels of one decode step over a paged KV cache (docs/semantics.md section 5). @triton.jit only.

The cache is a serving engine's pool of pages, key_pages/value_pages [NP, HKV, P, D] (any strides, the last 1);
a sequence's pages are one block-table row (page j holds positions j*P .. j*P + P - 1). Its decode state lives
in pools shaped like the pages, addressed through the same row, so that a state needs no allocation of its own:
- positions [NP, HKV, P] int32: entry e of head h (its e-th kept global position, ascending) sits in page
  row[e // P] at offset e % P (a sequence keeps at most as many positions as it has tokens);
- counts [NP, HKV] int32 at the sequence's first page, row[0]: how many entries each head holds, or -1 for a
  sequence with no state, which attends to every one of its tokens (exact attention);
- covered [NP] int32 at the first page: the tokens the state covers. A step at i = seq_len - 1 continues the state
  only if it covers exactly i tokens; otherwise (a state some earlier sequence left on this page, which nothing
  dropped) the row attends exactly and the state is left as it is.
Every length is read on the device (seq_lens: tokens after this step; the newest token, at i = seq_len - 1, is in
the pages already), so a step never synchronises with the host and can be captured in a CUDA graph; rows with
seq_len <= 0 (a captured batch's padding) write zeros.

Shape letters: G query heads per KV head (padded to G_PAD >= 16 rows for tl.dot), D head dim (padded to a power
of two, D_PAD), BS the TCA block size b, CHUNK keys per step of the split-K loop.
"""

import triton
import triton.language as tl


@triton.jit
def _window_start(i, block_size, window):
    return tl.maximum((i // block_size + 1) * block_size - window, 0)


@triton.jit
def _state_count(cnt_ptr, cov_ptr, owner, h, HKV, i):
    """Entries of head h of the state at `owner`, or -1 where there is no state this step continues."""
    count = tl.load(cnt_ptr + owner * HKV + h)
    return tl.where(tl.load(cov_ptr + owner) == i, count, -1)


@triton.jit
def compress_kernel(
    q_ptr, kp_ptr, bt_ptr, seq_ptr, pos_ptr, cnt_ptr, cov_ptr, keep_ptr, usage_ptr,
    stride_qr, stride_qh, stride_kn, stride_kh, stride_kp, stride_btr,
    HKV, P, window, scale, token_bytes,
    G: tl.constexpr, G_PAD: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    PREC: tl.constexpr,
):
    """Section 5 step 1 for row r and KV head h (program (r, h)): if the window moves at i = seq_len - 1, score
    the block [lo(i-1), lo(i)) leaving it with the row's query (the group's mean of a softmax over the block,
    section 8's non-finite rule), keep its keep[h] best tokens (ties to the smaller position) and append them,
    in position order, after the head's entries. Rows with no state (count -1) are left as they are.
    Also adds the row's decode to usage [3] int64 (rows, KV bytes a dense step reads, KV bytes this one reads)."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_ptr + r).to(tl.int32)
    if seq_len <= 0:
        return
    owner = tl.load(bt_ptr + r * stride_btr).to(tl.int64)
    i = seq_len - 1
    n_have = _state_count(cnt_ptr, cov_ptr, owner, h, HKV, i)
    if n_have < 0:
        return
    start = _window_start(i - 1, BS, window)
    lo = _window_start(i, BS, window)
    t = tl.load(keep_ptr + h).to(tl.int32) * (lo > start).to(tl.int32)
    if t > 0:
        offs_g = tl.arange(0, G_PAD)
        offs_t = tl.arange(0, BS)
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < D
        g_ok = offs_g < G
        q = tl.load(q_ptr + r * stride_qr + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        position = start + offs_t
        page = tl.load(bt_ptr + r * stride_btr + position // P).to(tl.int64)
        k = tl.load(kp_ptr + page[:, None] * stride_kn + h * stride_kh + (position % P)[:, None] * stride_kp
                    + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        x = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC) * scale
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
        kept = rank < t
        entry = n_have + tl.cumsum(kept.to(tl.int32), axis=0) - 1
        entry = tl.where(kept, entry, 0)
        entry_page = tl.load(bt_ptr + r * stride_btr + entry // P, mask=kept, other=0).to(tl.int64)
        tl.store(pos_ptr + (entry_page * HKV + h) * P + entry % P, position, mask=kept)
        tl.store(cnt_ptr + owner * HKV + h, n_have + t)
    read = (n_have + t + i - lo + 1).to(tl.int64) * token_bytes
    tl.atomic_add(usage_ptr + 1, seq_len.to(tl.int64) * token_bytes)
    tl.atomic_add(usage_ptr + 2, read)
    if h == 0:
        tl.atomic_add(usage_ptr, 1)


@triton.jit
def _attend_chunk(q, k, v, ok, m_i, l_i, acc, scale_log2, PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC) * scale_log2
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - tl.where(m_new > float("-inf"), m_new, 0.0))
    p = tl.exp2(s - tl.where(m_new > float("-inf"), m_new, 0.0)[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _load_kv(kp_ptr, vp_ptr, row, position, ok, d_ok, offs_d, h, P, stride_kn, stride_kh, stride_kp, stride_vn,
             stride_vh, stride_vp):
    """Keys and values [CHUNK, D_PAD] of head h at sequence positions [CHUNK] (ok: which are real), through the
    block-table row `row`."""
    page = tl.load(row + position // P, mask=ok, other=0).to(tl.int64)
    offset = (position % P)[:, None]
    both = ok[:, None] & d_ok[None, :]
    k = tl.load(kp_ptr + page[:, None] * stride_kn + h * stride_kh + offset * stride_kp + offs_d[None, :], mask=both,
                other=0.0)
    v = tl.load(vp_ptr + page[:, None] * stride_vn + h * stride_vh + offset * stride_vp + offs_d[None, :], mask=both,
                other=0.0)
    return k, v


@triton.jit
def attend_split_kernel(
    q_ptr, kp_ptr, vp_ptr, bt_ptr, seq_ptr, pos_ptr, cnt_ptr, cov_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    stride_qr, stride_qh, stride_kn, stride_kh, stride_kp, stride_vn, stride_vh, stride_vp, stride_btr,
    HKV, P, block_size, window, n_splits, scale_log2,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, CHUNK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Section 5 step 3, split-K: program (r * HKV + h, s) walks chunks s, s + S, ... of the row's virtual
    sequence, its count entries (kept global positions) then the window lo(i) .. i (0 .. i with no state), and
    writes a partial (max, sum, acc) per query head of the group. part_m, part_l: [R*HKV, S, G_PAD] fp32;
    part_acc: [R*HKV, S, G_PAD, D_PAD] fp32."""
    rh = tl.program_id(0)
    s_id = tl.program_id(1)
    r = rh // HKV
    h = rh % HKV
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    seq_len = tl.load(seq_ptr + r).to(tl.int32)
    if seq_len > 0:
        i = seq_len - 1
        owner = tl.load(bt_ptr + r * stride_btr).to(tl.int64)
        count = _state_count(cnt_ptr, cov_ptr, owner, h, HKV, i)
        n_glob = tl.maximum(count, 0)
        lo = tl.where(count >= 0, _window_start(i, block_size, window), 0)
        n_loc = i - lo + 1
        q = tl.load(q_ptr + r * stride_qr + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=(offs_g < G)[:, None] & d_ok[None, :], other=0.0)
        n_glob_chunks = tl.cdiv(n_glob, CHUNK)
        n_chunks = n_glob_chunks + tl.cdiv(n_loc, CHUNK)
        row = bt_ptr + r * stride_btr
        for c in range(s_id, n_glob_chunks, n_splits):
            entry = c * CHUNK + tl.arange(0, CHUNK)
            ok = entry < n_glob
            entry_page = tl.load(row + entry // P, mask=ok, other=0).to(tl.int64)
            position = tl.load(pos_ptr + (entry_page * HKV + h) * P + entry % P, mask=ok, other=0)
            k, v = _load_kv(kp_ptr, vp_ptr, row, position, ok, d_ok, offs_d, h, P, stride_kn, stride_kh, stride_kp,
                            stride_vn, stride_vh, stride_vp)
            m_i, l_i, acc = _attend_chunk(q, k, v, ok, m_i, l_i, acc, scale_log2, PREC)
        # window chunks continue the same round-robin over this head's chunk list
        first_local = n_glob_chunks + (s_id - n_glob_chunks % n_splits + n_splits) % n_splits
        for c in range(first_local, n_chunks, n_splits):
            offs_n = (c - n_glob_chunks) * CHUNK + tl.arange(0, CHUNK)
            ok = offs_n < n_loc
            k, v = _load_kv(kp_ptr, vp_ptr, row, lo + offs_n, ok, d_ok, offs_d, h, P, stride_kn, stride_kh, stride_kp,
                            stride_vn, stride_vh, stride_vp)
            m_i, l_i, acc = _attend_chunk(q, k, v, ok, m_i, l_i, acc, scale_log2, PREC)
    base = rh * n_splits + s_id
    tl.store(part_m_ptr + base * G_PAD + offs_g, m_i)
    tl.store(part_l_ptr + base * G_PAD + offs_g, l_i)
    tl.store(part_acc_ptr + (base * G_PAD + offs_g)[:, None] * D_PAD + offs_d[None, :], acc)


@triton.jit
def combine_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, o_ptr, bt_ptr, seq_ptr, cnt_ptr, cov_ptr,
    stride_or, stride_oh, stride_btr,
    HKV, n_splits,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, S_BLOCK: tl.constexpr,
):
    """Merge the S partial softmaxes of one (row, KV head, query head g) into out [R, HQ, D] (o's dtype); a row
    that saw no key (padding) gets zeros. Program (row, head 0, g 0) then marks the row's state as covering its
    seq_len tokens (after every read of this step: the kernels before this one ran first)."""
    rh = tl.program_id(0)
    g = tl.program_id(1)
    r = rh // HKV
    h = rh % HKV
    offs_d = tl.arange(0, D_PAD)
    m = tl.full([S_BLOCK], float("-inf"), tl.float32)
    for s0 in range(0, n_splits, S_BLOCK):
        offs_s = s0 + tl.arange(0, S_BLOCK)
        m = tl.maximum(m, tl.load(part_m_ptr + ((rh * n_splits + offs_s) * G_PAD + g), mask=offs_s < n_splits,
                                  other=float("-inf")))
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)
    l_sum = tl.zeros([S_BLOCK], tl.float32)
    acc = tl.zeros([S_BLOCK, D_PAD], tl.float32)
    for s0 in range(0, n_splits, S_BLOCK):
        offs_s = s0 + tl.arange(0, S_BLOCK)
        ok = offs_s < n_splits
        part = (rh * n_splits + offs_s) * G_PAD + g
        w = tl.exp2(tl.load(part_m_ptr + part, mask=ok, other=float("-inf")) - m_max)  # no key seen: weight 0
        l_sum += tl.load(part_l_ptr + part, mask=ok, other=0.0) * w
        acc += tl.load(part_acc_ptr + part[:, None] * D_PAD + offs_d[None, :], mask=ok[:, None], other=0.0) * w[:, None]
    total = tl.sum(l_sum, axis=0)
    out = tl.sum(acc, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(o_ptr + r * stride_or + (h * G + g) * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=offs_d < D)
    seq_len = tl.load(seq_ptr + r)
    if (h == 0) & (g == 0) & (seq_len > 0):
        owner = tl.load(bt_ptr + r * stride_btr).to(tl.int64)
        if _state_count(cnt_ptr, cov_ptr, owner, 0, HKV, seq_len - 1) >= 0:
            tl.store(cov_ptr + owner, seq_len)

"""Triton kernels of the online selection (docs/semantics.md section 3, paper Eqs. 5-8). @triton.jit only.

Shape letters: B batch, HKV key/value heads, G query heads per KV head (padded to G_PAD >= 16 rows for
tl.dot), L keys, D head dim, J budgeted blocks, BS block size b. Logits are kept in log2 units
(scale * log2(e) * q.k) so the kernels use exp2.
"""

import triton
import triton.language as tl


@triton.jit
def last_query_logits_kernel(
    q_ptr, k_ptr, logits_ptr, part_max_ptr, part_sum_ptr, start_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    L, HKV, n_chunks, scale_log2,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr, PREC: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """Eq. 5, pass 1: one read of K. logits[b, h, g, l] = scale*log2e * q_last[b, h*G+g] . k[b, h, l];
    per chunk of BLOCK_L keys also the row max and sum of exp2 (combined on the host side by torch ops).

    q: [B, HQ, D] (the last query row), k: [B, HKV, L, D]; logits: [B, HKV, G, L] fp32;
    part_max, part_sum: [B, HKV, G, n_chunks] fp32.
    VARLEN: sequence b is k[b, :, start[b]:] (start: [B] int32, its left padding); its logits are written at
    positions relative to its start, and -inf from its length L - start[b] to L.
    """
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_l = c * BLOCK_L + tl.arange(0, BLOCK_L)
    g_ok = offs_g < G
    if VARLEN:
        start = tl.load(start_ptr + b)
    else:
        start = 0
    l_ok = offs_l < L - start
    q = tl.load(q_ptr + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None], other=0.0)
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + (start + offs_l)[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                mask=l_ok[:, None], other=0.0)
    x = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2  # [G_PAD, BLOCK_L]
    # [choice: non-finite] a NaN/Inf logit is left out of the softmax (scores 0), as in the reference
    finite = (x == x) & (tl.abs(x) < float("inf"))
    x = tl.where(l_ok[None, :] & finite, x, float("-inf"))
    row = bh * G + offs_g
    tl.store(logits_ptr + row[:, None] * L + offs_l[None, :], x, mask=g_ok[:, None] & (offs_l < L)[None, :])
    m = tl.max(x, axis=1)
    # a chunk with no finite logit sums to 0 (not exp2(-inf - -inf) = NaN)
    s = tl.sum(tl.where(x > float("-inf"), tl.exp2(x - m[:, None]), 0.0), axis=1)
    tl.store(part_max_ptr + row * n_chunks + c, m, mask=g_ok)
    tl.store(part_sum_ptr + row * n_chunks + c, s, mask=g_ok)


@triton.jit
def block_scores_kernel(
    logits_ptr, row_max_ptr, row_sum_ptr, priority_ptr, rank_ptr, blocks_ptr,
    L, J, HKV, alpha,
    G: tl.constexpr, G_PAD: tl.constexpr, BS: tl.constexpr, MASS_MEAN: tl.constexpr, VARLEN: tl.constexpr,
):
    """Eq. 5 (end) and Eq. 6 for one budgeted block j, plus each token's rank inside its block (Eq. 8).

    s = mean over the group of exp2(logit - max) / sum; M_j = sum s, H_j = sum r^2 / (sum r)^2 with
    r = s / max s (= sum s^2 / M_j^2; 1 if M_j = 0),
    priority = (1 - alpha) * mass_factor * M_j + alpha * (1 - H_j) with mass_factor J ("mean", MASS_MEAN) or 1.
    rank[t] = number of tokens of the block with larger s, or equal s and smaller position: the top-t
    tokens are those of rank < t (ties to the smaller position), found without a sort (a BS x BS count).
    priority: [B, HKV, J] fp32; rank: [B, HKV, J * BS] int32.
    VARLEN: sequence b has its own J_b = blocks[b] <= J budgeted blocks ([B] int32); blocks j >= J_b do not
    exist and get priority -inf, so they rank after every block that does.
    """
    bh = tl.program_id(0)
    j = tl.program_id(1)
    if VARLEN:
        num_blocks = tl.load(blocks_ptr + bh // HKV)
    else:
        num_blocks = J
    exists = j < num_blocks
    offs_g = tl.arange(0, G_PAD)
    offs_t = tl.arange(0, BS)
    g_ok = offs_g < G
    row = bh * G + offs_g
    in_block = (j * BS + offs_t) < num_blocks * BS  # all of the block, or none of it
    x = tl.load(logits_ptr + row[:, None] * L + (j * BS + offs_t)[None, :], mask=g_ok[:, None] & in_block[None, :],
                other=float("-inf"))
    m = tl.load(row_max_ptr + row, mask=g_ok, other=0.0)
    z = tl.load(row_sum_ptr + row, mask=g_ok, other=1.0)
    # left-out logits (-inf) score 0, also in a row with no finite logit (m = -inf, z = 0)
    p = tl.where(x > float("-inf"), tl.exp2(x - m[:, None]) / z[:, None], 0.0)
    s = tl.sum(p, axis=0) / G  # [BS]
    mass = tl.sum(s, axis=0)
    # as the reference: H on the scores divided by their largest (the same quantity; it cannot underflow)
    peak = tl.max(s, axis=0)
    r = s / tl.where(peak > 0, peak, 1.0)
    r_sum = tl.sum(r, axis=0)
    herfindahl = tl.where(mass > 0, tl.sum(r * r, axis=0) / tl.where(mass > 0, r_sum * r_sum, 1.0), 1.0)
    if MASS_MEAN:
        mass_factor = num_blocks * 1.0  # J may arrive as a constexpr (Triton specialises 1)
    else:
        mass_factor = 1.0
    priority = (1 - alpha) * mass_factor * mass + alpha * (1 - herfindahl)
    tl.store(priority_ptr + bh * J + j, tl.where(exists, priority, float("-inf")))
    # rank of token i = #{k : s_k > s_i or (s_k == s_i and k < i)}
    s_i = s[:, None]
    s_k = s[None, :]
    before = (s_k > s_i) | ((s_k == s_i) & (offs_t[None, :] < offs_t[:, None]))
    rank = tl.sum(before.to(tl.int32), axis=1)
    tl.store(rank_ptr + bh * J * BS + j * BS + offs_t, rank)


@triton.jit
def compact_kernel(
    rank_ptr, keep_ptr, offsets_ptr, indices_ptr,
    J, L, stride_idx_bh,
    BS: tl.constexpr,
):
    """Write the selected positions of block j (rank < t_j) in ascending order at offsets[j] of their head, and
    the padding value L over entries [j * BS, (j + 1) * BS) that lie past the head's count.

    rank: [B, HKV, J * BS] int32, keep (t_j): [B, HKV, J] int32, offsets: [B, HKV, J + 1] int32 (exclusive
    cumulative t_j), indices: [B, HKV, J * BS] int32.
    """
    bh = tl.program_id(0)
    j = tl.program_id(1)
    offs_t = tl.arange(0, BS)
    rank = tl.load(rank_ptr + bh * J * BS + j * BS + offs_t)
    t = tl.load(keep_ptr + bh * J + j)
    start = tl.load(offsets_ptr + bh * (J + 1) + j)
    keep = rank < t
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(indices_ptr + bh * stride_idx_bh + start + slot, j * BS + offs_t, mask=keep)
    count = tl.load(offsets_ptr + bh * (J + 1) + J)
    entry = j * BS + offs_t  # entries past the count: written by no block, so no race with the stores above
    tl.store(indices_ptr + bh * stride_idx_bh + entry, tl.zeros([BS], tl.int32) + L, mask=entry >= count)


@triton.jit
def row_stats_kernel(
    part_max_ptr, part_sum_ptr, row_max_ptr, row_sum_ptr, n_chunks,
    G: tl.constexpr, G_PAD: tl.constexpr, CHUNKS: tl.constexpr,
):
    """Eq. 5, pass 2: each row's max and sum of exp2 from its chunks' partial (max, sum), one program per (b, h).

    part_max, part_sum: [B, HKV, G, n_chunks] fp32; row_max, row_sum: [B, HKV, G] fp32. A chunk with no finite
    logit (max -inf, sum 0) adds 0, also when the whole row has none (row max -inf, row sum 0)."""
    bh = tl.program_id(0)
    offs_g = tl.arange(0, G_PAD)
    g_ok = offs_g < G
    row = bh * G + offs_g
    # Both passes keep a [G_PAD, CHUNKS] accumulator and reduce once after the loop: a reduction carried through
    # the loop whose result is used twice after it fails Triton 3.6's thread-locality pass on CUDA (an assertion).
    m_acc = tl.full([G_PAD, CHUNKS], float("-inf"), tl.float32)
    for c in range(0, n_chunks, CHUNKS):
        offs_c = c + tl.arange(0, CHUNKS)
        ok = g_ok[:, None] & (offs_c < n_chunks)[None, :]
        m_acc = tl.maximum(m_acc, tl.load(part_max_ptr + row[:, None] * n_chunks + offs_c[None, :], mask=ok,
                                          other=float("-inf")))
    m = tl.max(m_acc, axis=1)
    z_acc = tl.zeros([G_PAD, CHUNKS], tl.float32)
    for c in range(0, n_chunks, CHUNKS):
        offs_c = c + tl.arange(0, CHUNKS)
        ok = g_ok[:, None] & (offs_c < n_chunks)[None, :]
        pm = tl.load(part_max_ptr + row[:, None] * n_chunks + offs_c[None, :], mask=ok, other=float("-inf"))
        ps = tl.load(part_sum_ptr + row[:, None] * n_chunks + offs_c[None, :], mask=ok, other=0.0)
        z_acc += tl.where(ps > 0, ps * tl.exp2(pm - m[:, None]), 0.0)
    z = tl.sum(z_acc, axis=1)
    tl.store(row_max_ptr + row, m, mask=g_ok)
    tl.store(row_sum_ptr + row, z, mask=g_ok)


@triton.jit
def block_keep_kernel(
    priority_ptr, budgets_ptr, blocks_ptr, keep_ptr, offsets_ptr,
    J, HKV, stride_budget_h,
    K: tl.constexpr, K_PAD: tl.constexpr, TILE: tl.constexpr, OTHERS: tl.constexpr, VARLEN: tl.constexpr,
):
    """Eq. 7 for every block of one (b, h), and the blocks' offsets in the compact form: one program per (b, h).

    The counts n_k = floor(p_k J) plus one unit for each of the J - sum floor largest fractional parts (ties to the
    larger k), in float64 as tca.backends.common.block_budgets computes them; the rank of block j by priority
    (descending, ties to the smaller index; an all-pairs count, no sort); t_j = the largest k whose count of blocks
    kept with k or more exceeds that rank. priority: [B, HKV, J] fp32; budgets: [HKV, K] (normalised);
    keep: [B, HKV, J] int32; offsets: [B, HKV, J + 1] int32 (exclusive cumulative t_j).
    VARLEN: sequence b has J_b = blocks[b] <= J blocks ([B] int32): its counts are those of J_b, and blocks
    j >= J_b (priority -inf, ranked last) keep 0."""
    bh = tl.program_id(0)
    h = bh % HKV
    if VARLEN:
        num_blocks = tl.load(blocks_ptr + bh // HKV)
    else:
        num_blocks = J
    offs_k = tl.arange(0, K_PAD)
    k_ok = offs_k < K
    exact = tl.load(budgets_ptr + h * stride_budget_h + offs_k, mask=k_ok, other=0.0).to(tl.float64) * num_blocks
    floors = exact.to(tl.int64)  # exact >= 0: truncation is the floor
    fraction = tl.where(k_ok, exact - floors.to(tl.float64), -1.0)  # padding ranks after every real k
    ahead = (fraction[None, :] > fraction[:, None]) | (
        (fraction[None, :] == fraction[:, None]) & (offs_k[None, :] > offs_k[:, None]))
    remainder_rank = tl.sum(ahead.to(tl.int32), axis=1)
    remaining = num_blocks - tl.sum(tl.where(k_ok, floors, 0), axis=0).to(tl.int32)
    counts = tl.where(k_ok, floors.to(tl.int32) + (remainder_rank < remaining).to(tl.int32), 0)
    # tail[k]: blocks kept with k or more (as retain count 2^k); t_j = 2^(largest k with tail[k] > rank_j)
    tail = tl.sum(tl.where(offs_k[None, :] >= offs_k[:, None], counts[None, :], 0), axis=1)
    carry = tl.sum(tl.zeros([TILE], tl.int32), axis=0)  # an int32 scalar, the type the loop carries
    tl.store(offsets_ptr + bh * (J + 1), carry)
    for start in range(0, J, TILE):
        offs_j = start + tl.arange(0, TILE)
        j_ok = offs_j < J
        p_j = tl.load(priority_ptr + bh * J + offs_j, mask=j_ok, other=float("-inf"))
        # pairs counted in a [TILE, OTHERS] accumulator, reduced after the loop (no reduction carried through it:
        # see row_stats_kernel)
        ahead_of_j = tl.zeros([TILE, OTHERS], tl.int32)
        for other in range(0, J, OTHERS):
            offs_i = other + tl.arange(0, OTHERS)
            p_i = tl.load(priority_ptr + bh * J + offs_i, mask=offs_i < J, other=float("-inf"))
            before = (p_i[None, :] > p_j[:, None]) | ((p_i[None, :] == p_j[:, None]) & (offs_i[None, :] < offs_j[:, None]))
            ahead_of_j += (before & (offs_i < J)[None, :]).to(tl.int32)
        rank = tl.sum(ahead_of_j, axis=1)
        above = (tail[None, :] > rank[:, None]) & k_ok[None, :]
        k_j = tl.max(tl.where(above, offs_k[None, :], 0), axis=1)  # no k above: the smallest, 2^0
        t_j = tl.where(offs_j < num_blocks, tl.full([TILE], 1, tl.int32) << k_j, 0)
        t_j = tl.where(j_ok, t_j, 0)
        tl.store(keep_ptr + bh * J + offs_j, t_j, mask=j_ok)
        ends = carry + tl.cumsum(t_j, axis=0)
        tl.store(offsets_ptr + bh * (J + 1) + 1 + offs_j, ends, mask=j_ok)
        carry += tl.sum(t_j, axis=0)

"""The online-softmax step shared by the Triton attention kernels (FlashAttention-2's recurrence). @triton.jit only.

State per query row: m (running max of the raw scores q.k), l (running sum of exp2((s - m) * scale_log2)),
acc (running sum of exp2((s - m) * scale_log2) * v). Each step folds in one tile of keys; the caller divides
acc by l at the end, and the row's natural-log LSE is (m * scale_log2 + log2 l) * ln 2.

The max is taken on raw scores and subtracted before scaling, so the row's largest score gets exp2(0) = 1
exactly at every scale. Scaling first (FlashAttention's one fused multiply-add, s * scale - m) is not exact:
at huge scales the product's rounding error (~1e24 at scale 1e30) reaches the exponent and exp2 of every
score, the largest included, underflows to 0 (or overflows), so l = 0 and the row comes out NaN.
"""

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(q, k, v, m_i, l_i, acc, valid, scale_log2, PREC: tl.constexpr, MASK: tl.constexpr):
    """Fold keys k [N, D], values v [N, D] into the state of the rows q [M, D]: m_i, l_i [M], acc [M, D] fp32.

    valid [M, N] bool (only read when MASK): which keys each row may see. Returns the new (m_i, l_i, acc)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if MASK:
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2((m_i - m_new) * scale_log2)
    p = tl.exp2((s - m_new[:, None]) * scale_log2)  # s - m_new <= 0 exactly: no clamp needed
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASK:
        # [choice: non-finite] a NaN/Inf value reaches only the rows that see its key: p = 0 times NaN would
        # reach every row of the tile, so such entries are zeroed and the rows that see them set to NaN
        v_ok = (v == v) & (tl.abs(v.to(tl.float32)) < float("inf"))
        visible = (tl.where(valid, 1.0, 0.0) + tl.zeros_like(s)).to(v.dtype)  # [M, N], valid may be [1, N]
        seen = tl.dot(visible, (v_ok == 0).to(v.dtype), input_precision=PREC)  # [M, D] counts
        v = tl.where(v_ok, v, 0.0).to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        acc = tl.where(seen > 0, float("nan"), acc)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc

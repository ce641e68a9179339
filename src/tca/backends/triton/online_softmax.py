"""The online-softmax step shared by the Triton attention kernels (FlashAttention-2's recurrence). @triton.jit only.

State per query row: m (running max of the scaled logits, log2 units), l (running sum of exp2(logit - m)),
acc (running sum of exp2(logit - m) * v). Each step folds in one tile of keys; the caller divides acc by l at
the end, and the row's natural-log LSE is (m + log2 l) * ln 2.
"""

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(q, k, v, m_i, l_i, acc, valid, scale_log2, PREC: tl.constexpr, MASK: tl.constexpr):
    """Fold keys k [N, D], values v [N, D] into the state of the rows q [M, D]: m_i, l_i [M], acc [M, D] fp32.

    valid [M, N] bool (only read when MASK): which keys each row may see. Raw scores, the scale folded into the
    exponent (one FMA per score). Returns the new (m_i, l_i, acc)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if MASK:
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale_log2)
    alpha = tl.exp2(m_i - m_new)
    # s * scale_log2 <= m_new, but a fused multiply-add rounds the two sides differently: at huge scales their
    # difference can come out positive by ~1e24 and exp2 overflows. Clamped at 0, the row keeps its exact max.
    d = s * scale_log2 - m_new[:, None]
    p = tl.exp2(tl.where(d > 0.0, 0.0, d))  # a NaN stays NaN (tl.minimum would return the 0)
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

"""The LSE merge of merge.py as one fused Triton kernel (used on CUDA when Triton imports).

Why: at 128K tokens and 32 query heads each part's output is 1 GiB in bf16; the torch merge makes fp32
temporaries (~8 GiB of traffic, ~5 ms on an H100), the kernel reads both parts once and writes once (3 GiB).
Shapes: out_* [T, H, D] (rows of T*H contiguous vectors of D), lse_* [T, H] (any strides, via a row index),
has_second [T] or [T, H] bool.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def merge_kernel(
    o1_ptr, l1_ptr, o2_ptr, l2_ptr, has_ptr, out_ptr, lse_ptr,
    R, H, stride_l1_t, stride_l1_h, stride_l2_t, stride_l2_h, has_stride_t, has_stride_h,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Rows r = t * H + h of D values: out = w1 o1 + w2 o2 with w_k = exp(lse_k - lse), lse = logaddexp."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < R
    t = rows // H
    h = rows % H
    l1 = tl.load(l1_ptr + t * stride_l1_t + h * stride_l1_h, mask=ok, other=0.0).to(tl.float32)
    l2 = tl.load(l2_ptr + t * stride_l2_t + h * stride_l2_h, mask=ok, other=0.0).to(tl.float32)
    has = tl.load(has_ptr + t * has_stride_t + h * has_stride_h, mask=ok, other=0) != 0
    l2 = tl.where(has, l2, float("-inf"))
    m = tl.maximum(l1, l2)
    e1 = tl.exp(l1 - m)
    e2 = tl.where(has, tl.exp(l2 - m), 0.0)
    total = e1 + e2
    w1 = e1 / total
    w2 = e2 / total
    cols = tl.arange(0, D_PAD)
    offs = rows[:, None] * D + cols[None, :]
    live = ok[:, None] & (cols[None, :] < D)
    o1 = tl.load(o1_ptr + offs, mask=live, other=0.0).to(tl.float32)
    o2 = tl.load(o2_ptr + offs, mask=live & has[:, None], other=0.0).to(tl.float32)
    out = o1 * w1[:, None] + tl.where(has[:, None], o2, 0.0) * w2[:, None]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=live)
    tl.store(lse_ptr + rows, m + tl.log(total), mask=ok)


def merge_two(out_1, lse_1, out_2, lse_2, has_second, out_dtype=None):
    """Same contract as merge.merge_two; returns (out [T, H, D], lse [T, H] float32 contiguous)."""
    T, H, D = out_1.shape
    out_dtype = out_dtype or out_1.dtype
    o1, o2 = out_1.contiguous(), out_2.contiguous()
    has = has_second.to(torch.uint8)
    has_stride_t, has_stride_h = (has.stride(0), 0) if has.dim() == 1 else (has.stride(0), has.stride(1))
    out = torch.empty(T, H, D, device=out_1.device, dtype=out_dtype)
    lse = torch.empty(T, H, device=out_1.device, dtype=torch.float32)
    R = T * H
    d_pad = triton.next_power_of_2(D)
    block_r = max(1, min(64, 8192 // d_pad))
    merge_kernel[(triton.cdiv(R, block_r),)](
        o1, lse_1, o2, lse_2, has, out, lse,
        R, H, lse_1.stride(0), lse_1.stride(1), lse_2.stride(0), lse_2.stride(1), has_stride_t, has_stride_h,
        D=D, D_PAD=d_pad, BLOCK_R=block_r,
    )
    return out, lse

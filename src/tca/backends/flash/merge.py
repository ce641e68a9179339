"""Merge two attention results over disjoint key sets into the attention over their union, by log-sum-exp.

With o_k = sum_{j in S_k} e^{s_j} v_j / e^{lse_k} (k = 1, 2) and S_1, S_2 disjoint:
    out = (e^{lse_1} o_1 + e^{lse_2} o_2) / (e^{lse_1} + e^{lse_2}),   lse = log(e^{lse_1} + e^{lse_2}),
computed stably as weights exp(lse_k - lse) in [0, 1] (no exponent of a large lse is ever formed).
A part that has no keys (`has_second` False) gets weight 0 whatever its out and lse hold, so nothing
depends on what a kernel writes for an empty sequence.

Shapes: out_* [T, H, D], lse_* [T, H] float32, has_second [T] or [T, H] bool.
"""

from __future__ import annotations

import functools

import torch


def merge_two(out_1, lse_1, out_2, lse_2, has_second, out_dtype=None):
    """-> (out [T, H, D] in out_dtype (default out_1's), lse [T, H] float32). The first part must be non-empty."""
    out_dtype = out_dtype or out_1.dtype
    if has_second.dim() == 1:
        has_second = has_second[:, None].expand_as(lse_1)
    lse_2 = torch.where(has_second, lse_2.float(), float("-inf"))
    lse_1 = lse_1.float()
    lse = torch.logaddexp(lse_1, lse_2)
    w_2 = torch.exp(lse_2 - lse)  # in [0, 1]; exactly 0 where the second part is empty
    w_1 = torch.exp(lse_1 - lse)
    second = torch.where(has_second[..., None], out_2.float(), 0.0)
    out = torch.addcmul(out_1.float() * w_1[..., None], second, w_2[..., None])
    return out.to(out_dtype), lse


def merge(out_1, lse_1, out_2, lse_2, has_second, out_dtype=None):
    """merge_two, fused in one Triton kernel on CUDA when Triton imports (merge_triton.py), else in torch."""
    fused = _import_merge_triton() if out_1.is_cuda else None
    if fused is not None:
        return fused.merge_two(out_1, lse_1, out_2, lse_2, has_second, out_dtype)
    return merge_two(out_1, lse_1, out_2, lse_2, has_second, out_dtype)


@functools.cache
def _import_merge_triton():
    """The fused merge, or None where triton is not installed (the torch merge computes the same); looked up once."""
    try:
        from . import merge_triton
    except ImportError:
        return None
    return merge_triton

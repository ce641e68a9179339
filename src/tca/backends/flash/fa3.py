"""Adapter for FlashAttention-3 (`flash_attn_interface`, the hopper/ build of flash-attention; Hopper GPUs).

Like FA4 it reads cu_seqlens_k as offsets and seqused_k as lengths, so overlapping key segments stay in place.
Windows use -1 for unlimited. With return_attn_probs=True it returns (out, lse[H, TQ]); some builds return
that pair always, others only out when not asked: both are handled.
"""

from __future__ import annotations

import importlib

import torch

from .adapter import VarlenResult, cu_seqlens_k_from_starts, fa_window, lse_rows_first

MODULE = "flash_attn_interface"
GENERATION = "fa3"
DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 96, 128, 192, 256)


def head_dim_reason(head_dim: int, capability: tuple[int, int]) -> str | None:
    if head_dim not in HEAD_DIMS:
        return f"FA3 runs head dims {', '.join(map(str, HEAD_DIMS))}, got {head_dim}"
    return None


class FA3Adapter:
    generation = GENERATION
    module_name = MODULE

    def __init__(self, module=None):
        self.fa = module if module is not None else importlib.import_module(MODULE)

    def varlen(self, q, k, v, cu_seqlens_q, k_starts, k_lens, max_seqlen_q, max_seqlen_k, causal, scale, window=None):
        """See adapter.py. q [TQ, H, D], k, v [TK, HK, D]  ->  VarlenResult(out [TQ, H, D], lse [TQ, H])."""
        result = self.fa.flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q.to(torch.int32).contiguous(),
            cu_seqlens_k_from_starts(k_starts, k.shape[0]),
            int(max_seqlen_q),
            int(max_seqlen_k),
            seqused_k=k_lens.to(torch.int32).contiguous(),
            softmax_scale=float(scale),
            causal=bool(causal),
            window_size=fa_window(window, -1),
            return_attn_probs=True,
        )
        out, lse = result[0], result[1]
        return VarlenResult(out, lse_rows_first(lse, q.shape[0], q.shape[1]))

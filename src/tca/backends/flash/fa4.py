"""Adapter for FlashAttention-4 (`flash_attn.cute`, PyPI flash-attn-4): CuTe DSL kernels compiled on first use.

Its varlen entry point takes cu_seqlens_k as per-sequence *offsets* and seqused_k as lengths (SeqlenInfoQK
reads offset_k = cu_seqlens_k[b], seqlen_k = seqused_k[b]), so overlapping key segments are read in place.
Windows use None for unlimited; the LSE comes back as [H, TQ] with return_lse=True; out, lse = f(...).
"""

from __future__ import annotations

import importlib
import os

import torch

from .adapter import (
    COPY_KV_ENV,
    MAX_PACKED_KEYS,
    VarlenResult,
    cu_seqlens_k_from_starts,
    fa_window,
    lse_rows_first,
    packed_copies,
)

MODULE = "flash_attn.cute"
GENERATION = "fa4"
DTYPES = (torch.float16, torch.bfloat16)


def head_dim_reason(head_dim: int, capability: tuple[int, int]) -> str | None:
    """None if FA4 runs this head dim on this GPU, else why not (interface._validate_head_dims)."""
    if head_dim % 8 or not 8 <= head_dim <= 256:
        return f"FA4 needs a head dim in 8..256 divisible by 8, got {head_dim}"
    if capability[0] in (10, 11) and head_dim > 128 and head_dim != 256:
        return f"FA4 on Blackwell runs head dims <= 128 or 256, got {head_dim}"
    return None


class FA4Adapter:
    generation = GENERATION
    module_name = MODULE

    def __init__(self, module=None, copy_kv: bool | None = None):
        self.fa = module if module is not None else importlib.import_module(MODULE)
        self.copy_kv = os.environ.get(COPY_KV_ENV) == "1" if copy_kv is None else copy_kv

    def varlen(self, q, k, v, cu_seqlens_q, k_starts, k_lens, max_seqlen_q, max_seqlen_k, causal, scale, window=None):
        """See adapter.py. q [TQ, H, D], k, v [TK, HK, D]  ->  VarlenResult(out [TQ, H, D], lse [TQ, H])."""
        if self.copy_kv:  # the fallback: contiguous copies, as for FA2
            def call(qc, kc, vc, cu_q, cu_k):
                out, lse = self.fa.flash_attn_varlen_func(
                    qc, kc, vc, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=int(max_seqlen_q),
                    max_seqlen_k=int(max_seqlen_k), softmax_scale=float(scale), causal=bool(causal),
                    window_size=fa_window(window, None), return_lse=True,
                )
                return out, lse_rows_first(lse, qc.shape[0], qc.shape[1])

            return packed_copies(q, k, v, cu_seqlens_q, k_starts, k_lens, MAX_PACKED_KEYS, call)
        out, lse = self.fa.flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q=cu_seqlens_q.to(torch.int32).contiguous(),
            cu_seqlens_k=cu_seqlens_k_from_starts(k_starts, k.shape[0]),
            max_seqlen_q=int(max_seqlen_q),
            max_seqlen_k=int(max_seqlen_k),
            seqused_k=k_lens.to(torch.int32).contiguous(),
            softmax_scale=float(scale),
            causal=bool(causal),
            window_size=fa_window(window, None),
            return_lse=True,
        )
        return VarlenResult(out, lse_rows_first(lse, q.shape[0], q.shape[1]))

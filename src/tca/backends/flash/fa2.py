"""Adapter for FlashAttention-2 (`flash_attn`, PyPI flash-attn 2.x; Ampere and later).

Its Python varlen API has no seqused_k, so key segments cannot overlap: each call copies its segments out
(rows k_starts[s] .. + k_lens[s]) into a packed buffer, in chunks of at most MAX_PACKED_KEYS rows so the copy
stays bounded (at 128K tokens the local windows alone would be L/b * w rows per head if copied at once).
Windows use -1 for unlimited. return_attn_probs=True gives (out, lse[H, TQ], S_dmask).
"""

from __future__ import annotations

import importlib

import torch

from .adapter import MAX_PACKED_KEYS, fa_window, lse_rows_first, packed_copies

MODULE = "flash_attn"
GENERATION = "fa2"
DTYPES = (torch.float16, torch.bfloat16)


def head_dim_reason(head_dim: int, capability: tuple[int, int]) -> str | None:
    if head_dim % 8 or not 8 <= head_dim <= 256:
        return f"FA2 needs a head dim in 8..256 divisible by 8, got {head_dim}"
    return None


class FA2Adapter:
    generation = GENERATION
    module_name = MODULE

    def __init__(self, module=None, max_packed_keys: int = MAX_PACKED_KEYS):
        self.fa = module if module is not None else importlib.import_module(MODULE)
        self.max_packed_keys = max_packed_keys

    def varlen(self, q, k, v, cu_seqlens_q, k_starts, k_lens, max_seqlen_q, max_seqlen_k, causal, scale, window=None):
        """See adapter.py. q [TQ, H, D], k, v [TK, HK, D]  ->  VarlenResult(out [TQ, H, D], lse [TQ, H])."""

        def call(qc, kc, vc, cu_q, cu_k):
            out, lse, _ = self.fa.flash_attn_varlen_func(
                qc, kc, vc, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k),
                dropout_p=0.0,
                softmax_scale=float(scale),
                causal=bool(causal),
                window_size=fa_window(window, -1),
                return_attn_probs=True,
            )
            return out, lse_rows_first(lse, qc.shape[0], qc.shape[1])

        return packed_copies(q, k, v, cu_seqlens_q, k_starts, k_lens, self.max_packed_keys, call)

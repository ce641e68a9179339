"""The retrieval mass of a calibration rule beyond the paper (docs/semantics.md section 6.1) on the torch backend:
every candidate at once, the answer rows' pre-window attention multiplied by the candidates' selection masks.

The prompt's selection is made as a prefill of the first P tokens makes it (from row P-1). Its global keys all
lie before lo(P-1) = J b, so what an answer row sees of the cache is that selection, then every key from J b on.

Shape letters: B batch, HQ query heads, HKV key/value heads, G = HQ / HKV, L keys, D head dim, J budgeted blocks
of the prompt, b block size, S = J * b selectable keys, M candidates, R answer rows.
"""

from __future__ import annotations

import torch

from ...config import TCAConfig
from ...dtypes import compute_dtype
from .calibration import candidate_masks


def retrieval_mass(q, k, candidates: torch.Tensor, config: TCAConfig, scale: float, answer_start: int) -> torch.Tensor:
    """a_m^ret per KV head on one retrieval probe: the mean over the batch, the group's query heads and the answer
    rows P .. L-1 of the dense attention mass on what the cache holds after a prefill of the first P tokens.

    q: [B, HQ, L, D], k: [B, HKV, L, D], candidates: [M, len(K)], 0 < P < L  ->  [M, HKV] float64.
    """
    B, HQ, L, D = q.shape
    HKV, P = k.shape[1], answer_start
    if not 0 < P < L:
        raise ValueError(f"answer_start must be inside the sequence (0 < P < L = {L}), got {P}")
    G, R = HQ // HKV, L - P
    dt = compute_dtype(q.dtype)
    selected = candidate_masks(q[:, :, :P], k[:, :, :P], candidates, config, scale).to(dt)  # [M, B, HKV, S]
    S = selected.shape[-1]
    rows = torch.arange(P, L, device=q.device)
    qr = q[:, :, P:].to(dt).reshape(B, HKV, G * R, D)  # query head h*G+g, row r -> [b, h, g*R + r]
    logits = torch.matmul(qr, k.to(dt).transpose(-1, -2)).mul_(scale).view(B, HKV, G, R, L)
    attn = logits.masked_fill_(torch.arange(L, device=q.device) > rows[:, None], float("-inf")).softmax(-1)
    after = attn[..., S:].sum(-1).reshape(B, HKV, G * R, 1)  # the window of row P-1 and every answer key
    before = torch.matmul(attn[..., :S].reshape(B, HKV, G * R, S), selected.permute(1, 2, 3, 0))  # [B, HKV, G*R, M]
    return (before + after).to(torch.float64).mean(dim=(0, 2)).T

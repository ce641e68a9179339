"""Calibration's retained mass (docs/semantics.md section 6) on the torch backend: every candidate at once, rows
in chunks, no L x L tensor; matmuls only, so it is fast on a GPU.

For a row i and query head, the dense causal softmax row A[i, :] keeps its mass on the local keys [lo(i), i]
(the same for every candidate) plus on the selected keys before lo(i). The selection of candidate m differs
from another's only in t_j (Eq. 7): importance, priority, block ranks and each token's place in its block
(Eq. 8) are computed once, and candidate m keeps the tokens whose place is below its t_j. The global mass of
every candidate is then one matmul of the rows' pre-window attention [.., r, P] with the M selection masks.

Shape letters: B batch, HQ query heads, HKV key/value heads, G = HQ / HKV, L keys, D head dim, J budgeted blocks,
b block size, P = J * b, M candidates, R evaluated rows, r rows of a chunk.
"""

from __future__ import annotations

import torch

from ...config import TCAConfig
from ...dtypes import compute_dtype
from ...geometry import DEFAULT_CALIBRATION_ROWS, evaluated_rows, num_budgeted_blocks, window_start
from ..common.block_budgets import block_keep_from_ranks
from ..common.selection_torch import block_priority, block_ranks, last_query_importance

ROW_CHUNK = 64  # rows per chunk: the dense rows [B, HQ, r, L] of one chunk are the peak memory


def candidate_masks(q, k, candidates: torch.Tensor, config: TCAConfig, scale: float) -> torch.Tensor:
    """The selection of every candidate: [M, B, HKV, P] bool. q [B, HQ, L, D] (last row used), k [B, HKV, L, D],
    candidates [M, K]."""
    B, HKV, L, _ = k.shape
    b = config.block_size
    J = num_budgeted_blocks(L, b, config.window)
    importance = last_query_importance(q[:, :, -1], k, scale)  # [B, HKV, L]
    ranks = block_ranks(block_priority(importance, J, b, config.alpha, config.mass_scale))  # [B, HKV, J]
    blocks = importance[..., : J * b].reshape(B, HKV, J, b)
    place = blocks.sort(dim=-1, descending=True, stable=True).indices.argsort(dim=-1)  # [B, HKV, J, b], Eq. 8
    keep = torch.stack([block_keep_from_ranks(ranks, p.expand(HKV, -1)) for p in candidates.to(k.device)])
    return (place < keep[..., None]).reshape(len(candidates), B, HKV, J * b)  # keep: [M, B, HKV, J]


def retained_mass(q, k, candidates: torch.Tensor, config: TCAConfig, scale: float,
                  num_rows: int = DEFAULT_CALIBRATION_ROWS, row_chunk: int = ROW_CHUNK) -> torch.Tensor:
    """a_m per KV head: the mean over the batch, the group's query heads and the evaluated rows of the dense
    attention mass kept in S(i). q [B, HQ, L, D], k [B, HKV, L, D], candidates [M, K] -> [M, HKV] float64."""
    B, HQ, L, D = q.shape
    HKV, b, w = k.shape[1], config.block_size, config.window
    G, M = HQ // HKV, len(candidates)
    dt = compute_dtype(q.dtype)
    rows = evaluated_rows(L, w, num_rows).to(q.device)
    selected = candidate_masks(q, k, candidates, config, scale).to(dt)  # [M, B, HKV, P]
    P = selected.shape[-1]
    by_head = selected.permute(1, 2, 3, 0)  # [B, HKV, P, M]
    keys_t = k.to(dt).transpose(-1, -2)  # [B, HKV, D, L]
    positions = torch.arange(L, device=q.device)
    total = torch.zeros(M, HKV, dtype=torch.float64, device=q.device)
    for chunk in rows.split(row_chunk):
        r = chunk.numel()
        qr = q[:, :, chunk].to(dt).reshape(B, HKV, G * r, D)  # query head h*G+g, row i -> [b, h, g*r + i]
        logits = torch.matmul(qr, keys_t).mul_(scale).view(B, HKV, G, r, L)
        attn = logits.masked_fill_(positions > chunk[:, None], float("-inf")).softmax(-1)  # dense causal rows
        lo = window_start(chunk, b, w)[:, None]  # [r, 1]
        local = ((positions >= lo) & (positions <= chunk[:, None])).to(dt)  # [r, L]
        local_mass = (attn * local).sum(-1)  # [B, HKV, G, r]
        before = attn[..., :P] * (positions[:P] < lo).to(dt)  # [B, HKV, G, r, P]: pre-window attention
        global_mass = torch.matmul(before.reshape(B, HKV, G * r, P), by_head)  # [B, HKV, G*r, M]
        rho = global_mass + local_mass.reshape(B, HKV, G * r, 1)
        total += rho.to(torch.float64).sum(dim=(0, 2)).T
    return total / (B * G * len(rows))

"""Online token selection of TCA (docs/semantics.md section 3, paper Eqs. 5-8), readable and exact.

Legend (einops letters):
    b  batch             h  key/value head (HKV)     g  query head within its group (G = HQ / HKV)
    d  head dim          l  key position (L)         j  budgeted block (J)     t  position in a block (bs)
    k  retain count index (log2 of the count)
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange

from ..budgets import retain_counts
from ..config import TCAConfig
from ..dtypes import compute_dtype
from ..geometry import num_budgeted_blocks
from ..selection import Selection


def last_query_importance(q_last: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Eq. 5: s_g = mean over the group of softmax(scale * q_last . K^T) over all L keys.

    q_last: [B, HQ, D] (the query at position L-1), k: [B, HKV, L, D]  ->  s: [B, HKV, L] (fp32 or fp64).
    [choice: GQA] the G query heads sharing a KV head are averaged, so one selection serves them all.
    """
    dt = compute_dtype(q_last.dtype)
    q = rearrange(q_last.to(dt), "b (h g) d -> b h g d", h=k.shape[1])
    logits = einsum(q, k.to(dt), "b h g d, b h l d -> b h g l") * scale
    return finite_softmax(logits).mean(dim=2)


def finite_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis that leaves non-finite logits out: they score 0. [choice: non-finite]

    A NaN or +-Inf logit (from a non-finite query or key, or a product that overflows) would make the whole
    row NaN, and NaN scores would rank first; left out, it costs only its own key. A row with no finite
    logit scores 0 everywhere. Finite rows are unchanged, bit for bit.
    """
    logits = logits.masked_fill(~torch.isfinite(logits), float("-inf"))
    return logits.softmax(dim=-1).nan_to_num(nan=0.0)


def block_priority(importance: torch.Tensor, num_blocks: int, block_size: int, alpha: float, mass_scale: str):
    """Eq. 6: h_j = (1 - alpha) m_j + alpha (1 - H_j) for budgeted blocks j < J.

    M_j = block mass, H_j = sum s^2 / M_j^2 (Herfindahl index, 1 when M_j = 0),
    m_j = J * M_j ("mean", [choice]) or M_j ("none", the paper's literal form).
    importance: [B, HKV, L]  ->  [B, HKV, J].
    """
    blocks = rearrange(importance[..., : num_blocks * block_size], "b h (j t) -> b h j t", t=block_size)
    mass = blocks.sum(-1)  # M_j [B, HKV, J]
    # H_j is a ratio, unchanged when every score of the block is divided by the largest: computed on r = s / max s
    # (max r = 1), sum r^2 and (sum r)^2 are at least 1 and cannot underflow, however small the scores.
    peak = blocks.amax(-1, keepdim=True)  # [B, HKV, J, 1]
    r = blocks / torch.where(peak > 0, peak, 1)
    herfindahl = torch.where(mass > 0, (r**2).sum(-1) / r.sum(-1) ** 2, 1)
    m = mass * num_blocks if mass_scale == "mean" else mass
    return (1 - alpha) * m + alpha * (1 - herfindahl)


def block_ranks(priority: torch.Tensor) -> torch.Tensor:
    """Rank of each block by priority, descending (0 = highest); ties go to the smaller block index."""
    order = priority.sort(dim=-1, descending=True, stable=True).indices  # [B, HKV, J] block ids, best first
    return order.argsort(dim=-1)  # [B, HKV, J]: the inverse permutation, r_j


def budget_counts(budgets: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Eq. 7, counts: n_k = floor(p[k] J), the remaining units to the largest fractional parts. [choice]

    Ties of fractional parts go to the larger k. budgets: [..., len(K)] summing to 1 (tca.validation
    normalises them)  ->  int64 [..., len(K)], each row summing to J.
    """
    exact = budgets.to(torch.float64) * num_blocks
    floors = exact.floor()
    fraction = exact - floors
    n = budgets.shape[-1]
    # Order retain counts by fraction descending, ties to the larger k: sort larger-k-first, then stably.
    by_k_desc = torch.arange(n - 1, -1, -1, device=budgets.device)
    order = by_k_desc[fraction[..., by_k_desc].sort(dim=-1, descending=True, stable=True).indices]  # [..., n]
    place = order.argsort(dim=-1)  # [..., n]: where each k stands in that order
    left = num_blocks - floors.sum(-1, keepdim=True)  # units still to give: 0 <= left <= n for normalised p
    return (floors + (place < left)).long()


def psi(counts: torch.Tensor, block_size: int) -> torch.Tensor:
    """Psi: each retain count k repeated n_k times, in descending order. counts: [len(K)] -> [J]."""
    k_values = retain_counts(block_size).to(counts.device)
    return torch.repeat_interleave(k_values.flip(0), counts.flip(0))


def block_budgets(priority: torch.Tensor, budgets: torch.Tensor, block_size: int) -> torch.Tensor:
    """Eq. 7: t_j = Psi[r_j], the highest-priority blocks get the largest budgets.

    priority: [B, HKV, J], budgets: [HKV, len(K)]  ->  int64 [B, HKV, J].
    """
    B, H, J = priority.shape
    ranks = block_ranks(priority)  # r_j [B, HKV, J]
    counts = budget_counts(budgets, J)  # n_k [HKV, len(K)]
    table = torch.stack([psi(counts[h], block_size) for h in range(H)]) if J else ranks.new_zeros(H, 0)  # Psi [HKV, J]
    return torch.gather(table.expand(B, H, J), -1, ranks)  # [B, HKV, J]: t_j = Psi[r_j]


def select_tokens(importance: torch.Tensor, budgets_per_block: torch.Tensor, block_size: int) -> torch.Tensor:
    """Eq. 8: in block j keep the t_j positions with the largest importance; ties to the smaller position.

    importance: [B, HKV, L], budgets_per_block: [B, HKV, J]  ->  mask [B, HKV, J * b] bool.
    """
    J = budgets_per_block.shape[-1]
    blocks = rearrange(importance[..., : J * block_size], "b h (j t) -> b h j t", t=block_size)
    order = blocks.sort(dim=-1, descending=True, stable=True).indices  # [B, HKV, J, b] offsets, best first
    place = order.argsort(dim=-1)  # [B, HKV, J, b]: each token's place in its block's order
    keep = place < budgets_per_block[..., None]  # [B, HKV, J, b]
    return rearrange(keep, "b h j t -> b h (j t)")


def select(q: torch.Tensor, k: torch.Tensor, budgets: torch.Tensor, config: TCAConfig, scale: float) -> Selection:
    """Sections 3.1-3.4: the selection made from the last query row.

    q: [B, HQ, LQ, D] (only q[:, :, -1] is used), k: [B, HKV, L, D], budgets: [HKV, len(K)] float64.
    """
    L = k.shape[2]
    b = config.block_size
    J = num_budgeted_blocks(L, b, config.window)
    importance = last_query_importance(q[:, :, -1], k, scale)  # Eq. 5, s [B, HKV, L]
    priority = block_priority(importance, J, b, config.alpha, config.mass_scale)  # Eq. 6, h [B, HKV, J]
    per_block = block_budgets(priority, budgets, b)  # Eq. 7, t [B, HKV, J]
    mask = select_tokens(importance, per_block, b)  # Eq. 8, [B, HKV, J * b]
    return Selection(mask=mask, block_budgets=per_block, block_size=b, window=config.window, seq_len=L)

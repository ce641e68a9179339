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
from ..geometry import num_budgeted_blocks
from ..selection import Selection
from ._dtype import compute_dtype


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
    mass = blocks.sum(-1)
    squares = (blocks**2).sum(-1)
    nonzero = mass > 0
    safe = torch.where(nonzero, mass, 1)
    herfindahl = squares / safe**2
    # When every score of a block is tiny (fp32: below ~1e-19), sum s^2 and M^2 underflow: H_j came out NaN
    # (0/0, which then ranked first) or ~0. There, evaluate the equal sum (s / M)^2, which cannot underflow;
    # elsewhere keep the literal formula, bit for bit.
    underflow = squares < torch.finfo(squares.dtype).tiny
    if bool((underflow & nonzero).any()):
        scaled = ((blocks / safe[..., None]) ** 2).sum(-1)
        herfindahl = torch.where(underflow, scaled, herfindahl)
    herfindahl = torch.where(nonzero, herfindahl, 1)
    m = mass * num_blocks if mass_scale == "mean" else mass
    return (1 - alpha) * m + alpha * (1 - herfindahl)


def block_ranks(priority: torch.Tensor) -> torch.Tensor:
    """Rank of each block by priority, descending (0 = highest); ties go to the smaller block index."""
    order = priority.sort(dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def budget_counts(budgets: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Eq. 7, counts: n_k = floor(p[k] J), the remaining units to the largest fractional parts. [choice]

    Ties of fractional parts go to the larger k. budgets: [..., len(K)]  ->  int64 [..., len(K)],
    each row summing to J. Budgets that sum to 1 only within tolerance can leave more units than
    retain counts, or fewer than none: those are spread over the same order again, or taken back from the
    smallest fractional parts.
    """
    exact = budgets.to(torch.float64) * num_blocks
    counts = exact.floor().long()
    fraction = exact - counts
    n = budgets.shape[-1]
    # Order retain counts by fraction descending, ties to the larger k: sort larger-k-first, then stably.
    by_k_desc = torch.arange(n - 1, -1, -1, device=budgets.device)
    order = by_k_desc[fraction[..., by_k_desc].sort(dim=-1, descending=True, stable=True).indices]
    remaining = num_blocks - counts.sum(-1, keepdim=True)  # [..., 1]
    # Unit u (0-based) of the remainder goes to order[u % n]: plain largest remainder when remaining < n.
    slot = torch.arange(n, device=budgets.device)
    extra = torch.div(remaining - slot - 1, n, rounding_mode="floor") + 1  # units landing on slot s
    extra = extra.clamp_min(0)
    counts = counts.scatter_add(-1, order, extra)
    deficit = (-remaining).clamp_min(0)
    if bool((deficit > 0).any()):
        counts = _take_back(counts, fraction, deficit)
    return counts


def _take_back(counts, fraction, deficit):
    """Remove `deficit` units from the counts with the smallest fractional parts (budgets summing to > 1)."""
    counts = counts.clone()
    flat_c, flat_f, flat_d = counts.view(-1, counts.shape[-1]), fraction.reshape(-1, counts.shape[-1]), deficit.view(-1)
    for row in range(flat_c.shape[0]):
        for idx in flat_f[row].sort(stable=True).indices.tolist():  # ties: the smaller k gives first
            while flat_d[row] > 0 and flat_c[row, idx] > 0:
                flat_c[row, idx] -= 1
                flat_d[row] -= 1
    return counts


def psi(counts: torch.Tensor, block_size: int) -> torch.Tensor:
    """Psi: each retain count k repeated n_k times, in descending order. counts: [len(K)] -> [J]."""
    k_values = retain_counts(block_size).to(counts.device)
    return torch.repeat_interleave(k_values.flip(0), counts.flip(0))


def block_budgets(priority: torch.Tensor, budgets: torch.Tensor, block_size: int) -> torch.Tensor:
    """Eq. 7: t_j = Psi[r_j], the highest-priority blocks get the largest budgets.

    priority: [B, HKV, J], budgets: [HKV, len(K)]  ->  int64 [B, HKV, J].
    """
    B, H, J = priority.shape
    ranks = block_ranks(priority)
    counts = budget_counts(budgets, J)  # [HKV, len(K)]
    table = torch.stack([psi(counts[h], block_size) for h in range(H)]) if J else ranks.new_zeros(H, 0)
    return torch.gather(table.expand(B, H, J), -1, ranks)


def select_tokens(importance: torch.Tensor, budgets_per_block: torch.Tensor, block_size: int) -> torch.Tensor:
    """Eq. 8: in block j keep the t_j positions with the largest importance; ties to the smaller position.

    importance: [B, HKV, L], budgets_per_block: [B, HKV, J]  ->  mask [B, HKV, J * b] bool.
    """
    J = budgets_per_block.shape[-1]
    blocks = rearrange(importance[..., : J * block_size], "b h (j t) -> b h j t", t=block_size)
    order = blocks.sort(dim=-1, descending=True, stable=True).indices
    place = torch.empty_like(order)
    place.scatter_(-1, order, torch.arange(block_size, device=order.device).expand_as(order))
    keep = place < budgets_per_block[..., None]
    return rearrange(keep, "b h j t -> b h (j t)")


def select(q: torch.Tensor, k: torch.Tensor, budgets: torch.Tensor, config: TCAConfig, scale: float) -> Selection:
    """Sections 3.1-3.4: the selection made from the last query row.

    q: [B, HQ, LQ, D] (only q[:, :, -1] is used), k: [B, HKV, L, D], budgets: [HKV, len(K)] float64.
    """
    L = k.shape[2]
    b = config.block_size
    J = num_budgeted_blocks(L, b, config.window)
    importance = last_query_importance(q[:, :, -1], k, scale)
    priority = block_priority(importance, J, b, config.alpha, config.mass_scale)
    per_block = block_budgets(priority, budgets, b)
    mask = select_tokens(importance, per_block, b)
    return Selection(mask=mask, block_budgets=per_block, block_size=b, window=config.window, seq_len=L)

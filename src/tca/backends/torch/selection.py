"""Online token selection (docs/semantics.md section 3, Eqs. 5-8), vectorised over batch, heads and blocks.

No L x L tensor: the importance comes from the last query row only (one [HQ, L] softmax). Every tie rule of
the spec is reproduced with stable sorts (blocks: smaller index first; tokens: smaller position first; budget
remainders: larger retain count first).

Shape letters: B batch, HQ query heads, HKV key/value heads, G = HQ / HKV, L keys, D head dim,
J budgeted blocks, b block size, K retain counts (len 1 + log2 b), N selected tokens (padded to the max).
"""

from __future__ import annotations

import torch

from ...config import TCAConfig
from ...geometry import num_budgeted_blocks
from ...selection import Selection


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and accumulation in fp32 at least (fp64 stays fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def last_query_importance(q_last: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Eq. 5: mean over each group of softmax(scale * q_last . K^T). q_last [B, HQ, D], k [B, HKV, L, D] -> [B, HKV, L]."""
    dt = compute_dtype(q_last.dtype)
    B, HQ, D = q_last.shape
    HKV = k.shape[1]
    q = q_last.to(dt).reshape(B, HKV, HQ // HKV, D)
    logits = torch.matmul(q, k.to(dt).transpose(-1, -2)) * scale  # [B, HKV, G, L]
    # [choice: non-finite] a NaN/Inf logit is left out of the softmax (scores 0; a row with none finite
    # scores 0 everywhere), so one bad key cannot turn the whole row NaN. Same rule as the reference.
    logits = logits.masked_fill(~torch.isfinite(logits), float("-inf"))
    return logits.softmax(dim=-1).nan_to_num(nan=0.0).mean(dim=2)


def block_priority(importance: torch.Tensor, num_blocks: int, block_size: int, alpha: float, mass_scale: str):
    """Eq. 6 on the budgeted blocks: [B, HKV, L] -> [B, HKV, J] (same arithmetic as the spec's formula)."""
    B, H, _ = importance.shape
    blocks = importance[..., : num_blocks * block_size].reshape(B, H, num_blocks, block_size)
    mass = blocks.sum(-1)
    squares = (blocks**2).sum(-1)
    nonzero = mass > 0
    safe = torch.where(nonzero, mass, 1)
    herfindahl = squares / safe**2
    # Tiny (not zero) scores underflow sum s^2 and M^2 (NaN or ~0); the equal sum (s / M)^2 cannot. Same rule
    # as the reference, so both agree bit for bit.
    underflow = squares < torch.finfo(squares.dtype).tiny
    if bool((underflow & nonzero).any()):
        herfindahl = torch.where(underflow, ((blocks / safe[..., None]) ** 2).sum(-1), herfindahl)
    herfindahl = torch.where(nonzero, herfindahl, 1)
    m = mass * num_blocks if mass_scale == "mean" else mass
    return (1 - alpha) * m + alpha * (1 - herfindahl)


def block_ranks(priority: torch.Tensor) -> torch.Tensor:
    """[B, HKV, J] -> rank of each block by priority descending (0 = highest), ties to the smaller block index."""
    order = priority.sort(dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def budget_counts(budgets: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Eq. 7 counts n_k = floor(p[k] J) plus the largest remainders (ties to the larger k). [HKV, K] -> int64 [HKV, K].
    Vectorised, no host synchronisation (the Triton backend uses it too).

    Budgets that sum to 1 only within tolerance may leave K or more units (spread cyclically over the same
    order) or a deficit (taken back from the smallest fractional parts), as docs/semantics.md fixes it.
    """
    exact = budgets.to(torch.float64) * num_blocks
    counts = exact.floor().long()
    fraction = exact - counts
    n = budgets.shape[-1]
    by_k_desc = torch.arange(n - 1, -1, -1, device=budgets.device)
    order = by_k_desc[fraction[..., by_k_desc].sort(dim=-1, descending=True, stable=True).indices]
    remaining = num_blocks - counts.sum(-1, keepdim=True)
    slot = torch.arange(n, device=budgets.device)
    extra = (torch.div(remaining - slot - 1, n, rounding_mode="floor") + 1).clamp_min(0)
    counts = counts.scatter_add(-1, order, extra)
    # A deficit (budgets summing to a hair over 1) comes back from the smallest fractional parts first, ties
    # from the smaller k: walk that order (the reverse of `order`), each count giving what is still owed.
    deficit = (-remaining).clamp_min(0)
    ascending = order.flip(-1)
    held = counts.gather(-1, ascending)
    before = held.cumsum(-1) - held
    take = torch.minimum((deficit - before).clamp_min(0), held)
    return counts.scatter_add(-1, ascending, -take)


def block_budgets(priority: torch.Tensor, budgets: torch.Tensor, block_size: int) -> torch.Tensor:
    """Eq. 7: t_j = Psi[r_j]. priority [B, HKV, J], budgets [HKV, K] -> int64 [B, HKV, J].

    Psi (retain counts in descending order, k repeated n_k times) is never materialised: Psi[r] is the k whose
    cumulative count (largest k first) first exceeds r, found by searchsorted.
    """
    B, H, J = priority.shape
    ranks = block_ranks(priority)
    counts = budget_counts(budgets, J).to(priority.device)  # [HKV, K]
    k_desc = 2 ** torch.arange(counts.shape[-1] - 1, -1, -1, device=priority.device)
    ends = counts.flip(-1).cumsum(-1)  # [HKV, K], cumulative counts with the largest k first
    slot = torch.searchsorted(ends.expand(B, H, -1).contiguous(), ranks.contiguous(), right=True)
    return k_desc[slot.clamp_max(counts.shape[-1] - 1)]


def select_mask(importance: torch.Tensor, per_block: torch.Tensor, block_size: int) -> torch.Tensor:
    """Eq. 8: the t_j positions of largest importance per block, ties to the smaller position. -> [B, HKV, J*b] bool."""
    B, H, J = per_block.shape
    blocks = importance[..., : J * block_size].reshape(B, H, J, block_size)
    order = blocks.sort(dim=-1, descending=True, stable=True).indices
    place = torch.empty_like(order)
    place.scatter_(-1, order, torch.arange(block_size, device=order.device).expand_as(order))
    return (place < per_block[..., None]).reshape(B, H, J * block_size)


def mask_to_indices(mask: torch.Tensor, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact a mask [B, HKV, P] into ascending positions [B, HKV, N] int64 padded with `fill`, counts [B, HKV].

    O(P) by a prefix sum (no sort). Padding with fill >= P keeps every row ascending, so searchsorted on a
    padded row finds the same prefix as on its valid part.
    """
    B, H, P = mask.shape
    counts = mask.sum(-1)
    n_max = int(counts.max()) if counts.numel() else 0
    dest = torch.where(mask, mask.long().cumsum(-1) - 1, n_max)  # unselected go to a spare column
    out = torch.full((B, H, n_max + 1), fill, dtype=torch.int64, device=mask.device)
    out.scatter_(-1, dest, torch.arange(P, device=mask.device).expand(B, H, P))
    out[..., n_max] = fill
    return out[..., :n_max].contiguous(), counts


def select_parts(q: torch.Tensor, k: torch.Tensor, budgets: torch.Tensor, config: TCAConfig, scale: float):
    """Sections 3.1-3.4 from the last query row. Returns (mask [B, HKV, J*b] bool, per_block [B, HKV, J] int64)."""
    L, b = k.shape[2], config.block_size
    J = num_budgeted_blocks(L, b, config.window)
    B, H = k.shape[:2]
    if J == 0:
        return torch.zeros(B, H, 0, dtype=torch.bool, device=k.device), torch.zeros(
            B, H, 0, dtype=torch.int64, device=k.device
        )
    # Only the first J*b keys are budgeted, but the softmax of Eq. 5 runs over all L keys.
    importance = last_query_importance(q[:, :, -1], k, scale)
    priority = block_priority(importance, J, b, config.alpha, config.mass_scale)
    per_block = block_budgets(priority, budgets.to(k.device), b)
    return select_mask(importance, per_block, b), per_block


def select(q: torch.Tensor, k: torch.Tensor, budgets: torch.Tensor, config: TCAConfig, scale: float) -> Selection:
    """The selection as a tca.Selection. q [B, HQ, LQ, D] (last row used), k [B, HKV, L, D], budgets [HKV, K]."""
    mask, per_block = select_parts(q, k, budgets, config, scale)
    return Selection(
        mask=mask, block_budgets=per_block, block_size=config.block_size, window=config.window, seq_len=k.shape[2]
    )


def select_indices(q: torch.Tensor, k: torch.Tensor, budgets: torch.Tensor, config: TCAConfig, scale: float):
    """Selected global positions per KV head, for kernels: (indices [B, HKV, Nmax] int32 ascending, padded with
    L (past every key, so padded rows stay sorted), counts [B, HKV] int32)."""
    mask, _ = select_parts(q, k, budgets, config, scale)
    indices, counts = mask_to_indices(mask, fill=k.shape[2])
    return indices.to(torch.int32), counts.to(torch.int32)

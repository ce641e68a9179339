"""Online token selection in torch (docs/semantics.md section 3, Eqs. 5-8), vectorised over batch, heads and
blocks: the one production copy of Eqs. 5 and 6, used by the torch backend, the flash backend where Triton cannot
run, the streaming chunked prefill of every backend that has one (chunked_prefill.py) and the torch calibration.
The oracle (tca.reference.selection) keeps its own readable copy, which the tests compare against.

No L x L tensor: the importance comes from the last query row only (one [HQ, L] softmax). Every tie rule of
the spec is reproduced with stable sorts (blocks: smaller index first; tokens: smaller position first; budget
remainders: larger retain count first; tca.backends.common.block_budgets).

Shape letters: B batch, HQ query heads, HKV key/value heads, G = HQ / HKV, L keys, D head dim,
J budgeted blocks, b block size, K retain counts (len 1 + log2 b), N selected tokens (padded to the max).
"""

from __future__ import annotations

import torch

from ...config import TCAConfig
from ...dtypes import compute_dtype
from ...geometry import num_budgeted_blocks
from ...selection import Selection
from . import compact
from .block_budgets import block_keep_from_ranks


def last_query_importance(q_last: torch.Tensor, k: torch.Tensor, scale: float, held=None) -> torch.Tensor:
    """Eq. 5: mean over each group of softmax(scale * q_last . K^T). q_last [B, HQ, D], k [B, HKV, L, D] -> [B, HKV, L].

    held: None, or [B, HKV, N] bool over the first N keys, False where a key is a hole (the streaming prefill's
    padding of its global rows): a hole takes no part in the softmax and scores 0."""
    dt = compute_dtype(q_last.dtype)
    B, HQ, D = q_last.shape
    HKV = k.shape[1]
    q = q_last.to(dt).reshape(B, HKV, HQ // HKV, D)
    logits = torch.matmul(q, k.to(dt).transpose(-1, -2)) * scale  # [B, HKV, G, L]
    if held is not None:
        logits[..., : held.shape[-1]].masked_fill_(~held[:, :, None], float("-inf"))
    # [choice: non-finite] a NaN/Inf logit is left out of the softmax (scores 0; a row with none finite
    # scores 0 everywhere), so one bad key cannot turn the whole row NaN. Same rule as the reference.
    logits = logits.masked_fill(~torch.isfinite(logits), float("-inf"))
    return logits.softmax(dim=-1).nan_to_num(nan=0.0).mean(dim=2)


def block_priority(importance: torch.Tensor, num_blocks: int, block_size: int, alpha: float, mass_scale: str):
    """Eq. 6 on the budgeted blocks: [B, HKV, L] -> [B, HKV, J]. The Herfindahl index is evaluated on the scores
    divided by the block's largest (the same quantity, and it cannot underflow), as the reference does."""
    B, H, _ = importance.shape
    blocks = importance[..., : num_blocks * block_size].reshape(B, H, num_blocks, block_size)
    mass = blocks.sum(-1)
    peak = blocks.amax(-1, keepdim=True)
    scaled = blocks / torch.where(peak > 0, peak, 1)
    herfindahl = torch.where(mass > 0, (scaled**2).sum(-1) / scaled.sum(-1) ** 2, 1)
    m = mass * num_blocks if mass_scale == "mean" else mass
    return (1 - alpha) * m + alpha * (1 - herfindahl)


def block_ranks(priority: torch.Tensor) -> torch.Tensor:
    """[B, HKV, J] -> rank of each block by priority descending (0 = highest), ties to the smaller block index."""
    order = priority.sort(dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def block_budgets(priority: torch.Tensor, budgets: torch.Tensor, block_size: int) -> torch.Tensor:
    """Eq. 7: t_j = Psi[r_j]. priority [B, HKV, J], budgets [HKV, K] -> int64 [B, HKV, J]."""
    return block_keep_from_ranks(block_ranks(priority), budgets.to(priority.device))


def select_mask(importance: torch.Tensor, per_block: torch.Tensor, block_size: int) -> torch.Tensor:
    """Eq. 8: the t_j positions of largest importance per block, ties to the smaller position. -> [B, HKV, J*b] bool."""
    B, H, J = per_block.shape
    blocks = importance[..., : J * block_size].reshape(B, H, J, block_size)
    order = blocks.sort(dim=-1, descending=True, stable=True).indices
    place = torch.empty_like(order)
    place.scatter_(-1, order, torch.arange(block_size, device=order.device).expand_as(order))
    return (place < per_block[..., None]).reshape(B, H, J * block_size)


def choose_leaving(importance, num_blocks: int, budgets, config: TCAConfig):
    """Eqs. 6-8 on the J_c leaving blocks: importance [B, HKV, J_c*b] -> kept [B, HKV, J_c*b] bool."""
    b = config.block_size
    priority = block_priority(importance, num_blocks, b, config.alpha, config.mass_scale)
    return select_mask(importance, block_budgets(priority, budgets, b), b)


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
    """The selection in the compact form of tca.backends.common.compact: (indices [B, HKV, N] int32 ascending,
    padded with L; counts [B, HKV] int32)."""
    mask, _ = select_parts(q, k, budgets, config, scale)
    return compact.from_mask(mask, k.shape[2])

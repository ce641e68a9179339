"""Eq. 7 for the backends (docs/semantics.md section 3.3), vectorised, no host synchronisation.

Budgets arrive normalised (tca.validation divides each configuration by its sum), so the floors leave between
0 and len(K) units and plain largest remainder places them: no cycling, no deficit.

Shape letters: B batch, HKV key/value heads, J budgeted blocks, K retain counts (len 1 + log2 b).
"""

from __future__ import annotations

import torch

from ...budgets import block_keep_count
from ...devices import host_copy
from ...geometry import num_budgeted_blocks


def budget_counts(budgets: torch.Tensor, num_blocks) -> torch.Tensor:
    """n_k = floor(p[k] J) plus one unit for each of the J - sum floor largest fractional parts (ties to the
    larger k). budgets [..., K] float64 summing to 1  ->  int64 [..., K], each row summing to J. num_blocks: an
    int, or a float64 tensor broadcasting against budgets[..., :1] (one J per row)."""
    exact = budgets.to(torch.float64) * num_blocks
    counts = exact.floor()
    fraction = exact - counts
    K = budgets.shape[-1]
    # Rank of each k by fraction descending, ties to the larger k: sort larger-k-first, then stably.
    by_k_desc = torch.arange(K - 1, -1, -1, device=budgets.device)
    order = by_k_desc[fraction[..., by_k_desc].sort(dim=-1, descending=True, stable=True).indices]
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(K, device=budgets.device).expand_as(order))
    remaining = num_blocks - counts.sum(-1, keepdim=True)  # in [0, K] for normalised budgets
    return (counts + (rank < remaining)).long()


def block_keep_from_ranks(ranks: torch.Tensor, budgets: torch.Tensor, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """t_j = Psi[r_j] (Psi: each retain count k written n_k times, largest first), without building Psi.

    ranks [B, HKV, J] (0 = highest priority), budgets [HKV, K] -> int64 [B, HKV, J]. Psi[r] is the k of the
    first group (largest k first) whose cumulative count exceeds r: a searchsorted.
    blocks: None, or [B] integers J_b <= J on the device (a left-padded batch): sequence b has J_b blocks (its
    ranks of blocks j < J_b lie below J_b), its counts n_k are those of J_b, and blocks j >= J_b keep 0.
    """
    B, H, J = ranks.shape
    num_blocks = J if blocks is None else blocks.to(torch.float64).view(B, 1, 1)
    counts = budget_counts(budgets, num_blocks).to(ranks.device)  # [HKV, K], or [B, HKV, K] per sequence
    K = counts.shape[-1]
    k_desc = 2 ** torch.arange(K - 1, -1, -1, device=ranks.device)
    ends = counts.flip(-1).cumsum(-1)  # cumulative counts with the largest k first
    group = torch.searchsorted(ends.expand(B, H, K).contiguous(), ranks.contiguous(), right=True)
    keep = k_desc[group.clamp_max(K - 1)]
    if blocks is None:
        return keep
    return torch.where(torch.arange(J, device=ranks.device) < blocks.view(B, 1, 1), keep, 0)


def selection_sizes(budgets: torch.Tensor, seq_len: int, config) -> tuple[torch.Tensor, torch.Tensor]:
    """What a prefill of seq_len tokens keeps, on the host, from the budgets alone: (selected tokens per KV head
    [HKV] int64, t per block leaving the window while decoding [HKV] int64).

    Every budgeted block keeps exactly its t_j tokens whatever the data (docs/semantics.md sections 3.3 and 8),
    so the counts follow from Eq. 7: sum over k of n_k k. Reading the budgets' host copy (tca.devices) instead
    of the selection's counts on the device spares the prefill a host synchronisation per layer."""
    host = host_copy(budgets).to(torch.float64)
    J = num_budgeted_blocks(seq_len, config.block_size, config.window)
    retain = 2 ** torch.arange(host.shape[-1], dtype=torch.int64)
    return (budget_counts(host, J) * retain).sum(-1), block_keep_count(host)

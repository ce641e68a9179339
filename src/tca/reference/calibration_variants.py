"""Calibration rules beyond the paper (docs/semantics.md section 6.1), readable and exact.

- "retrieval": a head's retained mass is also measured where a needle is retrieved: on the answer rows of
  retrieval probes, against what the cache keeps after the prompt; a_m = min(paper mass, retrieval mass).
- "fallback": the paper's choice, then the heads that lose most on the retrieval rows at their chosen
  budgets (below tau, at most a fraction of all heads) become dense.

Both change only the plan (budgets [HKV, len(K)] per layer); selection and attention are unchanged.

Legend: b batch, h key/value head, g query head within its group, r answer row, l key, m candidate.
"""

from __future__ import annotations

import math

import torch

from ..budgets import dense_budgets, expected_cost
from ..config import TCAConfig
from ..geometry import num_budgeted_blocks
from ..plan import HeadBudget
from ..selection import Selection
from .attention import kept_key_mask
from .calibration import choose_budgets, dense_rows
from .selection import block_budgets, block_priority, last_query_importance, select_tokens

CALIBRATION_RULES = ("paper", "retrieval", "fallback")
DEFAULT_FALLBACK_FRACTION = 0.25


def cache_view(selection: Selection, answer_start: int, seq_len: int) -> torch.Tensor:
    """Keys an answer row sees after a prefill of `answer_start` tokens: S(P-1) of the prompt (its global
    selection and its window), plus every token from P on. -> [B, HKV, seq_len] bool.

    [choice: the cache right after the prefill; the answer rows are few, so the blocks that leave the
    window while they are decoded (section 5) are not modelled]
    """
    P = answer_start
    prompt = kept_key_mask(selection, torch.tensor([P - 1]))[:, :, 0]  # [B, HKV, P]
    after = torch.ones(*prompt.shape[:2], seq_len - P, dtype=torch.bool)
    return torch.cat([prompt, after.to(prompt.device)], dim=-1)


def retrieval_mass(q, k, candidates: torch.Tensor, config: TCAConfig, scale: float, answer_start: int) -> torch.Tensor:
    """a_m^ret per KV head on one retrieval probe: the mean over the group's query heads and the answer rows
    P .. L-1 of the dense attention mass inside `cache_view` of the prompt's selection (made from row P-1
    over the first P keys, as the prefill makes it).

    q: [B, HQ, L, D], k: [B, HKV, L, D], candidates: [M, len(K)], 0 < w < P < L  ->  [M, HKV] float64.
    """
    L, HKV, b, w = k.shape[2], k.shape[1], config.block_size, config.window
    P = answer_start
    if not 0 < P < L:
        raise ValueError(f"answer_start must be inside the sequence (0 < P < L = {L}), got {P}")
    rows = torch.arange(P, L, device=q.device)
    attn = dense_rows(q, k, rows, scale)  # [B, HKV, G, R, L]
    J = num_budgeted_blocks(P, b, w)
    importance = last_query_importance(q[:, :, P - 1], k[:, :, :P], scale)
    priority = block_priority(importance, J, b, config.alpha, config.mass_scale)
    masses = []
    for p in candidates:
        per_block = block_budgets(priority, p.expand(HKV, -1), b)
        selection = Selection(select_tokens(importance, per_block, b), per_block, b, w, P)
        seen = cache_view(selection, P, L).to(q.device)  # [B, HKV, L]
        rho = (attn * seen[:, :, None, None]).sum(-1)  # [B, HKV, G, R]
        masses.append(rho.to(torch.float64).mean(dim=(0, 2, 3)))
    return torch.stack(masses)


def choose_retrieval(masses: torch.Tensor, retrieval: torch.Tensor, candidates: torch.Tensor, tau: float, block_size: int):
    """Rule "retrieval": per KV head the cheapest candidate with min(a_m, a_m^ret) >= tau, else dense.

    masses, retrieval: [M, HKV]. [choice: the minimum: a head keeps tau of its attention both on the
    paper's evaluated rows and where an answer is retrieved]
    """
    return choose_budgets(torch.minimum(masses, retrieval), candidates, tau, block_size)


def dense_fallback(layers: list[list[HeadBudget]], retrieval: list[torch.Tensor], tau: float, block_size: int,
                   max_fraction: float = DEFAULT_FALLBACK_FRACTION) -> list[list[HeadBudget]]:
    """Rule "fallback": heads whose retrieval mass at their chosen candidate is below tau become dense, the
    worst first, at most floor(max_fraction x heads) of them over the whole model.

    layers: the paper's choice per layer and KV head; retrieval: per layer a_m^ret [M, HKV].
    [choice: rank by the retrieval mass at the chosen budget; a head already dense stays dense]
    """
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
    losers = []
    for i, (heads, masses) in enumerate(zip(layers, retrieval, strict=True)):
        for h, head in enumerate(heads):
            if head.candidate is not None:
                kept = float(masses[head.candidate, h])
                if kept < tau:
                    losers.append((kept, i, h))
    total = sum(len(heads) for heads in layers)
    chosen = sorted(losers)[: math.floor(max_fraction * total)]
    dense = HeadBudget(dense_budgets(block_size).tolist(), 1.0, float(block_size), None)
    out = [list(heads) for heads in layers]
    for _, i, h in chosen:
        out[i][h] = dense
    return out


def mean_cost_fraction(layers: list[list[HeadBudget]], block_size: int) -> float:
    """Mean E[p] / b over all heads of a plan's layers (the budgeted share a plan keeps)."""
    costs = [float(expected_cost(torch.tensor(h.budgets, dtype=torch.float64))) for heads in layers for h in heads]
    return sum(costs) / len(costs) / block_size

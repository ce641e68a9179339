"""Plan-level steps of the calibration rules beyond the paper (docs/semantics.md section 6.1): given the
retained masses, which candidate each head takes. No attention is computed here; the masses come from the
reference (tca.reference.calibration_variants) or a backend.
"""

from __future__ import annotations

import math

import torch

from .budgets import dense_budgets, expected_cost
from .plan import HeadBudget, choose_budgets

CALIBRATION_RULES = ("paper", "retrieval", "fallback")
DEFAULT_FALLBACK_FRACTION = 0.25


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

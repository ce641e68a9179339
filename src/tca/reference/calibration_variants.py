"""Calibration rules beyond the paper (docs/semantics.md section 6.1), readable and exact.

- "retrieval": a head's retained mass is also measured where a needle is retrieved: on the answer rows of
  retrieval probes, against what the cache keeps after the prompt; a_m = min(paper mass, retrieval mass).
- "fallback": the paper's choice, then the heads that lose most on the retrieval rows at their chosen
  budgets (below tau, at most a fraction of all heads) become dense.

Both change only the plan (budgets [HKV, len(K)] per layer); selection and attention are unchanged.

Legend: b batch, h key/value head, g query head within its group, r answer row, l key, m candidate.
"""

from __future__ import annotations

import torch

# The plan-level steps of the rules (no attention involved) live in tca.calibration_rules, shared with the
# production calibration; re-exported here so the oracle reads as one section.
from ..calibration_rules import (  # noqa: E402,F401
    CALIBRATION_RULES,
    DEFAULT_FALLBACK_FRACTION,
    choose_retrieval,
    dense_fallback,
    mean_cost_fraction,
)
from ..config import TCAConfig
from ..geometry import num_budgeted_blocks
from ..selection import Selection
from .attention import kept_key_mask
from .calibration import dense_rows
from .selection import block_budgets, block_priority, last_query_importance, select_tokens


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

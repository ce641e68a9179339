"""Offline calibration of per-KV-head budgets (docs/semantics.md section 6), readable and exact.

For each layer and KV head, simulate the online selection with every log-Gaussian candidate and keep the
cheapest one whose retained attention mass reaches tau (else the dense configuration).

Legend: b batch, h key/value head, g query head within its group, r evaluated query row, l key, d head dim,
m candidate.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from einops import einsum, rearrange

from ..budgets import calibration_candidates
from ..config import TCAConfig
from ..dtypes import compute_dtype
from ..geometry import DEFAULT_CALIBRATION_ROWS, evaluated_rows, num_budgeted_blocks
from ..plan import BudgetPlan, choose_budgets
from ..selection import Selection
from ..validation import to_bhsd
from .attention import kept_key_mask
from .selection import block_budgets, block_priority, last_query_importance, select_tokens

DEFAULT_ROWS = DEFAULT_CALIBRATION_ROWS
__all__ = ["DEFAULT_ROWS", "calibrate", "choose_budgets", "dense_rows", "evaluated_rows", "retained_mass"]


def dense_rows(q, k, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """A_h[i, :] for the evaluated rows: dense causal softmax. -> [B, HKV, G, R, L]."""
    dt = compute_dtype(q.dtype)
    HKV = k.shape[1]
    qr = rearrange(q[:, :, rows].to(dt), "b (h g) r d -> b h g r d", h=HKV)
    logits = einsum(qr, k.to(dt), "b h g r d, b h l d -> b h g r l") * scale
    causal = torch.arange(k.shape[2], device=q.device) <= rows.to(q.device)[:, None]
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def retained_mass(q, k, candidates: torch.Tensor, config: TCAConfig, scale: float, num_rows: int = DEFAULT_ROWS):
    """a_m per KV head: the mean over the group's query heads, the evaluated rows (and the batch, one
    calibration sequence per batch element) of the dense attention mass kept in S(i).

    q: [B, HQ, L, D], k: [B, HKV, L, D], candidates: [M, len(K)]  ->  [M, HKV] float64.
    [choice: per-row retained mass, the quantity the error bound uses]
    """
    L, HKV, b, w = k.shape[2], k.shape[1], config.block_size, config.window
    J = num_budgeted_blocks(L, b, w)
    rows = evaluated_rows(L, w, num_rows).to(q.device)
    attn = dense_rows(q, k, rows, scale)  # [B, HKV, G, R, L]
    # Importance and priority do not depend on the candidate: compute them once.
    importance = last_query_importance(q[:, :, -1], k, scale)  # [B, HKV, L]
    priority = block_priority(importance, J, b, config.alpha, config.mass_scale)
    masses = []
    for p in candidates:
        per_block = block_budgets(priority, p.expand(HKV, -1), b)
        selection = Selection(select_tokens(importance, per_block, b), per_block, b, w, L)
        kept = kept_key_mask(selection, rows)  # [B, HKV, R, L]
        rho = (attn * kept[:, :, None]).sum(-1)  # [B, HKV, G, R]: the dense mass each row keeps
        masses.append(rho.to(torch.float64).mean(dim=(0, 2, 3)))
    return torch.stack(masses)


def calibrate(
    layers: Iterable[tuple[torch.Tensor, ...]],
    config: TCAConfig | None = None,
    scale: float | None = None,
    num_rows: int = DEFAULT_ROWS,
    metadata: dict | None = None,
) -> BudgetPlan:
    """Section 6 on given attention inputs: one (q, k[, v]) per layer, each q [B, HQ, L, D], k [B, HKV, L, D]
    in the "bhsd" layout, L > window. Several sequences go in the batch dimension (a_m is averaged).
    """
    config = config or TCAConfig()
    candidates = calibration_candidates(config.block_size, config.num_candidates, config.sigma)
    plan_layers = []
    for index, inputs in enumerate(layers):
        q, k = _layer_inputs(index, inputs)
        if k.shape[2] <= config.window:
            raise ValueError(
                f"layer {index}: calibration needs a sequence longer than the window ({config.window}), "
                f"got L={k.shape[2]}; use a longer text or a smaller window"
            )
        s = scale if scale is not None else q.shape[-1] ** -0.5
        masses = retained_mass(q, k, candidates.to(q.device), config, s, num_rows)
        plan_layers.append(choose_budgets(masses.cpu(), candidates, config.tau, config.block_size))
    if not plan_layers:
        raise ValueError("calibration got no layers: pass one (q, k) pair per layer, each q [B, HQ, L, D], k [B, HKV, L, D]")
    return BudgetPlan(config=config, layers=plan_layers, metadata=dict(metadata or {}))


def _layer_inputs(index: int, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) of one layer, checked: a (q, k[, v]) tuple of dense float "bhsd" tensors, q and k of equal length."""
    if not isinstance(inputs, tuple | list) or len(inputs) < 2:
        raise TypeError(f"layer {index}: calibration takes a (q, k) or (q, k, v) tuple per layer, got {type(inputs).__name__}")
    q, k = inputs[0], inputs[1]
    q, k, _ = to_bhsd(q, k, k, "bhsd")  # types, 4 dims, dtype, device, batch, heads, empty sizes (an empty batch)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"layer {index}: calibration needs the queries of every position, got {q.shape[2]} queries for {k.shape[2]} keys"
        )
    return q, k

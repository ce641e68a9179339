"""What TCA's compressed cache holds after a prefill (docs/semantics.md section 5), as kvpress holds it.

After a prefill of L keys, KV head g keeps Sel_g (sections 3.1-3.4, from the last query) and the last query's
window [J b, L). Heads keep different counts, but a transformers cache holds one length for every head: the
kept rows are gathered into N = the largest count, and each head's spare slots are listed so that kvpress's
attention patch masks them (`module.masked_key_indices`, as AdaKV does), never attending to them.

Shape letters: B batch, HQ query heads, HKV key/value heads, L keys, D head dim, K retain counts,
N kept positions (padded to the largest count).
"""

from __future__ import annotations

import torch

from ..backends import routing
from ..backends.common import compact
from ..config import TCAConfig
from ..geometry import num_budgeted_blocks


def post_prefill_positions(q_last, k, budgets: torch.Tensor, config: TCAConfig, scale: float, backend: str = "auto"):
    """The positions section 5's cache holds after a prefill: Sel_g, then the window [J b, L).

    q_last [B, HQ, 1, D]: the prompt's last query (position embedding applied); k [B, HKV, L, D]; budgets
    [HKV, K] float64, already checked (tca.validation.check_budgets). The selection is the production one of
    `backend` (routed as tca.attention routes a selection).
    Returns (positions [B, HKV, N] int64, ascending, padded with L; counts [B, HKV] int64).
    """
    B, H, L = k.shape[:3]
    first_local = num_budgeted_blocks(L, config.block_size, config.window) * config.block_size
    window = torch.arange(first_local, L, device=k.device).expand(B, H, L - first_local)
    if first_local == 0:  # L <= w: nothing is budgeted, the window is the whole prompt
        return window.contiguous(), torch.full((B, H), L, dtype=torch.int64, device=k.device)
    impl = routing.resolve(backend, k.device, k.dtype, k.shape[-1], phase="selection").load()
    if hasattr(impl, "select_indices"):
        indices, counts = impl.select_indices(q_last, k, budgets, config, scale)
    else:
        indices, counts = compact.from_selection(impl.select(q_last, k, budgets, config, scale))
    selected = compact.trim(indices, counts).long()
    # The selection's padding (L) lies past every window position: one sort puts it last, after the window.
    positions = torch.cat([selected, window], dim=-1).sort(dim=-1).values
    return positions, counts.long() + (L - first_local)


def gather_kept(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor):
    """keys, values [B, HKV, L, D] cut to the kept rows [B, HKV, N, D], and the spare slots to mask.

    Returns (keys, values, masked): masked is kvpress's `masked_key_indices` form, a tuple (batch, head, slot)
    of 1D index tensors naming every slot past a head's count, or None when every head keeps N rows.
    A spare slot holds a copy of the last key (any real row would do: it is never attended to).
    """
    L, D = keys.shape[2], keys.shape[3]
    index = positions.clamp(max=L - 1)[..., None].expand(-1, -1, -1, D)
    kept_keys, kept_values = keys.gather(2, index).contiguous(), values.gather(2, index).contiguous()
    spare = torch.arange(positions.shape[-1], device=counts.device) >= counts[..., None]
    masked = spare.nonzero(as_tuple=True) if bool(spare.any()) else None
    return kept_keys, kept_values, masked

"""The oracle: TCA-Attention in plain PyTorch + einops, readable, exact and differentiable.

Every backend computes the function defined here (docs/semantics.md); tests judge them against it.
This package imports nothing from `tca.backends`.
"""

from .attention import attend, dense_causal_attention, kept_key_mask
from .cache import ReferenceKVCache, cache_from_selection, decode, prefill
from .calibration import calibrate, evaluated_rows, retained_mass
from .calibration_variants import retrieval_mass
from .chunked_prefill import DensePrefillState, empty_cache, exact_chunk, exact_finish, streaming_chunk
from .padded import prefill_padded
from .reselect import ReselectingReferenceCache, decode_and_reselect
from .selection import (
    block_budgets,
    block_priority,
    block_ranks,
    budget_counts,
    last_query_importance,
    psi,
    select,
    select_tokens,
)


def attention(q, k, v, budgets, config, scale, return_lse=False):
    """Stateless TCA attention (section 4) on validated "bhsd" inputs: select from the last row, attend."""
    return attend(q, k, v, select(q, k, budgets, config, scale), scale, return_lse)


def decode_any(q, k, v, cache):
    """One decode step on either of the oracle's caches: section 5 (ReferenceKVCache), or section 5c
    (ReselectingReferenceCache: decode_and_reselect)."""
    if isinstance(cache, ReselectingReferenceCache):
        return decode_and_reselect(q, k, v, cache)
    return decode(q, k, v, cache)


class ReferenceBackend:
    """The oracle as a backend implementation (declared in tca.backends.reference, loaded on first use)."""

    attention = staticmethod(attention)
    select = staticmethod(select)
    attend = staticmethod(attend)
    prefill = staticmethod(prefill)
    decode = staticmethod(decode_any)
    retained_mass = staticmethod(retained_mass)
    retrieval_mass = staticmethod(retrieval_mass)  # the "retrieval" calibration rule (section 6.1)
    # Chunked prefill (section 5b): exact chunks over a dense state, streaming chunks over the cache.
    exact_chunk = staticmethod(exact_chunk)
    exact_finish = staticmethod(exact_finish)
    empty_cache = staticmethod(empty_cache)
    streaming_chunk = staticmethod(streaming_chunk)


__all__ = [
    "DensePrefillState",
    "ReferenceBackend",
    "ReferenceKVCache",
    "ReselectingReferenceCache",
    "attend",
    "attention",
    "block_budgets",
    "block_priority",
    "block_ranks",
    "budget_counts",
    "cache_from_selection",
    "calibrate",
    "prefill_padded",
    "decode",
    "dense_causal_attention",
    "empty_cache",
    "evaluated_rows",
    "exact_chunk",
    "exact_finish",
    "kept_key_mask",
    "last_query_importance",
    "prefill",
    "psi",
    "retained_mass",
    "select",
    "select_tokens",
    "streaming_chunk",
]

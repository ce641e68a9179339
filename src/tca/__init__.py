"""tca: TCA-Attention (training-free context-adaptive sparse attention) for long-context inference.

    import tca
    out = tca.attention(q, k, v)                  # stateless, [B, H, L, D]
    out, cache = tca.prefill(q, k, v)             # + the compressed KV cache
    out = tca.decode(q1, k1, v1, cache)           # one token at a time
    state = tca.start_prefill(mode="streaming")   # a long prompt, chunk by chunk:
    out = tca.prefill_chunk(q, k, v, state)       #   once per chunk, in order
    cache = tca.finish_prefill(state)             #   then decode

Optional packages (triton, flash_attn, transformers) are imported only when used.
"""

from .api import (
    attention,
    available_backends,
    decode,
    finish_prefill,
    prefill,
    prefill_chunk,
    prefill_in_chunks,
    start_prefill,
)
from .backends.registry import BackendChoiceWarning, BackendUnavailableError
from .budgets import default_budgets, dense_budgets, log_gaussian_budgets
from .config import TCAConfig
from .plan import BudgetPlan
from .policy import Reselect
from .prefill_state import ChunkedPrefill
from .selection import Selection

__version__ = "0.1.0"


def __getattr__(name: str):
    # `import tca` leaves the oracle unloaded (no production path needs it); `tca.reference` still works after a
    # plain `import tca`, loaded on first use.
    if name == "reference":
        from importlib import import_module

        return import_module(".reference", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "BackendChoiceWarning",
    "BackendUnavailableError",
    "BudgetPlan",
    "Reselect",
    "ChunkedPrefill",
    "Selection",
    "TCAConfig",
    "attention",
    "available_backends",
    "decode",
    "default_budgets",
    "dense_budgets",
    "finish_prefill",
    "log_gaussian_budgets",
    "prefill",
    "prefill_chunk",
    "prefill_in_chunks",
    "start_prefill",
]

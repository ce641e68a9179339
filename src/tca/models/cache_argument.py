"""Which keyword transformers takes a Cache under (`model(...)`, `model.generate(...)`)."""

from __future__ import annotations

import inspect


def cache_argument(model) -> str:
    """The keyword under which `model.forward` / `model.generate` take a Cache.

    transformers >= 5.2x renamed `past_key_values` to `cache` (the old name still works with a warning);
    earlier 5.x releases only know `past_key_values`.
    """
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """`{name: cache}` for `model(...)` or `model.generate(...)`, under the name this transformers uses."""
    return {cache_argument(model): cache}

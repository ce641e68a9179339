"""Lazy access to transformers, with one clear error (and the install command) when it is missing."""

from __future__ import annotations

import importlib
import importlib.util
import inspect

INSTALL_HINT = 'pip install "tca[hf]"  (transformers >= 5, accelerate, gguf, tqdm)'


def require(module: str = "transformers"):
    """Import `module` (default transformers) or raise ImportError saying how to install it."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise ImportError(f"tca.models needs the package '{module.split('.')[0]}': {INSTALL_HINT}")
    return importlib.import_module(module)


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

"""Lazy import of transformers (and its companions), with one clear error and the install command when missing."""

from __future__ import annotations

import importlib
import importlib.util

INSTALL_HINT = 'pip install "tca[hf]"  (transformers >= 5, accelerate, gguf, tqdm)'


def require(module: str = "transformers"):
    """Import `module` (default transformers) or raise ImportError saying how to install it."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise ImportError(f"tca.models needs the package '{module.split('.')[0]}': {INSTALL_HINT}")
    return importlib.import_module(module)

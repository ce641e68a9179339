"""TCA as a transformers attention implementation: registered under "tca" and "tca_reference".

Plugged in by registration (transformers' AttentionInterface and AttentionMaskInterface), never by editing
`modeling_*` files or patching model classes. The attention function receives the module (which knows its
`layer_idx`) and q [B, HQ, LQ, D], k, v [B, HKV, L, D] after the model's cache update:

- keys tagged by a TCACache layer (see cache.py): that layer's compressed state is prefilled or decoded
  (semantics.md section 5), so the KV memory really shrinks;
- untagged keys (no cache, or a dense DynamicCache): stateless TCA attention over them (section 4), queries
  aligned to the end of the keys, with a fresh selection from the last query.

Per-layer settings (TCAConfig, budgets [HKV, len(K)] of the layer, backend) live on the attention module
instance as `_tca_settings` (set by enable_tca); without them the defaults apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budgets import default_budgets
from ..config import TCAConfig

IMPLEMENTATIONS = {"tca": None, "tca_reference": "reference"}  # name -> forced backend (None: the settings')
SETTINGS_ATTRIBUTE = "_tca_settings"
CACHE_TAG = "_tca_cache_layer"


@dataclass
class LayerSettings:
    """What one attention layer needs: config, budgets [HKV, len(K)] float64, backend name or "auto"."""

    config: TCAConfig
    budgets: torch.Tensor
    backend: str = "auto"


def layer_settings(module) -> LayerSettings:
    """The module's settings, or defaults (TCAConfig(), default budgets) when enable_tca was not called."""
    settings = getattr(module, SETTINGS_ATTRIBUTE, None)
    if settings is None:
        config = TCAConfig()
        kv_heads = getattr(module.config, "num_key_value_heads", None) or module.config.num_attention_heads
        budgets = default_budgets(config.block_size).expand(kv_heads, -1).clone()
        settings = LayerSettings(config, budgets)
        module.__dict__[SETTINGS_ATTRIBUTE] = settings
    return settings


def _check_call(attention_mask, dropout: float, kwargs: dict) -> None:
    if attention_mask is not None:
        raise ValueError(
            "TCA attention is causal by construction and takes no attention mask, but got a "
            f"{tuple(attention_mask.shape)} mask (a custom 4D mask, or a model that builds its own); "
            "run without a custom mask"
        )
    if kwargs.get("sliding_window") is not None:
        raise ValueError(
            f"TCA replaces full causal attention, but this layer uses a sliding window ({kwargs['sliding_window']}); "
            "set config.sliding_window = None if the model was trained with full attention"
        )
    if dropout:
        raise ValueError(f"TCA attention is for inference: attention dropout must be 0, got {dropout}; call model.eval()")


def _forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, backend=None, **kwargs):
    """q [B, HQ, LQ, D], k, v [B, HKV, L, D] -> (out [B, LQ, HQ, D], None), as transformers expects."""
    import tca

    _check_call(attention_mask, dropout, kwargs)
    settings = layer_settings(module)
    backend = backend or settings.backend
    layer = getattr(key, CACHE_TAG, None)
    if layer is not None:
        out = layer.attend(query, key, value, settings, scaling, backend)
    else:
        out = tca.attention(
            query, key, value, budgets=settings.budgets, config=settings.config, scale=scaling, backend=backend
        )
    return out.transpose(1, 2).contiguous(), None


def tca_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The "tca" implementation: the backend of the layer's settings (enable_tca's `backend`, "auto" default)."""
    return _forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def tca_reference_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The "tca_reference" twin: the same settings on the reference backend, for one-line A/B checks."""
    return _forward(module, query, key, value, attention_mask, scaling, dropout, backend="reference", **kwargs)


def tca_mask(*args, attention_mask=None, mask_function=None, **kwargs):
    """Mask interface for the TCA implementations: no mask is built (TCA's causal structure is implicit).

    Padded batches (a 2D attention_mask with zeros) and non-causal mask functions (sliding windows, packed
    sequences, bidirectional blocks) raise a clear error instead of being silently ignored.
    """
    from transformers.masking_utils import causal_mask_function

    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError(
            "TCA attention does not support padded batches (the attention_mask has zeros): its selection and "
            "compressed cache assume every sequence of the batch has the same length. Run sequences of equal "
            "length together, or one at a time"
        )
    if mask_function is not None and mask_function is not causal_mask_function:
        name = getattr(mask_function, "__name__", type(mask_function).__name__)
        raise ValueError(
            f"TCA attention supports plain causal masks only, got the mask function {name!r} (sliding window, "
            "packed sequences or a custom overlay)"
        )
    return None


def register(name: str, function) -> None:
    """Register `function` under `name` in transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, tca_mask)


_REGISTERED = False


def register_all() -> None:
    """Make "tca" and "tca_reference" known to transformers (safe to call many times)."""
    global _REGISTERED
    if not _REGISTERED:
        register("tca", tca_attention_forward)
        register("tca_reference", tca_reference_attention_forward)
        _REGISTERED = True

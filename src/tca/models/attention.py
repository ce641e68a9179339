"""TCA as a transformers attention implementation: registered under "tca" and "tca_reference".

Plugged in by registration (transformers' AttentionInterface and AttentionMaskInterface), never by editing
`modeling_*` files or patching model classes. The attention function receives the module (which knows its
`layer_idx`) and q [B, HQ, LQ, D], k, v [B, HKV, L, D] after the model's cache update:

- keys handed over by a TCACache layer (see cache.py and `handoff` below): that layer's compressed state is
  prefilled or decoded (semantics.md section 5), so the KV memory really shrinks;
- other keys (no cache, or a dense DynamicCache): stateless TCA attention over them (section 4), queries
  aligned to the end of the keys, with a fresh selection from the last query.

Left-padded batches: the mask function hands the 2D padding mask to the attention function, which runs each
sequence on its own tokens (prefill), and the compressed cache keeps each sequence's own length (decode).

Per-layer settings (TCAConfig, budgets [HKV, len(K)] of the layer, backend) live on the attention module
instance as `_tca_settings` (set by enable_tca); without them the defaults apply.

Hybrid models: the settings of a sliding-window layer name the model's own implementation ("sdpa" or
"eager"), and the attention function hands that layer to it unchanged; the mask function builds the
sliding-window mask those layers need (transformers' sdpa_mask, materialised; eager gets it as 0 / -inf).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

import torch

from ..budgets import default_budgets
from ..config import TCAConfig

IMPLEMENTATIONS = {"tca": None, "tca_reference": "reference"}  # name -> forced backend (None: the settings')
SETTINGS_ATTRIBUTE = "_tca_settings"
NATIVE_IMPLEMENTATIONS = ("sdpa", "eager")  # what sliding-window layers of a hybrid model may keep


class _Handoff(threading.local):
    """The TCACache layer whose `update` just returned these keys, waiting for the attention call.

    transformers calls `cache.update(k, v, layer_idx)` right before the attention function of the same layer
    and passes it the returned keys; the attention function claims the layer by the identity of those keys.
    """

    layer = None
    keys = None

    def offer(self, layer, keys: torch.Tensor) -> None:
        self.layer, self.keys = layer, keys

    def take(self, keys: torch.Tensor):
        layer, mine = self.layer, self.keys is keys
        self.layer = self.keys = None
        return layer if mine else None


handoff = _Handoff()


@dataclass
class LayerSettings:
    """What one attention layer needs: config, budgets [HKV, len(K)] float64, backend name or "auto".

    native: None for a TCA layer; for a sliding-window layer of a hybrid model, the model's own implementation
    ("sdpa" or "eager") that keeps running it (config and budgets are then unused)."""

    config: TCAConfig
    budgets: torch.Tensor
    backend: str = "auto"
    native: str | None = None


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
    if attention_mask is not None and not (attention_mask.dim() == 2 and attention_mask.dtype == torch.bool):
        raise ValueError(
            "TCA attention is causal by construction and takes no attention mask, but got a "
            f"{tuple(attention_mask.shape)} mask (a custom 4D mask, a non-causal mask function such as packed "
            "sequences or an overlay, or a model that builds its own); run without a custom mask"
        )
    for name, what in (("softcap", "attention logit softcapping"), ("s_aux", "attention sinks")):
        if kwargs.get(name) is not None:
            raise ValueError(f"TCA does not implement {what} ({name}={kwargs[name]!r}), which this layer uses")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(
            f"TCA replaces full causal attention, but this layer uses a sliding window ({kwargs['sliding_window']}); "
            "set config.sliding_window = None if the model was trained with full attention"
        )
    if dropout:
        raise ValueError(f"TCA attention is for inference: attention dropout must be 0, got {dropout}; call model.eval()")


class _LastPadding(threading.local):
    """The last mask read by left_padding and its answer: every layer of a forward call gets the same mask
    tensor, which is then read from the device once per call instead of once per layer."""

    mask = None
    length = None
    pads = None


_last_padding = _LastPadding()


def left_padding(attention_mask: torch.Tensor | None, length: int) -> list[int] | None:
    """Pad tokens at the start of each sequence, from a 2D padding mask [B, >= length] (None: no padding).

    Reads the mask on the host, once per mask tensor (a prefill happens once per generation). Only left padding
    is supported: a sequence's real tokens must be contiguous and end at the last position."""
    if attention_mask is None:
        return None
    memo = _last_padding
    if memo.mask is attention_mask and memo.length == length:
        return memo.pads
    pads = _read_left_padding(attention_mask, length)
    memo.mask, memo.length, memo.pads = attention_mask, length, pads
    return pads


def _read_left_padding(attention_mask: torch.Tensor, length: int) -> list[int] | None:
    mask = attention_mask[:, -length:].cpu()
    counts = (~mask).sum(-1)
    if not bool(counts.any()):
        return None
    expected = torch.arange(length)[None, :] >= counts[:, None]
    if not torch.equal(mask, expected):
        raise ValueError(
            "TCA supports left-padded batches only (each row of the attention_mask: zeros, then ones); pad on the "
            "left, e.g. tokenizer.padding_side = 'left'"
        )
    if bool((counts == length).any()):
        raise ValueError("a sequence of the batch is all padding; remove it from the batch")
    return counts.tolist()


def _forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, backend=None, **kwargs):
    """q [B, HQ, LQ, D], k, v [B, HKV, L, D] -> (out [B, LQ, HQ, D], None), as transformers expects."""
    import tca

    settings = layer_settings(module)
    if settings.native is not None:
        return native_attention(settings.native, module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    _check_call(attention_mask, dropout, kwargs)
    backend = backend or settings.backend
    layer = handoff.take(key)
    if layer is not None:
        out = layer.attend(query, key, value, settings, scaling, backend, attention_mask)
    else:
        pads = left_padding(attention_mask, key.shape[2])
        if pads and query.shape[2] != key.shape[2]:
            raise ValueError(
                "stateless TCA over a padded batch needs the whole sequence at once; generate with a "
                "tca.models.TCACache to decode padded batches"
            )
        out = tca.attention(query, key, value, budgets=settings.budgets, config=settings.config, scale=scaling,
                            backend=backend, starts=pads)
    return out.transpose(1, 2).contiguous(), None


def native_attention(name: str, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Run a sliding-window layer of a hybrid model on the model's own implementation `name` (sdpa or eager).

    attention_mask: the materialised boolean mask [B, 1, LQ, L] from tca_mask (sdpa's format); eager takes it
    as 0 / dtype-min, exactly as transformers' eager_mask builds it. eager is the modeling file's own
    `eager_attention_forward` (the function the model itself calls for "eager")."""
    if name == "sdpa":
        from transformers import AttentionInterface

        function = AttentionInterface()["sdpa"]
    elif name == "eager":
        function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if function is None:
            raise ValueError(
                f"{type(module).__name__} has no eager_attention_forward in its modeling file; load the model with "
                "attn_implementation='sdpa' before enable_tca"
            )
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            zero = torch.zeros((), device=attention_mask.device, dtype=query.dtype)
            attention_mask = torch.where(attention_mask, zero, torch.finfo(query.dtype).min)
    else:
        raise ValueError(f"sliding-window layers keep one of {NATIVE_IMPLEMENTATIONS}, got {name!r}")
    return function(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def tca_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The "tca" implementation: the backend of the layer's settings (enable_tca's `backend`, "auto" default)."""
    return _forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def tca_reference_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The "tca_reference" twin: the same settings on the reference backend, for one-line A/B checks."""
    return _forward(module, query, key, value, attention_mask, dropout, scaling, backend="reference", **kwargs)


def tca_mask(*args, attention_mask=None, mask_function=None, q_length=None, **kwargs):
    """Mask interface for the TCA implementations: no 4D mask is built for causal masks (TCA's causal structure
    is implicit).

    A 2D padding mask with zeros is handed to the attention function as it is (bool), which runs each sequence
    on its own tokens; decode steps (one query) get None, since the compressed cache knows each sequence's
    length (and reading the mask would synchronise with the device).

    Other mask functions (the sliding-window mask of a hybrid model's sliding layers, packed sequences,
    overlays) get the full boolean mask [B, 1, LQ, L] of transformers' sdpa_mask, never skipped: the
    sliding-window layers run on the model's own attention with it, and a TCA layer handed such a mask raises
    a clear error instead of silently ignoring it.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if mask_function is not None and mask_function is not causal_mask_function:
        kwargs["allow_is_causal_skip"] = False
        if q_length is not None:  # passed on only if given: the mask arguments differ between transformers releases
            kwargs["q_length"] = q_length
        return sdpa_mask(*args, attention_mask=attention_mask, mask_function=mask_function, **kwargs)
    if attention_mask is None or attention_mask.dim() != 2 or q_length == 1:
        return None
    return attention_mask.to(torch.bool, copy=True)  # a fresh tensor per forward call: left_padding memoises on it


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

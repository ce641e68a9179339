"""What TCA needs to know about a transformers model: layers, heads, head dim, and unsupported settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
SUPPORTED_LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)


@dataclass(frozen=True)
class ModelShape:
    """The attention geometry of a decoder: L layers of HQ query / HKV key-value heads of dim D.

    native_layers: the sliding-window layers of a hybrid model, which keep the model's own attention and a
    sliding-window cache; TCA runs on the others (`tca_layers`)."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    native_layers: tuple[int, ...] = ()

    @property
    def tca_layers(self) -> tuple[int, ...]:
        """The full-attention layers, where TCA replaces the model's attention."""
        return tuple(i for i in range(self.num_layers) if i not in self.native_layers)

    def to_dict(self) -> dict:
        out = {
            "model": self.name,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }
        if self.native_layers:
            out["native_layers"] = list(self.native_layers)
        return out


def text_config(model):
    """The decoder's config (the model's own for plain causal LMs)."""
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter is not None else config


def model_shape(model) -> ModelShape:
    """Read the attention geometry from the model's config, with a clear error for what TCA cannot run."""
    cfg = text_config(model)
    if getattr(cfg, "is_encoder_decoder", False) or getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("TCA supports decoder-only causal LMs; this model is an encoder-decoder")
    missing = [n for n in ("num_hidden_layers", "num_attention_heads") if getattr(cfg, n, None) is None]
    if missing:
        raise ValueError(f"cannot read {missing} from the model config ({type(cfg).__name__}); is it a causal LM?")
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    name = getattr(cfg, "_name_or_path", "") or getattr(model.config, "_name_or_path", "") or type(model).__name__
    layer_types = getattr(cfg, "layer_types", None) or ()
    native = tuple(i for i, kind in enumerate(layer_types) if kind == SLIDING_ATTENTION)
    return ModelShape(str(name), int(cfg.num_hidden_layers), heads, kv_heads, int(head_dim), native)


def check_supported(model) -> ModelShape:
    """Raise a clear error for models whose attention TCA does not replace faithfully, and return the model's
    shape. Hybrid models (full-attention and sliding-window layers, config.layer_types) are supported: TCA runs
    on the full-attention layers, the sliding-window layers keep the model's own attention."""
    shape = model_shape(model)
    cfg = text_config(model)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        other = sorted({t for t in layer_types if t not in SUPPORTED_LAYER_TYPES})
        if other:
            raise ValueError(
                f"TCA replaces full causal attention and keeps sliding-window layers as they are; this model has "
                f"{other} layers (config.layer_types), which it cannot run. Use a model whose layers are "
                f"{' or '.join(SUPPORTED_LAYER_TYPES)}"
            )
        if len(layer_types) != shape.num_layers:
            raise ValueError(
                f"config.layer_types names {len(layer_types)} layers but the model has {shape.num_layers}"
            )
    window = getattr(cfg, "sliding_window", None)
    if window is not None and layer_types is None:
        raise ValueError(
            f"this model uses sliding-window attention in every layer (config.sliding_window={window}, no "
            "config.layer_types), so TCA has no full-attention layer to replace. If the model was trained with full "
            "attention, set model.config.sliding_window = None first"
        )
    if not shape.tca_layers:
        raise ValueError(
            "every layer of this model is sliding_attention (config.layer_types), so TCA has no full-attention layer "
            "to replace"
        )
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(
            f"this model caps its attention logits (config.attn_logit_softcapping={softcap}), which TCA does not "
            "implement; TCA would change the full-attention layers' results. Set "
            "model.config.attn_logit_softcapping = None only if the model was made to run without it"
        )
    if any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in model.modules()):
        raise ValueError(
            "this model's attention has learned sinks (an extra logit per head, e.g. gpt-oss), which TCA does not "
            "implement; its full-attention layers cannot be replaced faithfully"
        )
    if not getattr(model, "_supports_attention_backend", False) and not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, "
            "so TCA cannot be plugged in without editing its code"
        )
    return shape

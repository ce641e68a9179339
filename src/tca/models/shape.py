"""What TCA needs to know about a transformers model: layers, heads, head dim, and unsupported settings."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_LAYER_TYPES = ("full_attention",)


@dataclass(frozen=True)
class ModelShape:
    """The attention geometry of a decoder: L layers of HQ query / HKV key-value heads of dim D."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def to_dict(self) -> dict:
        return {
            "model": self.name,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }


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
    return ModelShape(str(name), int(cfg.num_hidden_layers), heads, kv_heads, int(head_dim))


def check_supported(model) -> ModelShape:
    """Raise a clear error for models whose attention TCA does not replace faithfully (sliding windows,
    hybrid or linear-attention layers), and return the model's shape."""
    shape = model_shape(model)
    cfg = text_config(model)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        other = sorted({t for t in layer_types if t not in SUPPORTED_LAYER_TYPES})
        if other:
            raise ValueError(
                f"TCA replaces full causal attention only; this model has {other} layers "
                f"(config.layer_types). Use a model whose layers are all full_attention"
            )
    window = getattr(cfg, "sliding_window", None)
    if window is not None and layer_types is None:
        raise ValueError(
            f"this model uses sliding-window attention (config.sliding_window={window}); TCA replaces full causal "
            "attention. If the model was trained with full attention, set model.config.sliding_window = None first"
        )
    if not getattr(model, "_supports_attention_backend", False) and not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, "
            "so TCA cannot be plugged in without editing its code"
        )
    return shape

"""Switch a transformers model to TCA attention and back (no edits of modeling code, no class patching)."""

from __future__ import annotations

import torch

from ..backends import registry
from ..config import TCAConfig
from . import _hf
from .attention import IMPLEMENTATIONS, NATIVE_IMPLEMENTATIONS, SETTINGS_ATTRIBUTE, LayerSettings, register_all
from .budget_plans import resolve_plan
from .shape import check_supported

PREVIOUS_ATTRIBUTE = "_tca_previous_attn_implementation"


def attention_modules(model, num_layers: int) -> list:
    """The self-attention module of each layer, in layer order: the modules with an int `layer_idx` and a
    `head_dim` (LlamaAttention, Qwen2Attention, MistralAttention, ...)."""
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int) and hasattr(module, "head_dim") and (hasattr(module, "q_proj") or hasattr(module, "qkv_proj")):
            if index in found:
                raise ValueError(f"found two attention modules for layer {index}; TCA supports one per layer")
            found[index] = module
    if sorted(found) != list(range(num_layers)):
        raise ValueError(
            f"expected one attention module per layer 0..{num_layers - 1}, found layers {sorted(found)}; "
            "this architecture is not supported"
        )
    return [found[i] for i in range(num_layers)]


def enable_tca(model, plan=None, config: TCAConfig | None = None, backend: str = "auto"):
    """Switch `model` (a transformers causal LM) to TCA attention; returns the model.

    plan: None (default budgets for every layer), a tca.BudgetPlan, or the path of a plan JSON file (from
        `python -m tca calibrate`). It must match the model (layers, KV heads, head dim) and, when `config` is
        given, its block size.
    config: a tca.TCAConfig (default: the plan's, or TCAConfig()).
    backend: "auto" (the best usable backend for the inputs) or a registered backend name; "reference" selects
        the "tca_reference" implementation, the readable twin for A/B checks.

    Hybrid models (config.layer_types with sliding_attention layers: Gemma 2/3, Qwen2 with sliding layers,
    Ministral, ...) run TCA on their full-attention layers only; the sliding-window layers keep the model's
    own implementation ("sdpa" or "eager") and mask. The plan still has one entry per layer; those of the
    sliding layers are unused.

    Generation keeps a compressed KV cache only with a `tca.models.TCACache(model)` (`**cache_kwargs(model, cache)`); with the
    default dense cache every step runs stateless TCA over all cached tokens.
    """
    _hf.require()
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string (a name or 'auto'), got {type(backend).__name__}")
    if backend != "auto":
        registry.get(backend)  # unknown names fail here, with the list of known ones
    shape = check_supported(model)
    plan = resolve_plan(plan, shape, config)
    register_all()
    modules = attention_modules(model, shape.num_layers)
    native = native_implementation(model) if shape.native_layers else None
    for index, module in enumerate(modules):
        settings = LayerSettings(plan.config, plan.budgets(index), backend, native if index in shape.native_layers else None)
        setattr(module, SETTINGS_ATTRIBUTE, settings)
    implementation = "tca_reference" if backend == "reference" else "tca"
    current = model.config._attn_implementation
    if current not in IMPLEMENTATIONS:
        setattr(model, PREVIOUS_ATTRIBUTE, current)
    model.set_attn_implementation(implementation)
    if model.config._attn_implementation != implementation:
        raise ValueError(f"{type(model).__name__} refused attn_implementation={implementation!r}")
    model.tca_plan = plan
    return model


def native_implementation(model) -> str:
    """The model's own attention implementation (the one it had before enable_tca), which the sliding-window
    layers of a hybrid model keep: "sdpa" or "eager"."""
    current = model.config._attn_implementation
    name = (getattr(model, PREVIOUS_ATTRIBUTE, None) or "sdpa") if current in IMPLEMENTATIONS else current
    if name not in NATIVE_IMPLEMENTATIONS:
        raise ValueError(
            f"the sliding-window layers of a hybrid model keep the model's own attention, which TCA can run for "
            f"{NATIVE_IMPLEMENTATIONS}; this model uses {name!r}: call model.set_attn_implementation('sdpa') "
            "(or load it with attn_implementation='sdpa') before enable_tca"
        )
    return name


def disable_tca(model):
    """Restore the attention implementation the model had before enable_tca (default "sdpa"); returns it."""
    previous = getattr(model, PREVIOUS_ATTRIBUTE, None) or "sdpa"
    model.set_attn_implementation(previous)
    for module in model.modules():
        if SETTINGS_ATTRIBUTE in module.__dict__:
            delattr(module, SETTINGS_ATTRIBUTE)
    for name in (PREVIOUS_ATTRIBUTE, "tca_plan"):
        if name in model.__dict__:
            delattr(model, name)
    return model

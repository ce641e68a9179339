"""tca.models: run Hugging Face causal LMs (transformers >= 5) with TCA-Attention.

    from tca.models import load_smollm2, enable_tca, TCACache, cache_kwargs
    model, tokenizer = load_smollm2()
    enable_tca(model, plan="plan.json")                 # or plan=None for default budgets
    cache = TCACache(model)                             # the compressed KV cache
    out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=32)  # past_key_values= or cache=
    print(cache.nbytes, cache.kept_fraction())
    logits = prefill_in_chunks(model, long_ids, TCACache(model), chunk_size=4096, mode="streaming")  # long prompts

Attention is switched by registration ("tca", "tca_reference" in transformers' AttentionInterface and
AttentionMaskInterface), never by editing modeling code. transformers is imported on first use of a name here.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "enable_tca": "enable",
    "disable_tca": "enable",
    "attention_modules": "enable",
    "TCACache": "cache",
    "TCACacheLayer": "cache",
    "prefill_in_chunks": "prompt_chunks",
    "calibrate_model": "calibration",
    "default_calibration_text": "calibration",
    "calibration_ids": "calibration",
    "load_smollm2": "smollm2",
    "SMOLLM2_PLAN": "smollm2",
    "model_shape": "shape",
    "ModelShape": "shape",
    "default_plan": "budget_plans",
    "dense_plan": "budget_plans",
    "resolve_plan": "budget_plans",
    "shipped_plan_path": "budget_plans",
    "cache_kwargs": "cache_argument",
    "cache_argument": "cache_argument",
    "register_all": "attention",
    "graph_decoding": "graphs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tca.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)

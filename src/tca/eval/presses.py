"""The peers: KV-cache compression presses of NVIDIA's kvpress (`kvpress==0.5.5`), run on the same model.

kvpress 0.5.5 declares transformers < 5.3 but its presses run on transformers 5.x with two adaptations
made here, without editing kvpress:
- its forward hook reads `past_key_values` and `cache_position` from the attention layer's arguments; newer
  transformers pass the cache as `cache` and no `cache_position`: `_adapt_hook` supplies both (the cache
  positions of the tokens just added, from the cache length after the layer ran);
- `import kvpress` imports every press, including two that need `datasets` and `fire` (DuoAttention's
  pattern download, the statistics CLI); when those are absent, empty modules stand in for the import
  only (the presses used here never touch them).

A press compresses the cache once, at the end of the prefill; decoding appends to the compressed cache.
After compression the cache is shorter than the positions seen, so decoding passes explicit position ids
(harness `greedy`). "kept": positions the cache holds / positions a dense cache holds (AdaKV's evicted
positions, which kvpress masks rather than removes, count as not held).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass

INSTALL_HINT = "pip install --no-deps kvpress==0.5.5 cachetools  (a separate --target is fine: add it to PYTHONPATH)"
PRESSES = ("streamingllm", "snapkv", "expected-attention", "adakv-snapkv", "adakv-expected-attention", "knorm", "tca")
# "tca" is TCA itself as a press (tca_press.TCAPress): it keeps what the plan of its matched TCA method keeps.


@dataclass(frozen=True)
class PressMethod:
    """A kvpress press at a kept fraction `keep` (compression_ratio = 1 - keep) of the prefill's KV; the "tca"
    press instead runs the plan of TCA method `match` (its budgets decide what is kept)."""

    name: str
    press: str
    keep: float | None
    match: str | None = None  # a TCA method whose measured kept fraction (per length) sets `keep`
    kind: str = "press"

    def __post_init__(self):
        if self.press not in PRESSES:
            raise ValueError(f"unknown press {self.press!r}; known: {', '.join(PRESSES)}")
        if (self.keep is None) == (self.match is None):
            raise ValueError("give a press either keep (a fraction) or match (a TCA method's name), not both")
        if self.press == "tca" and self.match is None:
            raise ValueError("the 'tca' press runs a TCA method's plan: give match=<that method's name>, not keep")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "press": self.press, "keep": self.keep, "match": self.match}


def press_method(press: str, keep: float | None = None, match: str | None = None) -> PressMethod:
    """`press` keeping `keep` of the prefill's KV, or as much as TCA method `match` kept at each length."""
    if press == "tca":  # TCA as a press, named apart from the TCA methods themselves ("tca-...")
        return PressMethod(f"tca-press={match}", press, keep, match)
    name = f"{press}-{round(100 * keep)}" if keep is not None else f"{press}={match}"
    return PressMethod(name, press, keep, match)


def import_kvpress(needed_by: str = "the kvpress peers"):
    """kvpress, importable on transformers 5 (module docstring); ImportError saying how to install it."""
    if importlib.util.find_spec("kvpress") is None:
        raise ImportError(f"{needed_by} need kvpress: {INSTALL_HINT}")
    for name in ("datasets", "fire"):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            stand_in = types.ModuleType(name)
            stand_in.load_dataset = _unavailable(name)
            stand_in.Fire = _unavailable(name)
            sys.modules[name] = stand_in
    return importlib.import_module("kvpress")


def _unavailable(module: str):
    def call(*_args, **_kwargs):
        raise ImportError(f"{module} is not installed; this kvpress feature needs it")

    return call


def make_press(method: PressMethod, keep: float | None = None, plan=None, backend: str = "auto"):
    """The kvpress object of `method` (at `keep`, default method.keep), its forward hook adapted; for the "tca"
    press, a TCAPress running `plan` (the matched TCA method's) on tca backend `backend`."""
    if method.press == "tca":
        if plan is None:
            raise ValueError(f"press {method.name!r} needs the plan of {method.match!r}, a TCA method with budgets")
        from .tca_press import TCAPress

        return TCAPress(budgets=plan, backend=backend)
    kvpress = import_kvpress()
    keep = method.keep if keep is None else keep
    if keep is None or not 0.0 < keep <= 1.0:
        raise ValueError(f"press {method.name!r} needs a kept fraction in (0, 1], got {keep}")
    ratio = 1.0 - keep
    makers = {
        "streamingllm": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio),
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio),
        "expected-attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
        "adakv-snapkv": lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio)),
        "adakv-expected-attention": lambda: kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=ratio)),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=ratio),
    }
    press = makers[method.press]()
    press.forward_hook = _adapt_hook(press.forward_hook)
    return press


def _adapt_hook(hook):
    """The press's forward hook, given `past_key_values` and `cache_position` where transformers passes neither."""

    def adapted(module, args, kwargs, output):
        return hook(module, args, hook_kwargs(module, kwargs), output)

    return adapted


def hook_kwargs(module, kwargs: dict) -> dict:
    """An attention layer's keyword arguments with the `past_key_values` and `cache_position` kvpress's forward
    hook reads, supplied where this transformers passes neither (module docstring)."""
    import torch

    if "past_key_values" not in kwargs:
        kwargs = {**kwargs, "past_key_values": kwargs.get("cache")}
    if "cache_position" not in kwargs:
        cache = kwargs["past_key_values"]
        q_len = kwargs["hidden_states"].shape[1]
        end = cache.layers[module.layer_idx].keys.shape[-2] if cache is not None else q_len
        # The tokens this call added sit at the cache's last q_len slots; the prefill is the call whose
        # first position is 0 (kvpress's is_prefilling: cache_position[-1] + 1 == q_len).
        kwargs = {**kwargs, "cache_position": torch.arange(end - q_len, end, device=kwargs["hidden_states"].device)}
    return kwargs


def held_positions(model, cache) -> int:
    """Positions held over all layers, batch and KV heads by a transformers cache a press compressed."""
    held = 0
    for index, layer in enumerate(cache.layers):
        B, HKV, n, _ = layer.keys.shape
        held += B * HKV * n - _masked(model, index)
    return held


def _masked(model, layer_idx: int) -> int:
    """Positions AdaKV masks (kept in memory, never attended) in layer `layer_idx`."""
    language_model = model.model.language_model if hasattr(model.model, "language_model") else model.model
    indices = getattr(language_model.layers[layer_idx].self_attn, "masked_key_indices", None)
    return 0 if indices is None else int(indices[0].numel())

"""The RULER method lists `python -m tca eval --preset ruler...` runs (and docs/quality.md reports).

- "ruler": dense; TCA plans calibrated on the model at tau 0.9 / 0.99; one fixed budget; the calibration
  variants (retrieval-aware, dense fallback) at tau 0.9; the tau 0.9 plan decoding with re-selection
  (section 5c, every step and every 16 steps) and prefilled by streaming in 2048-token chunks (section 5b);
  and the kvpress presses (StreamingLLM, SnapKV, Expected Attention, AdaKV over Expected Attention), each
  matched to the kept KV that `tca-tau0.9` really reached at every length. 13 tasks at 4K/8K/16K/32K, 2
  prompts per task and length (13 methods, 1352 generations: run it per length on a GPU, `--lengths 4096`
  ...; results resume).
- "ruler-cpu": the same kinds of method on a cell a shared 2-core CPU finishes in minutes: 2K tokens, a single
  needle and variable tracking, one prompt each; dense, the tau 0.9 plan, StreamingLLM and SnapKV matched to it,
  and that plan as a kvpress press (`tca-press=tca-tau0.9`: TCA's post-prefill cache after a dense prefill).
- "ruler-smoke": seconds, on the tiny random model (tests); it also runs TCA as a kvpress press
  (`tca-press=tca-fixed17`: the fixed-budget plan through tca.eval.tca_press.TCAPress).
"""

from __future__ import annotations

from dataclasses import replace

from ..config import TCAConfig
from .methods import Method, calibrated, dense, fixed, reselecting, streaming
from .presses import press_method
from .ruler_harness import RulerGrid

RULER_PRESETS = ("ruler", "ruler-cpu", "ruler-smoke")
# Qwen2.5-0.5B at 4K-32K: the small-model block size and window (b = 64, w = 512): at 4K the window alone is
# 12.5% of the context, so budgets below 40% kept remain reachable.
LONG_CONTEXT_CONFIG = TCAConfig(block_size=64, window=512)
# Streaming prefill's chunk: a serving engine's usual prefill chunk, a multiple of the block size.
STREAMING_CHUNK = 2048
PEERS = ("streamingllm", "snapkv", "expected-attention", "adakv-expected-attention")


def variant(tau: float, rule: str, config: TCAConfig = LONG_CONTEXT_CONFIG) -> Method:
    """A plan calibrated at `tau` with a calibration rule beyond the paper's ("retrieval", "fallback")."""
    return Method(f"tca-tau{tau:g}-{rule}", "calibrated", replace(config, tau=tau), calibration=rule)


def ruler_methods(config: TCAConfig = LONG_CONTEXT_CONFIG, peers=PEERS, matched=("tca-tau0.9",),
                  variants: bool = True) -> list:
    paper = calibrated(0.9, config)
    methods = [dense(), paper, calibrated(0.99, config), fixed(4, config)]
    if variants:
        methods += [variant(0.9, "retrieval", config), variant(0.9, "fallback", config)]
        methods += [reselecting(paper, 1), reselecting(paper, 16), streaming(paper, STREAMING_CHUNK)]
    methods += [press_method(p, match=m) for m in matched for p in peers]
    return methods


def ruler_preset(name: str) -> tuple[list, RulerGrid, int]:
    """(methods, grid, calibration length in tokens) of a RULER preset."""
    if name == "ruler":
        return ruler_methods(), RulerGrid(samples=2), 4096
    if name == "ruler-cpu":
        grid = RulerGrid(tasks=["niah_single_2", "vt"], lengths=[2048], samples=1)
        methods = [dense(), calibrated(0.9, LONG_CONTEXT_CONFIG)]
        methods += [press_method(p, match="tca-tau0.9") for p in ("streamingllm", "snapkv", "tca")]
        return methods, grid, 2048
    if name == "ruler-smoke":
        tiny = TCAConfig(block_size=16, window=64)
        grid = RulerGrid(tasks=["fwe"], lengths=[2048], samples=1, max_new_tokens=4)
        methods = [dense(), fixed(1, tiny), press_method("streamingllm", match="tca-fixed17"),
                   press_method("snapkv", keep=0.5), press_method("tca", match="tca-fixed17")]
        return methods, grid, 256
    raise ValueError(f"unknown RULER preset {name!r}; known: {', '.join(RULER_PRESETS)}")

"""The method lists and grids `python -m tca eval --preset NAME` runs (and `docs/quality.md` reports).

- "main": dense; TCA with plans calibrated at tau 0.8 / 0.9 / 0.95 / 0.99; TCA at three fixed budgets; all four
  tasks at 2K, 4K, 8K tokens and five depths; perplexity at 2K, 4K, 8K.
- "ablation": the paper's ablations around the small-model configuration (b=64, w=512, alpha 0.5,
  mass_scale "mean"): alpha, mass_scale, block size, window, all at one fixed budget (~31% of each
  budgeted block) so only the ablated choice changes; single and multi-key needles at 2K and 4K.
- "cachediag": a diagnostic: the same plans with the compressed cache and with a full cache (fresh
  selection at every decode step), to tell selection losses from cache-compression losses.
- "quick" (what `python -m tca eval` runs with no arguments): dense, the demo's plan level (tau 0.97) and one
  fixed budget, single needles at 2K tokens and three depths, one perplexity text: 1-2 minutes on a 2-core CPU
  (SmolLM2-135M, model loading included; the run prints its own estimate first).
- "reselect": decode with re-selection (section 5c) every 1, 16, 64 steps, and every step over 4 or 8 candidate
  blocks, against the paper's rule, on the plan calibrated at tau 0.99 (and every step, with and without
  candidate blocks, on the tau 0.9 plan), single and multi-key needles at 2K.
- "smoke": a seconds-long run for tests and a first check on a new machine.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..config import TCAConfig
from .harness import Grid
from .methods import SMALL_MODEL_CONFIG, Method, calibrated, dense, fixed, reselecting

PRESETS = ("quick", "main", "ablation", "cachediag", "reselect", "smoke")
DEFAULT_PRESET = "quick"
TINY_CONFIG = TCAConfig(block_size=16, window=64)


def main_methods(config: TCAConfig = SMALL_MODEL_CONFIG) -> list[Method]:
    return [dense()] + [calibrated(t, config) for t in (0.8, 0.9, 0.95, 0.99)] + [fixed(mu, config) for mu in (3, 4, 5)]


def ablation_methods(config: TCAConfig = SMALL_MODEL_CONFIG) -> list[Method]:
    """Around the small-model configuration, all at one fixed budget (~31% of each budgeted block: mu =
    log2(b) - 2), so only the ablated choice changes, not the number of tokens kept. (tau is ablated in the
    main preset, where each tau gives its own budgets.)"""
    base = replace(config, tau=0.9)

    def at31(cfg: TCAConfig, name: str) -> Method:
        return fixed(math.log2(cfg.block_size) - 2, cfg, name)

    methods = [dense(), at31(base, "base")]
    methods += [at31(replace(base, alpha=a), f"alpha{a:g}") for a in (0.1, 0.9)]
    methods += [at31(replace(base, mass_scale="none"), "mass-none")]
    methods += [at31(replace(base, block_size=b), f"b{b}") for b in (32, 128)]
    methods += [at31(replace(base, window=w), f"w{w}") for w in (256, 1024)]
    return methods


def preset(name: str) -> tuple[list[Method], Grid, int]:
    """(methods, grid, calibration length in tokens) of a preset."""
    if name == "main":
        return main_methods(), Grid(), 4096
    if name == "ablation":
        grid = Grid(
            tasks=["niah_single", "niah_multikey"],
            lengths=[2048, 4096],
            depths=[0.1, 0.3, 0.5, 0.7, 0.9],
            ppl_lengths=[2048, 4096],
            ppl_tokens=128,
            ppl_modes=["decode"],
        )
        return ablation_methods(), grid, 4096
    if name == "cachediag":
        # Is it the selection or the cache compression that loses needles? The same plans with a full
        # cache: every decode step selects afresh from all tokens (nothing is dropped for good).
        methods = [dense()]
        for m in (calibrated(0.99), fixed(4)):
            methods += [m, replace(m, name=m.name + "-fullcache", cache="full")]
        grid = Grid(tasks=["niah_single", "niah_multikey"], lengths=[2048], depths=[0.1, 0.3, 0.5, 0.7, 0.9],
                    samples=2, ppl_lengths=[])
        return methods, grid, 4096
    if name == "quick":
        grid = Grid(tasks=["niah_single"], lengths=[2048], depths=[0.1, 0.5, 0.9], ppl_lengths=[2048], ppl_docs=1,
                    ppl_tokens=32, ppl_modes=["decode"])
        return [dense(), calibrated(0.97), fixed(4)], grid, 2048
    if name == "reselect":
        # The plan where the cache, not the sparse prefill, loses the needles (the cachediag preset: a fresh
        # selection per step recovers them at tau 0.99, not at a fixed 31% budget).
        paper = calibrated(0.99)
        methods = [dense(), paper] + [reselecting(paper, n) for n in (1, 16, 64)]
        methods += [reselecting(paper, 1, blocks=m) for m in (4, 8)]
        lean = calibrated(0.9)  # a plan that keeps less (pick it with --methods, e.g. on Qwen2.5-0.5B)
        methods += [lean, reselecting(lean, 1)] + [reselecting(lean, 1, blocks=m) for m in (4, 8)]
        grid = Grid(tasks=["niah_single", "niah_multikey"], lengths=[2048], depths=[0.1, 0.3, 0.5, 0.7, 0.9],
                    ppl_lengths=[])
        return methods, grid, 4096
    if name == "smoke":
        grid = Grid(tasks=["niah_single", "vt"], lengths=[512], depths=[0.5], ppl_lengths=[160], ppl_docs=1, ppl_tokens=8)
        return [dense(), calibrated(0.9, TINY_CONFIG), fixed(1, TINY_CONFIG)], grid, 256
    raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")

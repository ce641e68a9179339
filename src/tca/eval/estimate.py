"""What an evaluation run will do, and roughly how long it will take, said before it starts.

The estimate times the dense model on this device (one 512-token forward, a few single-token steps) and
scales by the tokens the run will process; TCA methods cost about the same at these lengths. Rough by design:
it says whether a run takes a minute or a night.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Tokens generated per needle answer, at most (the task's max_new_tokens is about this).
ANSWER_TOKENS = 16


@dataclass(frozen=True)
class Workload:
    """Counts of what evaluate() runs: prompts, tokens prefilled and single-token steps, over all methods."""

    methods: int
    needle_prompts: int
    perplexity_texts: int
    calibrations: int
    prefill_tokens: int
    steps: int

    def describe(self) -> str:
        return (f"{self.methods} methods x ({self.needle_prompts // max(1, self.methods)} needle prompts + "
                f"{self.perplexity_texts // max(1, self.methods)} perplexity texts), {self.calibrations} calibration "
                f"pass(es): {self.prefill_tokens:,} tokens prefilled, {self.steps:,} single-token steps")


def workload(methods, grid, calibration_length: int) -> Workload:
    """What `evaluate(runner, tokenizer, methods, grid)` will process (methods: eval.methods.Method list)."""
    n = len(methods)
    cells = len(grid.tasks) * len(grid.depths) * grid.samples
    needle_tokens = cells * sum(grid.lengths)
    texts = len(grid.ppl_lengths) * grid.ppl_docs * len(grid.ppl_modes)
    ppl_tokens = grid.ppl_docs * len(grid.ppl_modes) * sum(grid.ppl_lengths)
    decode_texts = len(grid.ppl_lengths) * grid.ppl_docs * grid.ppl_modes.count("decode")
    calibrations = sum(m.kind == "calibrated" for m in methods)
    return Workload(
        methods=n,
        needle_prompts=n * cells * len(grid.lengths),
        perplexity_texts=n * texts,
        calibrations=calibrations,
        prefill_tokens=n * (needle_tokens + ppl_tokens) + calibrations * calibration_length,
        steps=n * (cells * len(grid.lengths) * ANSWER_TOKENS + decode_texts * grid.ppl_tokens),
    )


@torch.no_grad()
def seconds_per_token(model, probe_tokens: int = 512, steps: int = 4) -> tuple[float, float]:
    """(seconds per prefilled token, seconds per single-token step) of `model` on its device, measured."""
    device = next(model.parameters()).device
    ids = torch.randint(0, min(1000, model.config.vocab_size), (1, probe_tokens), device=device)
    model(input_ids=ids[:, :16], use_cache=False)  # warm-up
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    prefill = (time.perf_counter() - start) / probe_tokens
    from .harness import _cache_kwargs

    cache = out.past_key_values
    start = time.perf_counter()
    for _ in range(steps):
        model(input_ids=ids[:, :1], use_cache=True, **_cache_kwargs(model, cache))
    return prefill, (time.perf_counter() - start) / steps


def estimate_seconds(work: Workload, per_token: float, per_step: float) -> float:
    return work.prefill_tokens * per_token + work.steps * per_step


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

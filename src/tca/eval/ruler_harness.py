"""RULER in the harness: every method (dense, TCA plans, fixed budgets, kvpress presses) on the same prompts
of the same model, greedy decoding, RULER's scores, the real KV kept, JSON written after every cell.

Resumable: samples already in the output file (same method, task, length, index and the same grid) are
skipped; a press matched to a TCA method reads that method's measured kept fraction at each length.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .harness import _save  # results written atomically, as the needle harness writes them
from .methods import Method, Runner
from .presses import PressMethod, held_positions, make_press
from .ruler import RULER_TASKS, RulerSample, generate_ruler_grid, score_sample
from .run_metadata import run_metadata


@dataclass
class RulerGrid:
    """RULER tasks x lengths, `samples` prompts per cell (RULER's generators, seed `seed`).

    max_new_tokens: a cap on RULER's tokens to generate (None: RULER's own; generation stops at end of turn).
    """

    tasks: list[str] = field(default_factory=lambda: list(RULER_TASKS))
    lengths: list[int] = field(default_factory=lambda: [4096, 8192, 16384, 32768])
    samples: int = 10
    seed: int = 42
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in RULER_TASKS]
        if unknown:
            raise ValueError(f"unknown RULER tasks {unknown}; known: {', '.join(RULER_TASKS)}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


SAVE_EVERY_S = 30.0  # results are written after every method's cell and at least this often within one


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@torch.no_grad()
def greedy(model, input_ids: list[int], cache, max_new_tokens: int, eos: set[int], press=None,
           prefill_chunk: int | None = None) -> tuple[list[int], int]:
    """Greedy decoding through `cache` (the press, if any, active during the prefill only).

    prefill_chunk: a streaming prefill in chunks of that many tokens (a TCACache; section 5b), else one call.
    Positions are passed explicitly: after a press the cache holds fewer entries than tokens seen.
    Returns (generated ids without the end token, tokens fed after the prefill).
    """
    from ..models import cache_kwargs, prefill_in_chunks

    kwargs = cache_kwargs(model, cache)
    ids = torch.tensor([input_ids], device=model.device)
    L = ids.shape[1]
    if prefill_chunk is not None:
        logits = prefill_in_chunks(model, ids, cache, chunk_size=prefill_chunk, mode="streaming")
    else:
        with press(model) if press is not None else contextlib.nullcontext():
            logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1]
    generated, fed = [], 0
    for t in range(max_new_tokens):
        token = int(logits[0].argmax())
        if token in eos:
            break
        generated.append(token)
        if t + 1 == max_new_tokens:
            break
        position = torch.tensor([[L + t]], device=model.device)
        logits = model(input_ids=torch.tensor([[token]], device=model.device), position_ids=position, use_cache=True,
                       **kwargs).logits[:, -1]
        fed += 1
    return generated, fed


class RulerRunner:
    """Switches one model between dense, TCA (through `Runner`) and kvpress presses."""

    def __init__(self, runner: Runner, tokenizer):
        self.runner, self.tokenizer = runner, tokenizer
        self.model = runner.model
        self.eos = _eos_ids(self.model, tokenizer)
        self.press = None

    def use(self, method, keep: float | None = None, methods: dict | None = None) -> None:
        """Switch to `method`; a "tca" press takes the plan of its matched method, found by name in `methods`."""
        if isinstance(method, PressMethod):
            plan = self._matched_plan(method, methods or {}) if method.press == "tca" else None
            self.runner.use(Method("dense", "dense"))
            self.press = make_press(method, keep, plan=plan, backend=self.runner.backend)
        else:
            self.runner.use(method)
            self.press = None

    def _matched_plan(self, method: PressMethod, methods: dict):
        if method.match not in methods:
            raise ValueError(f"press {method.name!r} runs the plan of {method.match!r}, which is not among the methods")
        return self.runner.plan(methods[method.match])  # calibrated here if that method's cell was resumed

    def run(self, sample: RulerSample, max_new_tokens: int) -> tuple[str, dict]:
        cache = self.runner.new_cache()
        start = time.perf_counter()
        method = self.runner.active
        chunk = None if self.press is not None or method is None else method.prefill_chunk
        generated, fed = greedy(self.model, sample.input_ids, cache, max_new_tokens, self.eos, self.press, chunk)
        seconds = time.perf_counter() - start
        if self.press is not None:
            layers, shape = len(cache.layers), cache.layers[0].keys.shape
            dense = layers * shape[0] * shape[1] * (len(sample.input_ids) + fed)
            kept = held_positions(self.model, cache) / dense
        else:
            kept = self.runner.kept_fraction(cache)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        return text, {"kept_fraction": kept, "seconds": seconds, "new_tokens": len(generated)}


def matched_keep(results: dict, method: PressMethod, length: int) -> float:
    """The mean kept fraction TCA method `method.match` reached at `length` (it must have run first)."""
    kept = [s["kept_fraction"] for s in results["samples"] if s["method"] == method.match and s["length"] == length]
    if not kept:
        raise ValueError(f"press {method.name!r} is matched to {method.match!r}, which has no results at {length}; run it first")
    return sum(kept) / len(kept)


def load_results(path: Path | None, fresh: dict) -> dict:
    """The results in `path` when its grid equals `fresh`'s, else `fresh`."""
    if path and path.exists():
        previous = json.loads(path.read_text())
        if previous.get("metadata", {}).get("grid") == fresh["metadata"]["grid"]:
            return previous
    return fresh


def evaluate_ruler(
    ruler: RulerRunner,
    methods: list,
    grid: RulerGrid,
    out: str | Path | None = None,
    progress: bool = True,
    samples: dict | None = None,
) -> dict:
    """Run every method on every RULER prompt of the grid; returns (and writes to `out`) the results:
    {"metadata", "methods": {name: description}, "samples": [{method, task, length, index, score, ...}]}.

    samples: {(task, length): [RulerSample]} already generated (default: generated here, per task).
    """
    path = Path(out) if out else None
    benchmark = "RULER (nvidia-long-context-eval 26.3 generators and metrics)"
    fresh = {"metadata": run_metadata(ruler.model, grid, ruler.runner.backend, benchmark=benchmark), "methods": {}, "samples": []}
    results = load_results(path, fresh)
    done = {(s["method"], s["task"], s["length"], s["index"]) for s in results["samples"]}
    if samples is None:
        samples = {}
        for task in _progress(grid.tasks, progress, desc="RULER prompts"):
            for length, cell in generate_ruler_grid(ruler.tokenizer, task, grid.lengths, grid.samples, grid.seed).items():
                samples[(task, length)] = cell
    for length in grid.lengths:
        for method in methods:
            todo = [s for t in grid.tasks for s in samples[(t, length)] if (method.name, t, length, s.index) not in done]
            if not todo:
                continue
            keep = matched_keep(results, method, length) if isinstance(method, PressMethod) and method.match else None
            ruler.use(method, keep, {m.name: m for m in methods})
            info = method.describe()
            plan = None if isinstance(method, PressMethod) else ruler.runner.plan(method)
            if plan is not None:
                info["plan_keep_ratio"] = plan.mean_keep_ratio()
                info["config"] = plan.config.to_dict()
            results["methods"].setdefault(method.name, info)
            saved = time.perf_counter()
            for s in _progress(todo, progress, desc=f"{method.name} @ {length}", leave=False):
                limit = min(s.max_new_tokens, grid.max_new_tokens or s.max_new_tokens)
                text, stats = ruler.run(s, limit)
                results["samples"].append({
                    "method": method.name, "task": s.task, "length": s.length, "index": s.index,
                    "prompt_tokens": len(s.input_ids), "score": score_sample(text, s.answers, s.metric),
                    "metric": s.metric, "answers": s.answers, "output": text, "press_keep": keep, **stats,
                })
                if path and time.perf_counter() - saved > SAVE_EVERY_S:  # a killed run loses little
                    _save(path, results)
                    saved = time.perf_counter()
            if path:
                _save(path, results)
            if progress:
                from .ruler_report import cell_line

                print(cell_line(results, method.name, length), flush=True)
    return results


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)

"""The evaluation loop: needle tasks (generate and score) and perplexity, per method, saved as JSON.

Results are written after every method, so a long run that stops keeps what it finished; with
`resume=True` methods already in the file (for the same grid) are skipped.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .methods import Method, Runner
from .run_metadata import run_metadata
from .tasks import TASKS, PromptBuilder, make_samples, score


@dataclass
class Grid:
    """What to evaluate: needle tasks at lengths x depths (samples per cell), perplexity at ppl_lengths.

    Perplexity: `ppl_docs` stretches of evaluation text per length; the last `ppl_tokens` tokens of each
    are scored. mode "decode": the rest is prefilled into the method's cache and the scored tokens are fed
    one at a time through it (what generation sees); "prefill": one forward over the whole stretch.
    """

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    depths: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    samples: int = 1
    ppl_lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    ppl_docs: int = 2
    ppl_tokens: int = 256
    ppl_modes: list[str] = field(default_factory=lambda: ["decode", "prefill"])
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
        bad = [m for m in self.ppl_modes if m not in ("decode", "prefill")]
        if bad:
            raise ValueError(f"unknown perplexity modes {bad}; known: decode, prefill")
        short = [L for L in self.ppl_lengths if L <= self.ppl_tokens]
        if short:
            raise ValueError(f"perplexity lengths {short} must exceed ppl_tokens ({self.ppl_tokens})")


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def _cache_kwargs(model, cache) -> dict:
    """{"cache": cache} or {"past_key_values": cache}, whichever this transformers version takes."""
    try:
        from ..models import cache_kwargs
    except ImportError:
        return {"past_key_values": cache}
    return cache_kwargs(model, cache)


@torch.no_grad()
def generate(runner: Runner, input_ids: list[int], max_new_tokens: int, tokenizer) -> tuple[str, dict]:
    """Greedy answer of the active method; returns (text, {kept_fraction, cache_bytes, seconds})."""
    model = runner.model
    ids = torch.tensor([input_ids], device=model.device)
    cache = runner.new_cache()
    start = time.perf_counter()
    prompt, chunk = ids, _prefill_chunk(runner)
    if chunk is not None:  # a streaming prefill, then generate continues from its first token
        first = _streaming_prefill(model, ids, cache, chunk).argmax(-1, keepdim=True)
        prompt, max_new_tokens = torch.cat([ids, first], 1), max_new_tokens - 1
    out = prompt if max_new_tokens == 0 else model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        **_cache_kwargs(model, cache),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    seconds = time.perf_counter() - start
    text = tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
    stats = {"kept_fraction": runner.kept_fraction(cache), "cache_bytes": runner.cache_bytes(cache), "seconds": seconds}
    return text, {**stats, **runner.traffic(cache)}


@torch.no_grad()
def sequence_nll(runner: Runner, ids: torch.Tensor, num_scored: int, mode: str) -> tuple[float, float | None]:
    """Mean negative log-likelihood of the last `num_scored` tokens of `ids` [1, L], and the kept fraction.

    "decode": prefill ids[:, :L-n] into the method's cache, then feed the n scored tokens one by one through
    it (teacher forcing), so every scored token sees exactly the compressed cache generation would see.
    "prefill": one forward over all L tokens (the method's prefill attention), no cache.
    """
    model = runner.model
    L = ids.shape[1]
    targets = ids[0, L - num_scored :]
    if mode == "prefill":
        out = model(input_ids=ids, use_cache=False, logits_to_keep=num_scored + 1)
        logits = out.logits[0, :-1].float()
        # The stateless prefill keeps no cache: its kept fraction is not measured (None) for TCA.
        dense = runner.active is None or runner.active.kind == "dense"
        return float(F.cross_entropy(logits, targets)), 1.0 if dense else None
    cache = runner.new_cache()
    prompt, chunk = ids[:, : L - num_scored], _prefill_chunk(runner)
    if chunk is not None:
        logits = _streaming_prefill(model, prompt, cache, chunk)
    else:
        logits = model(input_ids=prompt, **_cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
    total = 0.0
    for t in range(num_scored):
        total += float(F.cross_entropy(logits[:1].float(), targets[t : t + 1]))
        if t + 1 < num_scored:
            logits = model(input_ids=targets[t : t + 1][None], **_cache_kwargs(model, cache), use_cache=True).logits[:, -1]
    return total / num_scored, runner.kept_fraction(cache)


def _prefill_chunk(runner: Runner) -> int | None:
    """The active method's streaming-prefill chunk size (None: one forward call over the prompt)."""
    return None if runner.active is None else runner.active.prefill_chunk


def _streaming_prefill(model, ids: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    from ..models import prefill_in_chunks

    return prefill_in_chunks(model, ids, cache, chunk_size=chunk, mode="streaming")


def _save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def evaluate(
    runner: Runner,
    tokenizer,
    methods: list[Method],
    grid: Grid,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    builder: PromptBuilder | None = None,
) -> dict:
    """Run every method over the grid; returns (and writes to `out`) the results dict:
    {"metadata", "methods": {name: description + plan summary}, "needles": [...], "perplexity": [...]}."""
    path = Path(out) if out else None
    results = {"metadata": run_metadata(runner.model, grid, runner.backend, model_type=True), "methods": {}, "needles": [], "perplexity": []}
    if resume and path and path.exists():
        previous = json.loads(path.read_text())
        if previous.get("metadata", {}).get("grid") == results["metadata"]["grid"]:
            results = previous
    builder = builder or PromptBuilder(tokenizer)
    samples = make_samples(builder, grid.tasks, grid.lengths, grid.depths, grid.samples, grid.seed)
    rng = random.Random(f"ppl/{grid.seed}")
    docs = []
    for L in grid.ppl_lengths:
        for d in range(grid.ppl_docs):
            start = rng.randrange(0, len(builder.filler) - L)
            docs.append((L, d, torch.tensor([builder.filler[start : start + L]])))
    for method in methods:
        if method.name in results["methods"]:
            continue
        started = time.perf_counter()
        runner.use(method)
        plan = runner.plan(method)
        info = method.describe()
        info["backend"] = runner.backend
        if plan is not None:
            info["plan_keep_ratio"] = plan.mean_keep_ratio()
            info["config"] = plan.config.to_dict()
        needles = []
        for s in _progress(samples, progress, desc=f"{method.name} needles", leave=False):
            text, stats = generate(runner, s.input_ids, s.max_new_tokens, tokenizer)
            needles.append(
                {"method": method.name, "task": s.task, "length": s.length, "depth": s.depth, "index": s.index,
                 "score": score(text, s.answers), "answers": s.answers, "output": text, **stats}
            )
        ppl = []
        for (L, d, ids), mode in _progress([(doc, m) for doc in docs for m in grid.ppl_modes], progress, desc=f"{method.name} perplexity", leave=False):
            nll, kept = sequence_nll(runner, ids.to(runner.model.device), grid.ppl_tokens, mode)
            ppl.append({"method": method.name, "length": L, "doc": d, "mode": mode, "nll": nll, "ppl": math.exp(nll), "kept_fraction": kept})
        info["seconds"] = time.perf_counter() - started
        results["methods"][method.name] = info
        results["needles"] += needles
        results["perplexity"] += ppl
        if path:
            _save(path, results)
        if progress:
            from .report import method_summary

            print(method_summary(results, method.name), flush=True)
    return results

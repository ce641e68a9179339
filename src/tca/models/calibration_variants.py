"""Calibration rules beyond the paper on a whole model (docs/semantics.md section 6.1; the exact rules are in
tca.reference.calibration_variants): "retrieval" and "fallback", from the paper's forward pass over
calibration text plus one forward pass per retrieval probe.

A retrieval probe is calibration text with one "special magic number" sentence hidden at a depth, a
question about it at the end, and the answer, teacher-forced: the answer rows are where a needle is read.

Legend: B batch, HQ query heads, HKV key/value heads, L tokens, M candidates.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

import torch

from ..backends import routing
from ..budgets import calibration_candidates
from ..calibration_rules import CALIBRATION_RULES, DEFAULT_FALLBACK_FRACTION, choose_retrieval, dense_fallback
from ..config import TCAConfig
from ..geometry import DEFAULT_CALIBRATION_ROWS as DEFAULT_ROWS
from ..plan import BudgetPlan, choose_budgets
from . import _hf
from . import calibration as paper
from .attention import register
from .shape import check_supported

_KEYS = ("amber-falcon", "brave-lantern", "calm-orchard", "dusty-violin", "eager-walnut", "fuzzy-harbor",
         "gentle-rocket", "hollow-meadow", "icy-saddle", "jolly-tunnel", "keen-quarry", "lucky-kettle")


def retrieval_probes(tokenizer, length: int, count: int = 4, text: str | None = None, seed: int = 0):
    """`count` probes of exactly `length` tokens: [(ids [1, length], answer_start P)], the needle at depths
    spread over (0, 1) [choice: depths (i + 0.5) / count], filler from `text` (default the calibration text)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    text = paper.default_calibration_text() if text is None else text
    filler = tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(f"probes/{seed}")
    probes = []
    for i in range(count):
        key, value = _KEYS[(seed + i) % len(_KEYS)], str(rng.randrange(1_000_000, 10_000_000))
        needle = tokenizer.encode(f"\nThe special magic number for {key} is: {value}.\n", add_special_tokens=False)
        question = tokenizer.encode(
            f"\n\nWhat is the special magic number for {key} mentioned in the provided text? "
            f"The special magic number for {key} mentioned in the provided text is:", add_special_tokens=False)
        answer = tokenizer.encode(f" {value}.", add_special_tokens=False)
        n_fill = length - len(needle) - len(question) - len(answer)
        if n_fill < 64 or n_fill > len(filler):
            raise ValueError(f"probe length {length} does not fit: {n_fill} filler tokens (text has {len(filler)})")
        start = rng.randrange(0, len(filler) - n_fill + 1)
        fill = filler[start : start + n_fill]
        cut = round((i + 0.5) / count * n_fill)
        ids = fill[:cut] + needle + fill[cut:] + question + answer
        probes.append((torch.tensor([ids]), length - len(answer)))
    return probes


class _RetrievalRecorder:
    """Collects a_m^ret per layer for one probe (the paper's recorder interface: record(layer, q, k, scale))."""

    def __init__(self, config: TCAConfig, candidates: torch.Tensor, answer_start: int):
        self.config, self.candidates, self.answer_start = config, candidates, answer_start
        self.masses: dict[int, torch.Tensor] = {}
        self.native_layers, self.native = frozenset(), None  # hybrid models are calibrated by the paper's rule only

    def record(self, layer: int, q, k, scale: float) -> None:
        # On the backend that calibrates (the torch backend's own copy of the rule; the oracle's is the tests').
        impl = routing.resolve(paper.CALIBRATION_BACKEND, q.device, q.dtype, q.shape[-1], phase="calibration").load()
        masses = impl.retrieval_mass(q, k, self.candidates.to(q.device), self.config, scale, self.answer_start)
        self.masses[layer] = masses.cpu()


def _forward(model, ids: torch.Tensor, recorder) -> None:
    """One dense forward pass over `ids` with the calibration attention handing q, k to `recorder`."""
    register(paper.CALIBRATE_IMPLEMENTATION, paper.calibrate_attention_forward)
    previous = model.config._attn_implementation
    token = paper._RECORDER.set(recorder)
    try:
        model.set_attn_implementation(paper.CALIBRATE_IMPLEMENTATION)
        with torch.no_grad():
            model(ids.to(model.device), use_cache=False, logits_to_keep=1)
    finally:
        paper._RECORDER.reset(token)
        model.set_attn_implementation(previous)


def calibrate_with_rule(
    model,
    input_ids: torch.Tensor,
    probes: list,
    config: TCAConfig | None = None,
    tau: float | None = None,
    rule: str = "retrieval",
    num_rows: int = DEFAULT_ROWS,
    max_fraction: float = DEFAULT_FALLBACK_FRACTION,
    progress: bool = True,
    text_source: str = "",
) -> BudgetPlan:
    """A plan by calibration rule `rule` ("paper", "retrieval" or "fallback") for every layer and KV head.

    input_ids: [1, L] calibration text (the paper's pass); probes: [(ids [1, Lp], answer_start)] from
    `retrieval_probes` (not used by "paper").
    """
    _hf.require()
    if rule not in CALIBRATION_RULES:
        raise ValueError(f"unknown calibration rule {rule!r}; known: {', '.join(CALIBRATION_RULES)}")
    config = config or TCAConfig()
    if tau is not None:
        config = replace(config, tau=tau)
    if rule == "paper":
        return paper.calibrate_model(model, input_ids, config=config, num_rows=num_rows, progress=progress,
                                     text_source=text_source, tau=None)
    if not probes:
        raise ValueError(f"calibration rule {rule!r} needs retrieval probes (see retrieval_probes)")
    shape = check_supported(model)
    start = time.perf_counter()
    candidates = calibration_candidates(config.block_size, config.num_candidates, config.sigma)
    recorder = paper._Recorder(config, candidates, num_rows, None, paper.CALIBRATION_BACKEND)
    _forward(model, input_ids if input_ids.dim() == 2 else input_ids[None], recorder)
    retrieval = [torch.zeros(len(candidates), shape.num_kv_heads, dtype=torch.float64) for _ in range(shape.num_layers)]
    for ids, answer_start in _progress(probes, progress):
        probe = _RetrievalRecorder(config, candidates, answer_start)
        _forward(model, ids, probe)
        for i in range(shape.num_layers):
            retrieval[i] += probe.masses[i] / len(probes)
    if rule == "retrieval":
        layers = [choose_retrieval(recorder.masses[i], retrieval[i], candidates, config.tau, config.block_size)
                  for i in range(shape.num_layers)]
    else:
        layers = [choose_budgets(recorder.masses[i], candidates, config.tau, config.block_size) for i in range(shape.num_layers)]
        layers = dense_fallback(layers, retrieval, config.tau, config.block_size, max_fraction)
    metadata = {
        **shape.to_dict(), "text": text_source, "length": int(input_ids.shape[-1]), "calibration_rule": rule,
        "probes": len(probes), "probe_length": int(probes[0][0].shape[-1]),
        "dense_heads": sum(h.candidate is None for heads in layers for h in heads),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if rule == "fallback":
        metadata["fallback_max_fraction"] = max_fraction
    return BudgetPlan(config=config, layers=layers, metadata=metadata)


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="retrieval probes", unit="probe")

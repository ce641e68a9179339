"""Calibration of a whole model in one forward pass (docs/semantics.md section 6).

A temporary attention implementation ("tca_calibrate") sees each layer's q [B, HQ, L, D] and k [B, HKV, L, D]
during one dense forward pass, has a backend score every log-Gaussian candidate on R evaluated rows (the torch
backend by default: chunked, no L x L matrix, matmuls on the model's device), and returns dense causal
attention so the next layer sees the dense model's activations.

Legend: B batch, HQ query heads, HKV key/value heads, G = HQ / HKV, L tokens, D head dim, M candidates,
R evaluated rows.
"""

from __future__ import annotations

import contextvars
import inspect
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..backends import routing
from ..budgets import calibration_candidates, dense_budgets, expected_cost
from ..config import TCAConfig
from ..geometry import DEFAULT_CALIBRATION_ROWS, evaluated_rows
from ..plan import BudgetPlan, HeadBudget, choose_budgets
from . import _hf
from .attention import native_attention, register
from .enable import native_implementation
from .shape import check_supported

CALIBRATE_IMPLEMENTATION = "tca_calibrate"
DEFAULT_ROWS = DEFAULT_CALIBRATION_ROWS
ROW_CHUNK = 64
CALIBRATION_BACKEND = "torch"
_RECORDER: contextvars.ContextVar = contextvars.ContextVar("tca_calibration_recorder", default=None)


def default_calibration_text() -> str:
    """Real prose shipped with Python itself: the pydoc topic help texts, sorted by topic, joined."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def calibration_ids(tokenizer, length: int, text: str | None = None, offset_chars: int = 0) -> torch.Tensor:
    """[1, length] token ids of `text` (default: the pydoc topics) from character `offset_chars` on."""
    text = default_calibration_text() if text is None else text
    ids = tokenizer(text[offset_chars:], return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < length:
        raise ValueError(f"the calibration text has {ids.shape[1]} tokens, fewer than the {length} asked for")
    return ids[:, :length]


def retained_mass(q, k, candidates: torch.Tensor, config: TCAConfig, scale: float, num_rows: int = DEFAULT_ROWS,
                  row_chunk: int = ROW_CHUNK, backend: str = CALIBRATION_BACKEND) -> torch.Tensor:
    """a_m per KV head (section 6) on a backend that calibrates (the torch backend by default), rows in chunks.

    q: [B, HQ, L, D], k: [B, HKV, L, D], candidates: [M, len(K)]  ->  [M, HKV] float64.
    Peak memory is O(B HQ row_chunk L) instead of O(B HQ R L).
    """
    impl = routing.resolve(backend, q.device, q.dtype, q.shape[-1], phase="calibration").load()
    if backend == "torch":
        return impl.retained_mass(q, k, candidates, config, scale, num_rows, row_chunk)
    return impl.retained_mass(q, k, candidates, config, scale, num_rows)


class _Recorder:
    """Collects a_m per layer while the calibration forward pass runs."""

    def __init__(self, config: TCAConfig, candidates: torch.Tensor, num_rows: int, bar, backend: str, native_layers=(),
                 native=None):
        self.config, self.candidates, self.num_rows, self.bar = config, candidates, num_rows, bar
        self.backend = backend
        self.native_layers, self.native = frozenset(native_layers), native  # layers that keep the model's attention
        self.masses: dict[int, torch.Tensor] = {}

    def record(self, layer: int, q, k, scale: float) -> None:
        if layer in self.masses:
            raise RuntimeError(f"layer {layer} was seen twice in one calibration pass")
        masses = retained_mass(q, k, self.candidates.to(q.device), self.config, scale, self.num_rows,
                               backend=self.backend)
        self.masses[layer] = masses.cpu()
        if self.bar is not None:
            self.bar.update(1)


def calibrate_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Dense causal attention that first hands q, k to the active calibration recorder.

    query [B, HQ, L, D], key/value [B, HKV, L, D] -> (out [B, L, HQ, D], None).
    """
    recorder = _RECORDER.get()
    if recorder is None:
        raise RuntimeError("the 'tca_calibrate' attention only runs inside tca.models.calibrate_model")
    if module.layer_idx in recorder.native_layers:  # a hybrid model's sliding-window layer: not calibrated
        return native_attention(recorder.native, module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if query.shape[2] != key.shape[2]:
        raise ValueError("calibration runs one full forward pass without a cache (LQ == L)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    recorder.record(module.layer_idx, query, key, scale)
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scale)
    return out.transpose(1, 2).contiguous(), None


def calibrate_model(
    model,
    input_ids: torch.Tensor,
    config: TCAConfig | None = None,
    tau: float | None = 0.9,
    num_rows: int = DEFAULT_ROWS,
    progress: bool = True,
    text_source: str = "",
    backend: str = CALIBRATION_BACKEND,
) -> BudgetPlan:
    """Section 6 for every layer and KV head of `model` from one forward pass over `input_ids`.

    input_ids: [B, L] or [L] token ids, L > config.window (several sequences: a_m is averaged over them).
    tau overrides config.tau (None keeps it). backend: the backend that scores the candidates (one without
    "calibration" in its lacks: "torch", or "reference" for small checks). Returns a BudgetPlan whose metadata
    names the model, its shape, the text source and the length.
    """
    _hf.require()
    config = config or TCAConfig()
    if not isinstance(config, TCAConfig):
        raise TypeError(f"config must be a tca.TCAConfig or None, got {type(config).__name__}")
    if tau is not None:
        config = replace(config, tau=tau)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("input_ids must be an integer torch.Tensor of token ids, [B, L] or [L]")
    if input_ids.layout != torch.strided or input_ids.device.type == "meta":
        raise TypeError(f"input_ids must be a dense tensor with values, got layout {input_ids.layout} on {input_ids.device}")
    if input_ids.numel() == 0:
        raise ValueError(f"the calibration batch is empty (input_ids of shape {tuple(input_ids.shape)}); pass token ids [B, L]")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L] or [L], got shape {tuple(input_ids.shape)}")
    L = input_ids.shape[1]
    if L <= config.window:
        raise ValueError(
            f"calibration needs a sequence longer than the window ({config.window} tokens), got {L}; "
            "use a longer text or a smaller window"
        )
    shape = check_supported(model)
    candidates = calibration_candidates(config.block_size, config.num_candidates, config.sigma)
    register(CALIBRATE_IMPLEMENTATION, calibrate_attention_forward)  # with TCA's mask rules (causal, no padding)
    bar = _progress_bar(len(shape.tca_layers), progress)
    native = native_implementation(model) if shape.native_layers else None
    recorder = _Recorder(config, candidates, num_rows, bar, backend, shape.native_layers, native)
    previous = model.config._attn_implementation
    token = _RECORDER.set(recorder)
    start = time.perf_counter()
    try:
        model.set_attn_implementation(CALIBRATE_IMPLEMENTATION)
        kwargs = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        with torch.no_grad():
            model(input_ids.to(model.device), use_cache=False, **kwargs)
    finally:
        _RECORDER.reset(token)
        model.set_attn_implementation(previous)
        if bar is not None:
            bar.close()
    missing = [i for i in shape.tca_layers if i not in recorder.masses]
    if missing:
        raise RuntimeError(f"layers {missing} did not run the calibration attention; this architecture is not supported")
    layers = [
        choose_budgets(recorder.masses[i], candidates, config.tau, config.block_size) if i in recorder.masses
        else _unused_entry(shape.num_kv_heads, config.block_size)
        for i in range(shape.num_layers)
    ]
    metadata = {
        **shape.to_dict(),
        "text": text_source,
        "length": L,
        "batch": input_ids.shape[0],
        "evaluated_rows": len(evaluated_rows(L, config.window, num_rows)),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return BudgetPlan(config=config, layers=layers, metadata=metadata)


def _unused_entry(num_kv_heads: int, block_size: int) -> list[HeadBudget]:
    """The plan entry of a sliding-window layer, which keeps the model's attention: dense budgets, never read
    (the plan's metadata lists the layer under native_layers)."""
    head = HeadBudget(budgets=[float(x) for x in dense_budgets(block_size)], retained_mass=1.0,
                      cost=float(expected_cost(dense_budgets(block_size))), candidate=None)
    return [head] * num_kv_heads


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="calibrating layers", unit="layer")

"""Validation of user input at the public entry points: one clear error per mistake.

Every message says what was expected, what was given and how to fix it. Backends receive inputs that
passed these checks, in the "bhsd" layout: q [B, HQ, LQ, D], k and v [B, HKV, L, D].
"""

from __future__ import annotations

import math
import numbers
import weakref

import torch

from .budgets import default_budgets
from .config import TCAConfig
from .devices import remember_host_copy, to_device

LAYOUTS = ("bhsd", "bshd")
# [choice: layout guard] More KV heads than this on the head axis of a call that did not name its layout is
# taken as [B, L, H, D] passed by mistake (released models have at most 128 heads): an error with the fix.
MAX_PLAUSIBLE_HEADS = 256
BUDGET_SUM_TOLERANCE = 1e-4
# [choice: scale range] The kernels apply the scale in float32 (Triton as scale * log2(e)): below the smallest
# normal float32 it rounds to 0 there (a masked logit then becomes -inf * 0 = NaN), above 2**127 it, or
# scale * log2(e), rounds to infinity. The reference (float64) would give a result; such scales are refused at
# validation instead, so every backend accepts the same range (semantics.md section 8).
MIN_SCALE = 2.0**-126
MAX_SCALE = 2.0**127


def check_config(config) -> TCAConfig:
    if config is None:
        return TCAConfig()
    if not isinstance(config, TCAConfig):
        raise TypeError(f"config must be a tca.TCAConfig or None, got {type(config).__name__}")
    return config


def to_bhsd(q, k, v, layout: str | None):
    """Check q, k, v and return them in the "bhsd" layout (views, no copies).

    layout None means "bhsd" not named by the caller: then a head axis longer than MAX_PLAUSIBLE_HEADS is
    taken for a sequence axis (the [B, L, H, D] mistake) and refused with the fix; naming layout skips that.
    """
    named = layout is not None
    layout = "bhsd" if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            shape = "[B, H, L, D]" if layout == "bhsd" else "[B, L, H, D]"
            raise ValueError(f"{name} must have 4 dimensions {shape} (layout={layout!r}), got shape {tuple(t.shape)}")
        check_dense(name, t)
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them with .to(dtype)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    check_has_data("q, k, v", q)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    B, HQ, LQ, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)} (in bhsd order)")
    Bk, HKV, L, Dk = k.shape
    if Bk != B:
        raise ValueError(f"q and k must have the same batch size, got {B} and {Bk}")
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim, got {D} and {Dk}")
    if min(B, HQ, LQ, D, HKV, L) == 0:
        raise ValueError(
            f"zero-size dimension: q {tuple(q.shape)}, k {tuple(k.shape)} (bhsd order); TCA needs at least one "
            "batch element, head, query, key and head-dim entry"
        )
    if not named and HKV > MAX_PLAUSIBLE_HEADS:
        raise ValueError(
            f"k has {HKV} entries on the head axis (shape {tuple(k.shape)}, read as [B, H, L, D]): that looks like "
            "a sequence axis. If your tensors are [B, L, H, D] (flash-attn's layout), pass layout='bshd'; if they "
            f"really have more than {MAX_PLAUSIBLE_HEADS} heads, pass layout='bhsd' to say so"
        )
    hint = "" if layout == "bshd" else "; if your tensors are [B, L, H, D] (flash-attn's layout), pass layout='bshd'"
    if HQ % HKV:
        raise ValueError(f"query heads ({HQ}) must be a multiple of key/value heads ({HKV}){hint}")
    if LQ > L:
        raise ValueError(
            f"more queries ({LQ}) than keys ({L}): queries are aligned to the end of the keys (bottom-right causal), "
            f"so Lq <= L is required; pass all keys up to the last query{hint}"
        )
    return q, k, v


def check_dense(name: str, t: torch.Tensor) -> None:
    """A sparse tensor cannot be attended (TypeError with the fix)."""
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; convert it with .to_dense()")


def check_has_data(name: str, t: torch.Tensor) -> None:
    """A tensor on the meta device has a shape but no values (ValueError with the fix)."""
    if t.device.type == "meta":
        verb = "are" if "," in name else "is"
        raise ValueError(
            f"{name} {verb} on the meta device (a shape without values, e.g. from a model built with "
            "init_empty_weights); move real values to a CPU or GPU device first"
        )


def from_bhsd(out: torch.Tensor, layout: str | None) -> torch.Tensor:
    return out.transpose(1, 2) if layout == "bshd" else out


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()  # a 0-d tensor (one host sync, at most once per call)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0 or None (meaning 1/sqrt(D)), got {scale!r}")
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise ValueError(
            f"scale must lie between 2**-126 (about 1.2e-38) and 2**127 (about 1.7e38), got {scale!r}: the kernels "
            "compute logits in float32, where a smaller scale rounds to 0 and a larger one to infinity; "
            "leave scale=None for 1/sqrt(D)"
        )
    return float(scale)


# Budgets already checked: id -> (weak reference, version, HKV, config, device, result). A model passes the same
# budget tensor to every prefill of a layer; checking it again costs ~0.2 ms of host time per layer and call.
_CHECKED: dict[int, tuple] = {}
_CHECKED_MAX = 1024


def check_budgets(budgets, num_kv_heads: int, config: TCAConfig, device) -> torch.Tensor:
    """Return the budget configurations as float64 [HKV, len(K)] on `device`, each divided by its sum (budgets
    are accepted when they sum to 1 within BUDGET_SUM_TOLERANCE; after this they sum to 1 up to rounding).
    Remembered per budget tensor (until it is modified in place): the result is shared and must not be modified.
    The copy to the device is asynchronous on the current stream; a caller on another stream waits for it first."""
    device = torch.device(device)
    if budgets is not None and not isinstance(budgets, torch.Tensor):
        return _check_budgets(budgets, num_kv_heads, config)  # raises, saying what is expected
    # Inference tensors have no version counter, and a result made in inference mode must not reach callers
    # outside it: those calls are checked every time.
    remember = not torch.is_inference_mode_enabled() and not (budgets is not None and budgets.is_inference())
    key = (None, config.block_size, num_kv_heads, device) if budgets is None else id(budgets)
    facts = (None if budgets is None or not remember else budgets._version, num_kv_heads, config, device)
    hit = _CHECKED.get(key) if remember else None
    if hit is not None and (budgets is None or hit[0]() is budgets) and hit[1:5] == facts:
        return hit[5]
    host = _check_budgets(budgets, num_kv_heads, config)
    result = to_device(host, device)  # no host synchronisation
    remember_host_copy(result, host)
    if remember:
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[key] = (None if budgets is None else weakref.ref(budgets), *facts, result)
    return result


def _check_budgets(budgets, num_kv_heads: int, config: TCAConfig) -> torch.Tensor:
    n = config.num_retain_counts
    if budgets is None:
        return default_budgets(config.block_size).expand(num_kv_heads, n).contiguous()
    if not isinstance(budgets, torch.Tensor):
        raise TypeError(f"budgets must be None or a torch.Tensor of probabilities, got {type(budgets).__name__}")
    check_dense("budgets", budgets)
    check_has_data("budgets", budgets)
    if not budgets.is_floating_point():
        raise TypeError(f"budgets must be a floating-point tensor, got {budgets.dtype}")
    given = tuple(budgets.shape)
    if given not in ((n,), (num_kv_heads, n)):
        raise ValueError(
            f"budgets must have shape [{n}] or [{num_kv_heads}, {n}] (one probability per retain count "
            f"{config.retain_counts} for block_size {config.block_size}), got {given}"
        )
    budgets = budgets.expand(num_kv_heads, n)
    # Validate on the CPU (a few numbers: no device syncs), then move once.
    p = budgets.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(p).all():
        raise ValueError("budgets contain NaN or infinity; they must be finite probabilities")
    if (p < 0).any():
        raise ValueError(f"budgets must be non-negative, got a minimum of {p.min().item():.3g}")
    sums = p.sum(-1)
    worst = (sums - 1).abs().max().item()
    if worst > BUDGET_SUM_TOLERANCE:
        raise ValueError(
            f"each budget configuration must sum to 1 (within {BUDGET_SUM_TOLERANCE}), got sums {sums.tolist()}; "
            "normalise with budgets / budgets.sum(-1, keepdim=True)"
        )
    # Normalised once here, so Eq. 7's floors leave between 0 and len(K) units in every backend. [choice]
    return (p / sums[:, None]).contiguous()

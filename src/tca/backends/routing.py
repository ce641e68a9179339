"""Routing: the one place where a backend is chosen for a call (docs/architecture.md, "Routing").

As in xformers' fmha dispatch, a call is described once, by an `Inputs` record (device, dtype, head dim, heads,
length, phase, padding, what it needs: lse, gradients); every registered backend answers why it cannot run such
inputs (registry.Backend.reasons); `candidates` is the priority list for the device and shape, which holds the
measured crossover (backends/crossover.py); and `route` returns one bound choice, a `Route`: the backend that
runs the call and, for a prefill, the backend whose kernels decode the cache it makes. The API runs the route's
implementation and hands the decode kernels to the cache, which keeps them for every step.

    inputs = Inputs.of(q, k, v, phase="prefill")
    chosen = route("auto", inputs)           # Route(backend=<triton>, decode=<triton>)
    out, cache = chosen.implementation.prefill(q, k, v, budgets, config, scale)
    cache.use_kernels(chosen.decode_kernels)

backend="auto" takes the first usable candidate and says once per process which it chose (BackendChoiceWarning);
a named backend that cannot run raises BackendUnavailableError listing its reasons. Choices are memoised per
(name, inputs without the length, the length's crossover band): probing the environment costs 0.1-0.4 ms, too
much for every attention call of a decode loop; `forget()` drops the memo (after installing a package at
runtime, or changing a variable a backend reads).

Shape letters: HQ query heads, HKV key/value heads, L keys, D head dim.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from . import registry
from .crossover import crossover
from .registry import Backend, BackendChoiceWarning, BackendUnavailableError

# What a call is: its phase decides the capabilities it needs, and whether the crossover (measured on the time to
# first token) reorders the candidates.
#   attention        stateless attention (tca.attention)
#   prefill          attention over a prompt and the cache decode continues (tca.prefill)
#   chunked_prefill  a prompt chunk by chunk (tca.start_prefill / prefill_chunk)
#   calibration      retained mass over calibration rows (tca.models.calibration)
#   selection        the kept positions of section 3 only (tca.eval)
PHASES = ("attention", "prefill", "chunked_prefill", "calibration", "selection")
_NEEDS = {"prefill": ("decode",), "chunked_prefill": ("decode", "chunked_prefill"), "calibration": ("calibration",)}
_BY_LENGTH = ("attention", "prefill")  # the phases whose speed the crossover was measured on


@dataclass(frozen=True)
class Inputs:
    """What routing decides from: one record per call.

    heads and length are None where the caller has no tensors yet (a server checking its settings): then the
    crossover cannot apply and the candidates are the backends in priority order. padded: a left-padded batch of
    several lengths (length is then the padded one). lse: the log-sum-exp is returned. gradients: an input
    requires grad (a backward pass is needed)."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    phase: str = "attention"
    query_heads: int | None = None
    kv_heads: int | None = None
    length: int | None = None
    padded: bool = False
    lse: bool = False
    gradients: bool = False

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"unknown phase {self.phase!r}; known: {', '.join(PHASES)}")
        object.__setattr__(self, "device", torch.device(self.device))

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None, *, phase: str = "attention",
           padded: bool = False, lse: bool = False) -> Inputs:
        """The record of a call on bhsd q [B, HQ, LQ, D], k, v [B, HKV, L, D]."""
        gradients = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v))
        return cls(q.device, q.dtype, q.shape[-1], phase, q.shape[1], k.shape[1], k.shape[2], padded, lse, gradients)

    @property
    def needs(self) -> tuple[str, ...]:
        """The capabilities (registry.CAPABILITIES) a backend must have to run this call."""
        needs = list(_NEEDS.get(self.phase, ()))
        if self.gradients:
            needs.append("gradients")
        if self.lse:
            needs.append("lse")
        return tuple(needs)

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """(HQ, HKV, D), what a crossover is measured for, or None when the heads are unknown."""
        if self.query_heads is None or self.kv_heads is None:
            return None
        return self.query_heads, self.kv_heads, self.head_dim

    @property
    def band(self) -> str:
        """Where the length lies for the crossover of this device and shape: "dense" (below dense_below),
        "flash" (from flash_from), else "sparse"; "any" where the crossover does not apply."""
        if self.length is None or self.phase not in _BY_LENGTH:
            return "any"
        cross = crossover(self.device, self.shape)
        if self.length < cross.dense_below:
            return "dense"
        return "flash" if self.length >= cross.flash_from else "sparse"


@dataclass(frozen=True)
class Route:
    """One bound choice: `backend` runs the call; `decode` (prefill phases) is the backend whose kernels decode
    the cache the call makes, or None where the call makes no cache."""

    backend: Backend
    decode: Backend | None = None

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def implementation(self):
        return self.backend.load()

    @property
    def decode_kernels(self):
        """The decode backend's kernels for the shared caches (`cache.use_kernels`), or None: the cache is of the
        backend's own type (the oracle's) and decodes there."""
        if self.decode is None or self.decode.own_cache:
            return None
        return self.decode.load().cache_kernels

    def runs_in_one_call(self, inputs: Inputs) -> bool:
        """Whether a padded batch runs in one call (the backend has "varlen"), else one sequence at a time."""
        return inputs.padded and self.backend.supports("varlen")


def candidates(inputs: Inputs) -> list[str]:
    """backend="auto"'s priority list for these inputs: the registered TCA backends by priority, reordered by the
    crossover of the device and shape for attention and prefill: below `dense_below` the dense backend first (TCA
    cannot win there), from `flash_from` the flash backend first (its prefill is the faster one there)."""
    order = registry.names()
    band = inputs.band
    if band == "dense":
        return ["dense", *order]
    if band == "flash" and "flash" in order:
        return ["flash", *(n for n in order if n != "flash")]
    return order


_CHOICES: dict[tuple, tuple[Backend | None, list[str] | dict[str, list[str]]]] = {}
_DECODE_CHOICES: dict[tuple, Backend] = {}
_ANNOUNCED: set[tuple[str, str]] = set()


def forget() -> None:
    """Drop every memoised choice: the next call probes the environment again."""
    _CHOICES.clear()
    _DECODE_CHOICES.clear()


registry.on_change(forget)  # a registered or removed backend changes every answer


def choose(name: str, inputs: Inputs) -> Backend:
    """The backend that runs `inputs`: the named one if it can, or for "auto" the first usable candidate."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string (a name or 'auto'), got {type(name).__name__}")
    key = (name, replace(inputs, length=None), inputs.band)
    found = _CHOICES.get(key)
    if found is None:
        found = _CHOICES[key] = _first_usable(name, inputs)
    backend, why = found
    if backend is None:
        if name != "auto":
            raise BackendUnavailableError(f"backend {name!r} cannot run here: " + "; ".join(why))
        detail = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in why.items())
        raise BackendUnavailableError(f"no backend can run these inputs:\n{detail}")
    if name == "auto":
        _announce(backend, inputs)
    return backend


def route(name: str, inputs: Inputs, decode: str = "auto") -> Route:
    """The bound choice for a call: the backend that runs it and, for a prefill, the decode backend of its cache
    (`decode`: a name or "auto", the fastest decode kernels of the device whichever backend prefilled)."""
    backend = choose(name, inputs)
    if inputs.phase not in ("prefill", "chunked_prefill"):
        return Route(backend)
    if backend.own_cache:  # a cache of its own type decodes there
        return Route(backend, backend)
    return Route(backend, decode_backend(decode, inputs.device, inputs.dtype, inputs.head_dim))


def resolve(name: str, device, dtype: torch.dtype, head_dim: int, *, phase: str = "attention",
            needs: Iterable[str] = ()) -> Backend:
    """`choose` for callers that know only the device, dtype and head dim (a server's settings, a CLI): no
    crossover applies. needs: only "gradients" or "lse" beyond what the phase implies."""
    extra = set(needs)
    unknown = extra - {"gradients", "lse"}
    if unknown:
        raise ValueError(f"needs takes 'gradients' and 'lse' (the phase implies the rest), got {sorted(unknown)}")
    return choose(name, Inputs(device, dtype, head_dim, phase, gradients="gradients" in extra, lse="lse" in extra))


def decode_backend(name: str, device, dtype: torch.dtype, head_dim: int) -> Backend:
    """The backend whose kernels decode the shared caches (PackedKVCache, DenseKVCache, a re-selecting cache's
    active set): the named one, or for "auto" the usable one of highest decode_priority (each phase takes its
    fastest backend: e.g. flash prefill, triton decode). Memoised per (name, device, dtype, head dim)."""
    key = (name, torch.device(device), dtype, head_dim)
    choice = _DECODE_CHOICES.get(key)
    if choice is None:
        choice = _DECODE_CHOICES[key] = _first_decoder(name, torch.device(device), dtype, head_dim)
    return choice


def _first_usable(name: str, inputs: Inputs):
    """(backend, None) or (None, its reasons) for a name; (None, {name: reasons}) when "auto" finds none."""
    if name != "auto":
        backend = registry.get(name)
        reasons = _reasons(backend, inputs)
        return (None, reasons) if reasons else (backend, None)
    why = {}
    for candidate in candidates(inputs):
        backend = registry.get(candidate)
        reasons = _reasons(backend, inputs)
        if not reasons:
            return backend, None
        why[candidate] = reasons
    return None, why


def _reasons(backend: Backend, inputs: Inputs) -> list[str]:
    return backend.reasons(inputs.device, inputs.dtype, inputs.head_dim, needs=inputs.needs)


def _first_decoder(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Backend:
    inputs = Inputs(device, dtype, head_dim, "prefill")
    if name != "auto":
        backend = choose(name, inputs)
        if backend.computes == "dense":
            raise BackendUnavailableError(
                "backend 'dense' has no decode kernels of its own: its cache decodes on a TCA backend's "
                f"(name one of {', '.join(n for n in registry.names() if registry.get(n).decode_priority is not None)}"
                ", or 'auto')"
            )
        if backend.decode_priority is None:
            raise BackendUnavailableError(
                f"backend {name!r} cannot decode the shared caches (PackedKVCache, DenseKVCache): its decode needs "
                "its own cache"
            )
        return backend
    why = {}
    decoders = sorted((registry.get(n) for n in registry.names()), key=lambda b: -(b.decode_priority or 0))
    for backend in (b for b in decoders if b.decode_priority is not None):
        reasons = _reasons(backend, inputs)
        if not reasons:
            return backend
        why[backend.name] = reasons
    detail = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in why.items())
    raise BackendUnavailableError(f"no backend can decode these inputs:\n{detail}")


def _announce(backend: Backend, inputs: Inputs) -> None:
    """Once per process, the first choice of "auto" (a model routes once per layer and step)."""
    if _ANNOUNCED:
        return
    where = f"{inputs.device.type}/{inputs.dtype}"
    _ANNOUNCED.add((backend.name, where))
    warnings.warn(
        f"tca: backend='auto' chose {backend.name!r} for {where} inputs "
        "(name a backend to choose yourself, or filter tca.BackendChoiceWarning)",
        BackendChoiceWarning,
        stacklevel=_caller_stacklevel(),
    )


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _caller_stacklevel() -> int:
    """The warnings stacklevel of the first frame outside the tca package, so a warning points at user code."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    return level

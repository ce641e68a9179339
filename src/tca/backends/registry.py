"""Backend registry: each backend declares what it supports and answers *reasons it cannot run*.

As in xformers' dispatch: `backend="auto"` takes the usable backend of highest priority (the reference is
the last resort) and says once which it chose; a named backend that cannot run raises an error listing
its reasons; an unknown name lists the known ones. Implementations are imported lazily, on first use, so
`import tca` never imports triton, flash_attn or transformers. What an implementation provides is the
`TCABackend` protocol (implementation.py); what it cannot do is declared here, as capabilities with reasons.

`resolve` is memoised per (name, device type, dtype, head dim, capabilities): probing the environment (package
lookups, GPU properties) costs 0.1-0.4 ms, too much for every attention call of a decode loop. `forget()`
drops the memo (after installing a package at runtime, or changing an environment variable a backend reads).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

# What a backend may lack, beyond devices, dtypes and head dims (declared in Backend.lacks with a reason):
#   gradients    backward through attention / prefill (inputs that require grad)
#   decode       stateful prefill + decode on a compressed cache
#   varlen       a left-padded batch prefilled in one call (`prefill_padded`, sequences of different lengths)
#   calibration  retained_mass over calibration rows (section 6), chunked
#   chunked_prefill  a prompt prefilled chunk by chunk (docs/semantics.md section 5b): exact_chunk,
#                exact_finish, empty_cache and streaming_chunk on the implementation
CAPABILITIES = ("gradients", "decode", "varlen", "calibration", "chunked_prefill")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run these inputs here; the message lists why."""


class BackendChoiceWarning(UserWarning):
    """Emitted once per process, the first time backend="auto" picks a backend (filter it to silence)."""


@dataclass(frozen=True)
class Backend:
    """What a backend supports, and where its implementation lives.

    implementation: "module:attribute", imported on first use; the object follows tca.backends.implementation
        (TCABackend): attention, select, select_indices, attend, and prefill / decode unless it lacks "decode",
        retained_mass unless it lacks "calibration", on "bhsd" inputs that passed validation.
    lacks: (capability, why not) pairs, capabilities from CAPABILITIES; anything not listed is supported.
    environment: extra checks of the machine (e.g. a GPU capability), returning reasons.
    """

    name: str
    summary: str
    implementation: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...] | None = None  # None: any head dim
    lacks: tuple[tuple[str, str], ...] = ()
    priority: int = 0  # "auto" prefers higher
    # Decoding on the shared PackedKVCache: "auto" takes the usable backend of highest decode_priority, whatever
    # backend prefilled (prefill and decode are chosen per phase). None: it cannot decode a PackedKVCache.
    decode_priority: int | None = None
    requires: tuple[tuple[str, str], ...] = ()  # (module, how to install)
    environment: Callable[[], list[str]] | None = field(default=None, compare=False)
    needs: str = ""  # what `environment` checks, in words (for docs and `tca info`)

    def __post_init__(self) -> None:
        unknown = [c for c, _ in self.lacks if c not in CAPABILITIES]
        if unknown:
            raise ValueError(f"backend {self.name!r} lacks unknown capabilities {unknown}; known: {CAPABILITIES}")

    def lacks_reason(self, capability: str) -> str | None:
        """Why this backend lacks `capability`, or None when it has it."""
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
        return dict(self.lacks).get(capability)

    def supports(self, capability: str) -> bool:
        return self.lacks_reason(capability) is None

    @property
    def has_decode(self) -> bool:
        return self.supports("decode")

    @property
    def has_chunked_prefill(self) -> bool:
        return self.supports("chunked_prefill")

    def environment_reasons(self) -> list[str]:
        """Why this backend cannot run on this machine at all (missing packages, settings)."""
        reasons = [
            f"package '{module}' is not installed ({hint})"
            for module, hint in self.requires
            if importlib.util.find_spec(module) is None
        ]
        if not reasons and self.environment is not None:
            reasons += self.environment()
        return reasons

    def input_reasons(
        self, device: torch.device, dtype: torch.dtype, head_dim: int, decode: bool = False, needs: Iterable[str] = ()
    ) -> list[str]:
        """Why this backend cannot run inputs of this device, dtype and head dim, with these capabilities."""
        reasons = []
        if device.type not in self.devices:
            reasons.append(f"device '{device.type}' is not supported (supports {', '.join(self.devices)})")
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {str(dtype).removeprefix('torch.')} is not supported (supports {names})")
        if self.head_dims is not None and head_dim not in self.head_dims:
            reasons.append(f"head dim {head_dim} is not supported (supports {', '.join(map(str, self.head_dims))})")
        if decode and not self.has_decode:
            reasons.append(f"stateful decoding is not implemented ({self.lacks_reason('decode')})")
        for capability in needs:
            why = self.lacks_reason(capability)
            if why is not None and capability == "chunked_prefill":
                reasons.append(chunked_prefill_missing())
            elif why is not None and capability != "decode":
                reasons.append(f"no {capability}: {why}")
        return reasons

    def reasons(self, device, dtype, head_dim, decode=False, needs: Iterable[str] = ()) -> list[str]:
        return self.environment_reasons() + self.input_reasons(torch.device(device), dtype, head_dim, decode, needs)

    def load(self):
        module, _, attribute = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attribute)


_REGISTRY: dict[str, Backend] = {}
_ANNOUNCED: set[tuple[str, str]] = set()
_RESOLVED: dict[tuple, tuple[Backend | None, list[str] | dict[str, list[str]]]] = {}


def register(backend: Backend) -> Backend:
    """Add a backend (replacing one of the same name). Returns it, so it can decorate a module constant."""
    _REGISTRY[backend.name] = backend
    forget()
    return backend


def unregister(name: str) -> Backend | None:
    """Remove a backend (tests); returns it, or None if no backend had that name."""
    forget()
    return _REGISTRY.pop(name, None)


def forget() -> None:
    """Drop what resolve() remembered: the next call probes the environment again."""
    _RESOLVED.clear()
    _DECODE_CHOICES.clear()


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(names())} (or 'auto')")
    return _REGISTRY[name]


def names() -> list[str]:
    """All registered backends, highest auto priority first."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


def resolve(name: str, device, dtype: torch.dtype, head_dim: int, decode: bool = False, needs: Iterable[str] = ()):
    """The backend to run: the named one if it can, or for "auto" the best usable one.

    needs: capabilities the call requires (e.g. ("gradients",) when an input requires grad). Memoised per
    (name, device type, dtype, head dim, decode, needs) and per registry contents (see forget()).
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string (a name or 'auto'), got {type(name).__name__}")
    device = torch.device(device)
    needs = tuple(sorted(set(needs)))
    key = (name, device.type, dtype, head_dim, decode, needs, id(_REGISTRY), len(_REGISTRY))
    found = _RESOLVED.get(key)
    if found is None:
        found = _RESOLVED[key] = _choose(name, device, dtype, head_dim, decode, needs)
    backend, why = found
    if backend is None:
        if name != "auto":
            raise BackendUnavailableError(f"backend {name!r} cannot run here: " + "; ".join(why))
        detail = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in why.items())
        raise BackendUnavailableError(f"no backend can run these inputs:\n{detail}")
    if name == "auto":
        announce = (backend.name, f"{device.type}/{dtype}")
        if not _ANNOUNCED:  # once per process: the first choice (a model calls this once per layer and step)
            _ANNOUNCED.add(announce)
            warnings.warn(
                f"tca: backend='auto' chose {backend.name!r} for {announce[1]} inputs "
                "(name a backend to choose yourself, or filter tca.BackendChoiceWarning)",
                BackendChoiceWarning,
                stacklevel=_caller_stacklevel(),
            )
    return backend


def usable(name: str, device, dtype: torch.dtype, head_dim: int, needs: Iterable[str] = ()) -> bool:
    """Whether the named backend can run such inputs here (memoised like resolve, never warns)."""
    try:
        resolve(name, device, dtype, head_dim, needs=needs)
    except BackendUnavailableError:
        return False
    return True


def _choose(name, device, dtype, head_dim, decode, needs):
    """(backend, None) or (None, its reasons) for a name; (None, {name: reasons}) when "auto" finds none."""
    if name != "auto":
        backend = get(name)
        reasons = backend.reasons(device, dtype, head_dim, decode, needs)
        return (None, reasons) if reasons else (backend, None)
    why = {}
    for candidate in names():
        backend = _REGISTRY[candidate]
        reasons = backend.reasons(device, dtype, head_dim, decode, needs)
        if not reasons:
            return backend, None
        why[candidate] = reasons
    return None, why


def chunked_prefill_missing() -> str:
    """The reason a backend without chunked prefill gives, naming those that have it."""
    having = [n for n in names() if _REGISTRY[n].has_chunked_prefill]
    return f"chunked prefill is not implemented (chunked prefill is implemented on: {', '.join(having) or 'none'})"


_DECODE_CHOICES: dict[tuple, Backend] = {}


def resolve_decode(name: str, device, dtype: torch.dtype, head_dim: int) -> Backend:
    """The backend whose kernels decode a PackedKVCache: the named one, or for "auto" the usable one of highest
    decode_priority (each phase takes its fastest backend: e.g. flash prefill, triton decode).

    Memoised per (name, device type, dtype, head dim), and forgotten with forget()."""
    key = (name, torch.device(device).type, dtype, head_dim)
    choice = _DECODE_CHOICES.get(key)
    if choice is None:
        choice = _DECODE_CHOICES[key] = _resolve_decode(name, device, dtype, head_dim)
    return choice


def _resolve_decode(name: str, device, dtype: torch.dtype, head_dim: int) -> Backend:
    if name != "auto":
        backend = resolve(name, device, dtype, head_dim, decode=True)
        if backend.decode_priority is None:
            raise BackendUnavailableError(f"backend {name!r} cannot decode the shared caches (PackedKVCache, DenseKVCache): its decode needs its own cache")
        return backend
    why = {}
    candidates = sorted((b for b in _REGISTRY.values() if b.decode_priority is not None), key=lambda b: -b.decode_priority)
    for backend in candidates:
        reasons = backend.reasons(device, dtype, head_dim, decode=True)
        if not reasons:
            return backend
        why[backend.name] = reasons
    detail = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in why.items())
    raise BackendUnavailableError(f"no backend can decode these inputs:\n{detail}")


def report(device=None, dtype=None, head_dim=None) -> list[dict]:
    """One row per backend: name, summary, usable (on this machine, or for these inputs), reasons."""
    rows = []
    for n in names():
        backend = _REGISTRY[n]
        reasons = backend.environment_reasons()
        if device is not None:
            reasons += backend.input_reasons(torch.device(device), dtype or torch.float32, head_dim or 64)
        elif not any(_device_present(d) for d in backend.devices):
            reasons.append(f"none of its devices ({', '.join(backend.devices)}) is present on this machine")
        rows.append(
            {
                "name": n,
                "summary": backend.summary,
                "usable": not reasons,
                "reasons": reasons,
                "devices": list(backend.devices),
                "dtypes": [str(d).removeprefix("torch.") for d in backend.dtypes],
                "head_dims": "any" if backend.head_dims is None else list(backend.head_dims),
                "decode": backend.has_decode,
                "chunked_prefill": backend.has_chunked_prefill,
                "lacks": dict(backend.lacks),
                "priority": backend.priority,
            }
        )
    return rows


def _device_present(device_type: str) -> bool:
    """Whether this machine has a device of this type (the CPU always)."""
    if device_type == "cpu":
        return True
    module = getattr(torch, device_type, None)
    is_available = getattr(module, "is_available", None)
    return bool(is_available and is_available())


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _caller_stacklevel() -> int:
    """The warnings stacklevel of the first frame outside the tca package, so a warning points at user code."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    return level

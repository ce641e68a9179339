"""Backend registry: each backend declares what it supports and answers *reasons it cannot run*.

A `Backend` record says where a backend runs (devices, dtypes, head dims, an input check of its own), what it
lacks (capabilities, each with a reason) and where its implementation lives; the implementation is imported on
first use, so `import tca` never imports triton, flash_attn or transformers. What an implementation provides is
the `TCABackend` protocol (implementation.py). Choosing among the backends is routing's (routing.py): the
registry only declares and answers.
"""

from __future__ import annotations

import importlib
import importlib.util
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
#   lse          the log-sum-exp of each query row returned with the output (return_lse=True)
CAPABILITIES = ("gradients", "decode", "varlen", "calibration", "chunked_prefill", "lse")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run these inputs here; the message lists why."""


class BackendChoiceWarning(UserWarning):
    """Emitted once per process, the first time backend="auto" picks a backend (filter it to silence; routing.py)."""


@dataclass(frozen=True)
class Backend:
    """What a backend supports, and where its implementation lives.

    implementation: "module:attribute", imported on first use; the object follows tca.backends.implementation
        (TCABackend): attention, select, select_indices, attend, and prefill / decode unless it lacks "decode",
        retained_mass unless it lacks "calibration", on "bhsd" inputs that passed validation.
    lacks: (capability, why not) pairs, capabilities from CAPABILITIES; anything not listed is supported.
    environment: extra checks of the machine (e.g. a GPU capability), returning reasons.
    input_check: extra checks of the inputs (device, dtype, head dim) beyond the declared lists, returning reasons
        (flash: what the installed FlashAttention generation runs).
    computes: "tca" (TCA-Attention with the plan's budgets) or "dense" (exact causal attention: the dense
        backend, which routing runs below the crossover; `names()` lists only the TCA ones).
    own_cache: its prefill makes a cache of its own type, which only it decodes (the oracle's); the others
        make the shared caches (backends/common), which any backend with a decode_priority decodes.
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
    input_check: Callable[[torch.device, torch.dtype, int], list[str]] | None = field(default=None, compare=False)
    computes: str = "tca"
    own_cache: bool = False

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

    def input_reasons(self, device: torch.device, dtype: torch.dtype, head_dim: int, needs: Iterable[str] = ()) -> list[str]:
        """Why this backend cannot run inputs of this device, dtype and head dim, with these capabilities."""
        reasons = []
        if device.type not in self.devices:
            reasons.append(f"device '{device.type}' is not supported (supports {', '.join(self.devices)})")
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {str(dtype).removeprefix('torch.')} is not supported (supports {names})")
        if self.head_dims is not None and head_dim not in self.head_dims:
            reasons.append(f"head dim {head_dim} is not supported (supports {', '.join(map(str, self.head_dims))})")
        if not reasons and self.input_check is not None:
            reasons += self.input_check(device, dtype, head_dim)
        for capability in needs:
            why = self.lacks_reason(capability)
            if why is None:
                continue
            if capability == "decode":
                reasons.append(f"stateful decoding is not implemented ({why})")
            elif capability == "chunked_prefill":
                reasons.append(chunked_prefill_missing())
            else:
                reasons.append(f"no {capability}: {why}")
        return reasons

    def reasons(self, device, dtype, head_dim, needs: Iterable[str] = ()) -> list[str]:
        """Why this backend cannot run such inputs here (machine first, then inputs); empty when it can."""
        return self.environment_reasons() + self.input_reasons(torch.device(device), dtype, head_dim, needs)

    def load(self):
        module, _, attribute = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attribute)


_REGISTRY: dict[str, Backend] = {}
_LISTENERS: list[Callable[[], None]] = []


def on_change(listener: Callable[[], None]) -> None:
    """Call `listener` whenever a backend is registered or removed (routing drops its memoised choices)."""
    _LISTENERS.append(listener)


def register(backend: Backend) -> Backend:
    """Add a backend (replacing one of the same name). Returns it, so it can decorate a module constant."""
    _REGISTRY[backend.name] = backend
    forget()
    return backend


def unregister(name: str) -> Backend | None:
    """Remove a backend (tests); returns it, or None if no backend had that name."""
    removed = _REGISTRY.pop(name, None)
    forget()
    return removed


def forget() -> None:
    """Drop every answer derived from the registry and the environment (routing's memoised choices)."""
    for listener in _LISTENERS:
        listener()


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(names(every=True))} (or 'auto')")
    return _REGISTRY[name]


def names(every: bool = False) -> list[str]:
    """The registered backends that compute TCA-Attention, highest auto priority first; every=True adds the
    dense backend (exact causal attention, which routing puts first below the crossover)."""
    chosen = (b for b in _REGISTRY.values() if every or b.computes == "tca")
    return [b.name for b in sorted(chosen, key=lambda b: -b.priority)]


def chunked_prefill_missing() -> str:
    """The reason a backend without chunked prefill gives, naming those that have it."""
    having = [n for n in names() if _REGISTRY[n].has_chunked_prefill]
    return f"chunked prefill is not implemented (chunked prefill is implemented on: {', '.join(having) or 'none'})"


def report(device=None, dtype=None, head_dim=None) -> list[dict]:
    """One row per backend: name, summary, usable (on this machine, or for these inputs), reasons."""
    rows = []
    for n in names(every=True):
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
                "computes": backend.computes,
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

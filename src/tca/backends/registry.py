"""Backend registry: each backend declares what it supports and answers *reasons it cannot run*.

As in xformers' dispatch: `backend="auto"` takes the usable backend of highest priority (the reference is
the last resort) and says once which it chose; a named backend that cannot run raises an error listing
its reasons; an unknown name lists the known ones. Implementations are imported lazily, on first use, so
`import tca` never imports triton, flash_attn or transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run these inputs here; the message lists why."""


class BackendChoiceWarning(UserWarning):
    """Emitted once per process, the first time backend="auto" picks a backend (filter it to silence)."""


@dataclass(frozen=True)
class Backend:
    """What a backend supports, and where its implementation lives.

    implementation: "module:attribute", imported on first use; the object provides
        attention(q, k, v, budgets, config, scale, return_lse), prefill(q, k, v, budgets, config, scale)
        and decode(q, k, v, cache), on "bhsd" inputs that passed validation; select(...) and attend(...)
        when it can also run the two halves (for the layered tests).
    environment: extra checks of the machine (e.g. a GPU capability), returning reasons.
    """

    name: str
    summary: str
    implementation: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...] | None = None  # None: any head dim
    has_decode: bool = True
    priority: int = 0  # "auto" prefers higher
    requires: tuple[tuple[str, str], ...] = ()  # (module, how to install)
    environment: Callable[[], list[str]] | None = field(default=None, compare=False)
    needs: str = ""  # what `environment` checks, in words (for docs and `tca info`)

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

    def input_reasons(self, device: torch.device, dtype: torch.dtype, head_dim: int, decode: bool = False) -> list[str]:
        """Why this backend cannot run inputs of this device, dtype and head dim."""
        reasons = []
        if device.type not in self.devices:
            reasons.append(f"device '{device.type}' is not supported (supports {', '.join(self.devices)})")
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {str(dtype).removeprefix('torch.')} is not supported (supports {names})")
        if self.head_dims is not None and head_dim not in self.head_dims:
            reasons.append(f"head dim {head_dim} is not supported (supports {', '.join(map(str, self.head_dims))})")
        if decode and not self.has_decode:
            reasons.append("stateful decoding is not implemented")
        return reasons

    def reasons(self, device, dtype, head_dim, decode=False) -> list[str]:
        return self.environment_reasons() + self.input_reasons(torch.device(device), dtype, head_dim, decode)

    def load(self):
        module, _, attribute = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attribute)


_REGISTRY: dict[str, Backend] = {}
_ANNOUNCED: set[tuple[str, str]] = set()


def register(backend: Backend) -> Backend:
    """Add a backend (replacing one of the same name). Returns it, so it can decorate a module constant."""
    _REGISTRY[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(names())} (or 'auto')")
    return _REGISTRY[name]


def names() -> list[str]:
    """All registered backends, highest auto priority first."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


def resolve(name: str, device, dtype: torch.dtype, head_dim: int, decode: bool = False) -> Backend:
    """The backend to run: the named one if it can, or for "auto" the best usable one."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string (a name or 'auto'), got {type(name).__name__}")
    if name != "auto":
        backend = get(name)
        reasons = backend.reasons(device, dtype, head_dim, decode)
        if reasons:
            raise BackendUnavailableError(f"backend {name!r} cannot run here: " + "; ".join(reasons))
        return backend
    why = {}
    for candidate in names():
        backend = _REGISTRY[candidate]
        reasons = backend.reasons(device, dtype, head_dim, decode)
        if not reasons:
            key = (backend.name, f"{torch.device(device).type}/{dtype}")
            if not _ANNOUNCED:  # once per process: the first choice (a model calls this once per layer and step)
                _ANNOUNCED.add(key)
                warnings.warn(
                    f"tca: backend='auto' chose {backend.name!r} for {key[1]} inputs "
                    "(name a backend to choose yourself, or filter tca.BackendChoiceWarning)",
                    BackendChoiceWarning,
                    stacklevel=_caller_stacklevel(),
                )
            return backend
        why[candidate] = reasons
    detail = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in why.items())
    raise BackendUnavailableError(f"no backend can run these inputs:\n{detail}")


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

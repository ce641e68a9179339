"""What vLLM loads as the CUSTOM attention backend: the CUDA backend on CUDA platforms, the CPU one elsewhere.

Looked up when a layer picks its backend, after vLLM has chosen its platform (the plugin registers before that).
"""

from __future__ import annotations


def __getattr__(name: str):
    if name != "Backend":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        from .cuda import TCAFlashBackend

        return TCAFlashBackend
    from .backend import TCAAttentionBackend

    return TCAAttentionBackend

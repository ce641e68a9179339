"""What vLLM's CPU platform loads as CPU_ATTN: TCA when `--attention-backend CUSTOM` was asked, else vLLM's own.

vLLM's CPU platform always answers CPU_ATTN, whatever backend was requested; the plugin points CPU_ATTN's class
path here, and `Backend` is looked up when a layer picks its backend, with that engine's config current.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name != "Backend":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from vllm.config import get_current_vllm_config
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if get_current_vllm_config().attention_config.backend == AttentionBackendEnum.CUSTOM:
        from .backend import TCAAttentionBackend

        return TCAAttentionBackend
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return CPUAttentionBackend

"""TCA-Attention as a vLLM attention backend, shipped as a vLLM plugin (docs/serving_vllm.md).

tca declares the entry point `vllm.general_plugins: tca = tca.serving.vllm:register`; vLLM calls `register`
in every process it starts. Serve with `--attention-backend CUSTOM` (LLM(..., attention_backend="CUSTOM"));
budgets come from TCA_VLLM_PLAN (settings.py). Nothing here is imported by `import tca`, and vLLM itself is
imported only inside `register` and by the modules vLLM loads through the registered class paths.

Modules: settings (environment), checks (refused configurations), compat (supported vLLM versions), paged
(reading vLLM's pages), sequence (TCA per sequence), layer (one layer's rows loop), paged_states (the decode
states in page-shaped pools and the batched decode step), cuda (the CUDA backend: vLLM's FlashAttention plus
TCA), backend (the CPU backend: vLLM's CPU backend plus TCA), custom and cpu_switch (which class a platform
loads), memory (KV bytes held and read), stats (those bytes in /metrics and the log of a served engine),
store_layout and store_specs (a compressed store's sizing and KV-cache specs, not yet used by the engine).
"""

from __future__ import annotations

from .memory import kv_usage

__all__ = ["kv_usage", "register"]

BACKEND_PATH = "tca.serving.vllm.custom.Backend"  # the CUDA or the CPU backend, by platform
CPU_SWITCH_PATH = "tca.serving.vllm.cpu_switch.Backend"


def register() -> None:
    """vLLM plugin entry point: TCA becomes AttentionBackendEnum.CUSTOM; on CPU, CPU_ATTN routes to it when chosen.

    Safe to call many times (vLLM may load plugins more than once per process).
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    # The CPU platform loads CPU_ATTN whatever was asked; cpu_switch gives vLLM's own class back unless the
    # engine asked for CUSTOM, so installing tca changes nothing for engines that do not select it.
    register_backend(AttentionBackendEnum.CPU_ATTN, CPU_SWITCH_PATH)
    from .stats import prepare

    prepare()  # /metrics of a served engine: the API server process loads plugins before it starts the engine

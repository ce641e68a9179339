"""Engine settings the TCA backend cannot honour, refused up front with the flag that fixes each.

Reads only attributes of vLLM's config objects (no vLLM import), so the rules are testable without vLLM.
Chunked prefill is supported (each chunk selects from its own last row, docs/serving_vllm.md), so it is not here.
"""

from __future__ import annotations


def engine_problems(vllm_config) -> list[str]:
    """Why this vLLM configuration cannot run TCA (empty when it can), each naming the setting to change."""
    problems = []
    cache = vllm_config.cache_config
    if getattr(cache, "enable_prefix_caching", False):
        problems.append(
            "prefix caching shares KV pages between requests, and TCA keeps one selection per request, keyed by "
            "its first page: turn it off with --no-enable-prefix-caching (LLM(..., enable_prefix_caching=False))"
        )
    if getattr(cache, "cache_dtype", "auto") != "auto":
        problems.append(
            f"KV cache dtype {cache.cache_dtype!r} (quantized pages) is not supported: use --kv-cache-dtype auto"
        )
    if getattr(vllm_config, "speculative_config", None) is not None:
        problems.append(
            "speculative decoding verifies several tokens per step, which TCA's one-token decode state does not "
            "follow: remove --speculative-config"
        )
    parallel = vllm_config.parallel_config
    for name, flag in (
        ("decode_context_parallel_size", "--decode-context-parallel-size 1"),
        ("prefill_context_parallel_size", "--prefill-context-parallel-size 1"),
    ):
        if getattr(parallel, name, 1) > 1:
            problems.append(f"context parallelism splits a sequence's KV cache across ranks: use {flag}")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        problems.append(
            "a KV connector brings sequences whose earlier tokens were computed elsewhere, with no TCA state for them: "
            "remove --kv-transfer-config"
        )
    if getattr(vllm_config.model_config, "enable_sleep_mode", False):
        problems.append(
            "sleep mode gives back the KV cache's memory, and the TCA decode states made beside it come back "
            "undefined: remove --enable-sleep-mode"
        )
    if getattr(parallel, "enable_dbo", False) or getattr(parallel, "ubatch_size", 0) > 1:
        problems.append(
            "micro-batching gives each micro-batch its own attention metadata builder, while the TCA backend keeps "
            "every sequence's decode state with one: remove --enable-dbo and --ubatch-size"
        )
    return problems


def layer_problems(*, alibi_slopes, sliding_window, logits_soft_cap, sinks, attn_type: str, decoder: str) -> list[str]:
    """Why this attention layer cannot run TCA: features of the model, not of the engine."""
    problems = []
    if attn_type != decoder:
        problems.append(f"attention type {attn_type!r} (TCA is causal decoder self-attention only)")
    if alibi_slopes is not None:
        problems.append("ALiBi position biases")
    if sliding_window is not None:
        problems.append("a sliding window (TCA already keeps a local window of its own)")
    if logits_soft_cap:
        problems.append("logit soft-capping")
    if sinks is not None:
        problems.append("attention sinks")
    return problems


def refuse(vllm_config) -> None:
    """Raise one ValueError listing every engine setting TCA cannot honour (nothing when it can)."""
    problems = engine_problems(vllm_config)
    if problems:
        raise ValueError("the TCA attention backend cannot run this vLLM configuration:\n  - " + "\n  - ".join(problems))


def refuse_layer(**layer) -> None:
    """Raise a ValueError naming the features of this attention layer that TCA cannot run (see layer_problems)."""
    problems = layer_problems(**layer)
    if problems:
        raise ValueError(
            "the TCA attention backend cannot run this model's attention: it uses " + "; ".join(problems)
            + "; serve it with vLLM's own backend (drop --attention-backend CUSTOM)"
        )


def layer_settings(*, num_kv_heads: int, head_size: int, decoder: str, **layer):
    """The plugin's settings for one attention layer being built, once the layer's features (layer_problems), the
    engine's settings and the plugin's (plan against the model, tca backend on this device) are accepted: this runs
    before any weight loads, so a bad setting stops the server at start-up, not at its first request."""
    import torch
    from vllm.config import get_current_vllm_config
    from vllm.distributed import get_tensor_model_parallel_world_size

    from .compat import version_problem
    from .settings import Settings

    problem = version_problem()
    if problem:
        raise ValueError(problem)
    refuse_layer(decoder=decoder, **layer)
    vllm_config = get_current_vllm_config()
    refuse(vllm_config)
    settings = Settings.from_environment()
    model = vllm_config.model_config
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    settings.check_model(model.get_total_num_hidden_layers(), num_kv_heads, get_tensor_model_parallel_world_size(),
                         device, model.dtype, head_size)
    return settings


def log_settings(vllm_config, dense_below: int, attention: str) -> None:
    """The start-up log line of an engine that asked for TCA (under vLLM's logger, so that its handlers print it)."""
    import logging

    from .settings import Settings

    logging.getLogger("vllm.tca").info(
        "%s; max_model_len %d: %s", Settings.from_environment().describe(dense_below),
        vllm_config.model_config.max_model_len, attention,
    )

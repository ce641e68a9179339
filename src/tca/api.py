"""Public entry points: stateless `attention`, stateful `prefill` + `decode`.

Inputs are validated once here (validation.py); backends get "bhsd" tensors, float64 budgets [HKV, len(K)]
and a scale, and are chosen through the registry.
"""

from __future__ import annotations

import torch

from .backends import registry
from .config import TCAConfig
from .validation import check_budgets, check_config, check_scale, from_bhsd, to_bhsd


def _prepare(q, k, v, budgets, config, scale, layout, backend, decode=False):
    config = check_config(config)
    q, k, v = to_bhsd(q, k, v, layout)
    scale = check_scale(scale, q.shape[-1])
    budgets = check_budgets(budgets, k.shape[1], config, q.device)
    impl = registry.resolve(backend, q.device, q.dtype, q.shape[-1], decode=decode).load()
    return q, k, v, budgets, config, scale, impl


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    budgets: torch.Tensor | None = None,
    config: TCAConfig | None = None,
    scale: float | None = None,
    layout: str | None = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """TCA-Attention (docs/semantics.md section 4), a drop-in for causal attention.

    q: [B, HQ, LQ, D], k, v: [B, HKV, L, D] ("bhsd", SDPA's layout) or [B, L, H, D] with layout="bshd".
    layout None means "bhsd", with one guard: more than 256 KV heads is refused as a likely [B, L, H, D]
    mistake (pass layout="bhsd" to confirm such a shape).
    Queries are aligned to the end of the keys (bottom-right causal, LQ <= L). The selection is made from
    the last query row. budgets: None (the defaults), [len(K)] or [HKV, len(K)] probabilities over the retain
    counts K = 1, 2, 4, ..., block_size. Returns out in q's layout and dtype, and with return_lse=True also
    lse [B, HQ, LQ] (float32, or float64 for float64 inputs).
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    q, k, v, budgets, config, scale, impl = _prepare(q, k, v, budgets, config, scale, layout, backend)
    result = impl.attention(q, k, v, budgets, config, scale, return_lse)
    if return_lse:
        out, lse = result
        return from_bhsd(out, layout), lse
    return from_bhsd(result, layout)


def prefill(q, k, v, *, budgets=None, config=None, scale=None, layout=None, backend="auto"):
    """Prefill a prompt: TCA attention over it (LQ == L) and the compressed KV cache of section 5.

    Returns (out, cache). The cache keeps, per batch element and KV head, exactly the selected global
    tokens and the local window; `cache.nbytes` is its real size. Continue with `decode`.
    """
    q, k, v, budgets, config, scale, impl = _prepare(q, k, v, budgets, config, scale, layout, backend, decode=True)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"prefill needs one query per key (LQ == L), got LQ={q.shape[2]}, L={k.shape[2]}; "
            "use tca.attention for LQ < L"
        )
    out, cache = impl.prefill(q, k, v, budgets, config, scale)
    cache.num_query_heads = q.shape[1]  # decode checks it: another head count would silently regroup heads
    return from_bhsd(out, layout), cache


def decode(q, k, v, cache, *, layout=None):
    """Decode one token: append its key/value to `cache`, compress the block leaving the window, attend.

    q: [B, HQ, 1, D], k, v: [B, HKV, 1, D] (or "bshd"). Runs on the backend that made the cache; mutates it.
    """
    q, k, v = to_bhsd(q, k, v, layout)
    for name in ("backend", "seq_len", "num_kv_heads"):
        if not hasattr(cache, name):
            raise TypeError(f"cache must be a cache returned by tca.prefill, got {type(cache).__name__}")
    if q.shape[2] != 1 or k.shape[2] != 1:
        raise ValueError(f"decode takes one new token: q and k must have 1 position, got {q.shape[2]} and {k.shape[2]}")
    if k.shape[1] != cache.num_kv_heads:
        raise ValueError(f"the cache has {cache.num_kv_heads} KV heads but k has {k.shape[1]}")
    # Caches that know their batch size and head dim (reference, packed) are checked too: a mismatch
    # would otherwise fail deep inside a backend, or silently decode the wrong sequences.
    checked = (
        ("batch size", "batch_size", k.shape[0]),
        ("head dim", "head_dim", k.shape[-1]),
        ("number of query heads", "num_query_heads", q.shape[1]),
    )
    for what, name, given in checked:
        expected = getattr(cache, name, None)
        if expected is not None and expected != given:
            raise ValueError(
                f"the cache has {what} {expected} but the new token has {given}; decode continues the "
                "sequences that tca.prefill started, with the same shapes"
            )
    for what, given in (("dtype", q.dtype), ("device", q.device)):
        expected = getattr(cache, what, None)
        if expected is not None and expected != given:
            raise ValueError(
                f"the cache holds {what} {expected} but the new token is {given}; decode with the same {what} "
                "as tca.prefill (convert with .to(...))"
            )
    impl = registry.get(cache.backend).load()
    return from_bhsd(impl.decode(q, k, v, cache), layout)


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, in backend="auto" order."""
    return [row["name"] for row in registry.report() if row["usable"]]

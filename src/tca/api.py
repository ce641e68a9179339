"""Public entry points: stateless `attention`, stateful `prefill` + `decode`, and a long prompt chunk by chunk
(`start_prefill`, `prefill_chunk`, `finish_prefill`, `prefill_in_chunks`).

Inputs are validated once here (validation.py); each call is routed once (backends/routing.py: one record of
its inputs, one bound choice), and the chosen backend gets "bhsd" tensors, float64 budgets [HKV, len(K)] and a
scale, without coming back here.
"""

from __future__ import annotations

from functools import partial

import torch

from .backends import registry, routing
from .backends.common.cache_protocol import Joinable, KVCache, Packable, Reselecting, decode_on_cache
from .backends.common.reselecting_cache import ReselectingCache
from .backends.routing import Inputs, Route
from .config import TCAConfig
from .inference_tensors import leave_inference_tensors
from .padding import LeftPadding
from .policy import check_policy
from .prefill_state import MODES, ChunkedPrefill
from .validation import check_budgets, check_config, check_scale, from_bhsd, to_bhsd


def _validated(q, k, v, budgets, config, scale, layout):
    """The inputs as every backend takes them: bhsd tensors, a TCAConfig, float64 budgets [HKV, len(K)], a scale."""
    config = check_config(config)
    q, k, v = to_bhsd(q, k, v, layout)
    scale = check_scale(scale, q.shape[-1])
    budgets = check_budgets(budgets, k.shape[1], config, q.device)
    return q, k, v, budgets, config, scale


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
    starts=None,
):
    """TCA-Attention (docs/semantics.md section 4), a drop-in for causal attention.

    q: [B, HQ, LQ, D], k, v: [B, HKV, L, D] ("bhsd", SDPA's layout) or [B, L, H, D] with layout="bshd".
    layout None means "bhsd", with one guard: more than 256 KV heads is refused as a likely [B, L, H, D]
    mistake (pass layout="bhsd" to confirm such a shape).
    Queries are aligned to the end of the keys (bottom-right causal, LQ <= L). The selection is made from
    the last query row. budgets: None (the defaults), [len(K)] or [HKV, len(K)] probabilities over the retain
    counts K = 1, 2, 4, ..., block_size. Returns out in q's layout and dtype, and with return_lse=True also
    lse [B, HQ, LQ] (float32, or float64 for float64 inputs).
    starts: a left-padded batch of whole prompts (LQ == L; section 9.1): starts[b] padding tokens precede sequence
    b. Each sequence is attended as if alone; padding rows get out 0 and lse -inf.
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    q, k, v, budgets, config, scale = _validated(q, k, v, budgets, config, scale, layout)
    padding = None if starts is None else LeftPadding.of(starts, k.shape[0], k.shape[2])
    if padding is not None and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"attention over a left-padded batch takes whole prompts (LQ == L), got LQ={q.shape[2]}, L={k.shape[2]}"
        )
    # Inputs that require grad route to a backend with a backward pass: "auto" picks one, a named one that has
    # none raises (never an output silently cut from the graph).
    inputs = Inputs.of(q, k, v, phase="attention", padded=padding is not None, lse=return_lse)
    chosen = routing.route(backend, inputs)
    impl = chosen.implementation
    if padding is None:
        result = impl.attention(q, k, v, budgets, config, scale, return_lse)
    elif chosen.runs_in_one_call(inputs):
        result = impl.attention_padded(q, k, v, padding, budgets, config, scale, return_lse)
    else:
        result = _attention_one_by_one(impl, q, k, v, padding, budgets, config, scale, return_lse)
    if return_lse:
        out, lse = result
        return from_bhsd(out, layout), lse
    return from_bhsd(result, layout)


def prefill(q, k, v, *, budgets=None, config=None, scale=None, layout=None, backend="auto", policy=None, starts=None):
    """Prefill a prompt: TCA attention over it (LQ == L) and the compressed KV cache of section 5.

    Returns (out, cache). The cache keeps, per batch element and KV head, exactly the selected global
    tokens and the local window; `cache.nbytes` is its real size. Continue with `decode`.
    policy: None (section 5, the paper's rule: evicted tokens are dropped) or tca.Reselect(every=N, offload=...)
    (section 5c: evicted tokens are kept, on the device or in host memory, and the active tokens are chosen again
    by the current query every N decode steps; every=0 is section 5; blocks=M lets only the evicted tokens of the M
    blocks whose key summaries bound the query's logits highest compete). Below the crossover, backend="auto" returns the
    dense path's cache whatever the policy: it keeps and attends every token, so there is nothing to re-select.
    starts: a left-padded batch (section 9.1): starts[b] padding tokens precede sequence b (ints, or a 1D integer
    tensor of B). Each sequence is prefilled as if alone; padding rows of out are 0 and the cache holds each
    sequence at its own length. A backend with "varlen" (triton) prefills the batch in one call, torch and flash one
    sequence at a time (the reference's cache holds one length: it refuses); with backend="auto" the padded length
    picks one path for the whole batch.
    """
    policy = check_policy(policy)
    q, k, v, budgets, config, scale = _validated(q, k, v, budgets, config, scale, layout)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"prefill needs one query per key (LQ == L), got LQ={q.shape[2]}, L={k.shape[2]}; "
            "use tca.attention for LQ < L"
        )
    padding = None if starts is None else LeftPadding.of(starts, k.shape[0], k.shape[2])
    inputs = Inputs.of(q, k, v, phase="prefill", padded=padding is not None)
    chosen = routing.route(backend, inputs)
    if padding is None:
        out, cache = _prefill_on(chosen, q, k, v, budgets, config, scale, policy)
        return from_bhsd(out, layout), cache
    if chosen.backend.own_cache:  # its cache holds one length for the whole batch (the reference's)
        raise ValueError(
            f"padded batches need a backend with the packed cache (torch, triton or flash), not {chosen.name!r}: "
            "its cache holds one length for the whole batch; run the sequences one at a time"
        )
    if chosen.runs_in_one_call(inputs) and (policy is None or not policy.active):
        out, cache = chosen.implementation.prefill_padded(q, k, v, padding, budgets, config, scale)
        _bind_kernels(cache, chosen)
    else:
        out, cache = _prefill_one_by_one(chosen, q, k, v, padding, budgets, config, scale, policy)
    return from_bhsd(out, layout), cache


def _prefill_on(chosen: Route, q, k, v, budgets, config, scale, policy):
    """One prefill (bhsd, validated) on the route: the backend's prefill, the route's decode kernels bound to the
    cache, and the section 5c store around it when the policy re-selects."""
    out, cache = chosen.implementation.prefill(q, k, v, budgets, config, scale)  # the cache records q's heads
    _bind_kernels(cache, chosen)
    if policy is not None and policy.active and chosen.backend.computes == "tca":
        cache = _reselecting(cache, k, v, policy)  # the dense path's cache evicts nothing: nothing to re-select
    return out, cache


def _bind_kernels(cache, chosen: Route) -> None:
    """A shared cache keeps the decode kernels of the route; a cache of one backend's own type (`cache.backend`,
    the reference's) decodes on that backend and takes none."""
    kernels = chosen.decode_kernels
    if kernels is not None and cache.backend is None:
        cache.use_kernels(kernels)


def _attention_one_by_one(impl, q, k, v, padding: LeftPadding, budgets, config, scale, return_lse):
    """Stateless attention over a left-padded batch (bhsd, validated), each sequence on its own tokens: what a
    backend without "varlen" does."""
    out, lse = torch.zeros_like(q), None
    for b, pad in enumerate(padding.starts):
        own = (q[b : b + 1, :, pad:], k[b : b + 1, :, pad:], v[b : b + 1, :, pad:])
        result = impl.attention(*own, budgets, config, scale, return_lse)
        out_b, lse_b = result if return_lse else (result, None)
        out[b : b + 1, :, pad:] = out_b
        if return_lse:
            if lse is None:
                lse = torch.full(q.shape[:3], float("-inf"), device=q.device, dtype=lse_b.dtype)
            lse[b : b + 1, :, pad:] = lse_b
    return (out, lse) if return_lse else out


def _prefill_one_by_one(chosen: Route, q, k, v, padding: LeftPadding, budgets, config, scale, policy):
    """A left-padded batch (bhsd, validated) prefilled one sequence at a time on its own tokens, the caches joined
    into one of per-sequence lengths: what backends without "varlen" (or a re-selecting policy) do."""
    out = torch.zeros_like(q)
    caches = []
    for b, pad in enumerate(padding.starts):
        own = (q[b : b + 1, :, pad:], k[b : b + 1, :, pad:], v[b : b + 1, :, pad:])
        out[b : b + 1, :, pad:], cache_b = _prefill_on(chosen, *own, budgets, config, scale, policy)
        caches.append(cache_b)
    kind = type(caches[0])
    if not isinstance(caches[0], Joinable) or any(type(c) is not kind for c in caches):
        raise TypeError(f"the caches of a padded batch join into one only when they are of one joinable type, got "
                        f"{sorted({type(c).__name__ for c in caches})}")
    return out, kind.concat(caches)  # each cache records q's heads and its kernels, and so does the joined one


def prefill_one_by_one(q, k, v, padding: LeftPadding, budgets, config, scale, backend, policy=None):
    """A left-padded batch (bhsd, validated) prefilled one sequence at a time, on the route of the padded batch:
    what backends without "varlen" do (and the benchmarks' comparison)."""
    chosen = routing.route(backend, Inputs.of(q, k, v, phase="prefill", padded=True))
    return _prefill_one_by_one(chosen, q, k, v, padding, budgets, config, scale, policy)


def _reselecting(cache, k, v, policy):
    """The section 5c cache around a section 5 cache, its evicted store filled from the prompt's k, v."""
    if cache.backend == "reference":  # the oracle's cache (the oracle is loaded: it made the cache)
        from .reference.reselect import ReselectingReferenceCache

        return ReselectingReferenceCache.wrap(cache, k, v, policy.every, policy.blocks)
    return ReselectingCache.from_prefill(cache, k, v, every=policy.every, offload=policy.offload, blocks=policy.blocks)


def decode(q, k, v, cache, *, layout=None, backend="auto"):
    """Decode one token: compress the block leaving the window, append the token's key/value, attend.

    q: [B, HQ, 1, D], k, v: [B, HKV, 1, D] (or "bshd"). Mutates `cache`. A PackedKVCache (every backend but
    the reference makes one) decodes on `backend`: "auto" takes the fastest decode kernels for the device
    (Triton on a GPU), whichever backend prefilled; the reference's cache decodes on the reference. The caches of
    `prefill(policy=tca.Reselect(...))` (section 5c) decode the same way, their active set on those kernels.
    A cache filled under torch.inference_mode() may be decoded outside it: its inference tensors are copied once
    into normal tensors (the step updates the cache in place, which inference tensors refuse outside that mode).
    """
    q, k, v = to_bhsd(q, k, v, layout)
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a cache returned by tca.prefill, got {type(cache).__name__}")
    if q.shape[2] != 1 or k.shape[2] != 1:
        raise ValueError(f"decode takes one new token: q and k must have 1 position, got {q.shape[2]} and {k.shape[2]}")
    if k.shape[1] != cache.num_kv_heads:
        raise ValueError(f"the cache has {cache.num_kv_heads} KV heads but k has {k.shape[1]}")
    # A mismatch would otherwise fail deep inside a backend, or silently decode the wrong sequences.
    checked = (
        ("batch size", cache.batch_size, k.shape[0]),
        ("head dim", cache.head_dim, k.shape[-1]),
        ("number of query heads", cache.num_query_heads, q.shape[1]),
    )
    for what, expected, given in checked:
        if expected is not None and expected != given:
            raise ValueError(
                f"the cache has {what} {expected} but the new token has {given}; decode continues the "
                "sequences that tca.prefill started, with the same shapes"
            )
    for what, expected, given in (("dtype", cache.dtype, q.dtype), ("device", cache.device, q.device)):
        if expected != given:
            raise ValueError(
                f"the cache holds {what} {expected} but the new token is {given}; decode with the same {what} "
                "as tca.prefill (convert with .to(...))"
            )
    if not torch.is_inference_mode_enabled():
        leave_inference_tensors(cache)
    return from_bhsd(bind_decode(cache, backend)(q, k, v), layout)


def bind_decode(cache, backend: str = "auto"):
    """The function that decodes one token into `cache` (a cache of tca.prefill): step(q, k, v) -> out, bhsd inputs
    as `decode` takes them, unchecked. Bound once, so a caller that has validated its shapes (the model path) can
    keep it for every step. A shared cache (packed, dense path's, re-selecting) decodes on the decode backend's
    kernels, which it keeps: "auto" is the choice routing made at prefill (the fastest decode kernels of the
    device, whichever backend prefilled), a name binds that backend's; a cache of one backend's own type
    (`cache.backend`: the reference's) decodes on that backend."""
    if cache.backend is not None:
        impl = registry.get(cache.backend).load()
        return lambda q, k, v: impl.decode(q, k, v, cache)
    _use_decode_kernels(cache, backend)
    return partial(decode_on_cache, cache)


def _use_decode_kernels(cache, backend: str) -> None:
    """A shared cache takes the kernels of the decode backend routing chooses for `backend` (a name or "auto")."""
    cache.use_kernels(routing.decode_backend(backend, cache.device, cache.dtype, cache.head_dim).load().cache_kernels)


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine: the TCA backends in auto's priority order, then dense."""
    return [row["name"] for row in registry.report() if row["usable"]]


# Long prompts, chunk by chunk (docs/semantics.md section 5b); the state lives in prefill_state.py.


def start_prefill(*, mode="exact", budgets=None, config=None, scale=None, backend="auto", cache=None):
    """Begin a prefill that takes the prompt chunk by chunk; feed it with `prefill_chunk`, end it with
    `finish_prefill`.

        state = tca.start_prefill(mode="streaming")
        for q, k, v in chunks:                       # the whole prompt need not exist at once
            out = tca.prefill_chunk(q, k, v, state)
        cache = tca.finish_prefill(state)            # then tca.decode(q1, k1, v1, cache)

    mode: "exact" (each chunk's output is the stateless rule on its prefix; the dense KV is held until
    `finish_prefill`, which returns the one-shot prefill's cache) or "streaming" (bounded memory: blocks leaving
    the window are compressed after every chunk; every chunk but the last must end on a multiple of
    config.block_size). budgets, config, scale, backend: as in `prefill`. cache: a cache from `prefill`,
    `finish_prefill` or `decode` to extend in streaming mode (mutated; its config and scale are kept; budgets
    default to the ones it records; a PackedKVCache continues on `backend`, the reference's cache on the reference;
    the dense path's cache, which backend="auto" makes below the crossover, continues as a packed copy: decode
    the cache `finish_prefill` returns).
    """
    if cache is None:
        return ChunkedPrefill(mode, budgets, check_config(config), scale, backend)
    if isinstance(cache, Packable):  # the dense path's cache continues as the same tokens, packed
        cache = cache.to_packed()
    if isinstance(cache, Reselecting):
        raise ValueError(
            "a re-selecting cache (policy=tca.Reselect) cannot continue a streaming prefill (semantics.md section 5c); "
            "prefill the whole prompt with tca.prefill, or use policy=None"
        )
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a cache made by tca.prefill or tca.finish_prefill, got {type(cache).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "exact":
        raise ValueError(
            "exact chunked prefill cannot continue a compressed cache (it needs the dense keys of every earlier "
            "token); continue it with mode='streaming'"
        )
    if config is not None or scale is not None:
        raise ValueError("a continued cache keeps its own config and scale; leave config and scale unset")
    bound = cache.backend  # a cache of one backend's own type (the reference's) stays there
    if bound is not None and backend not in ("auto", bound):
        raise ValueError(f"the cache was made by backend {bound!r} and continues there, not on {backend!r}")
    if budgets is not None:
        budgets = check_budgets(budgets, cache.num_kv_heads, cache.config, cache.device)
    return ChunkedPrefill.continuing(cache, budgets, backend)


def prefill_chunk(q, k, v, state, *, position=None, layout="bhsd"):
    """Prefill the next chunk of the prompt; returns its attention output (q's layout and dtype).

    q: [B, HQ, n, D], k, v: [B, HKV, n, D] ("bhsd") or [B, n, H, D] with layout="bshd": the n tokens that
    follow the ones prefilled so far. position: the chunk's first position, checked when given. Mutates
    `state`; on any error the state (and a continued cache) is left as it was.
    """
    if not isinstance(state, ChunkedPrefill):
        raise TypeError(f"state must be a tca.ChunkedPrefill made by tca.start_prefill, got {type(state).__name__}")
    q, k, v = to_bhsd(q, k, v, layout)
    state.check_chunk(q, k, position)
    setup = None
    if state.backend is None:  # the first chunk: its shapes validate the scale and budgets, and pick the backend
        scale = check_scale(state.scale, q.shape[-1])
        budgets = check_budgets(state.budgets, k.shape[1], state.config, q.device)
        chosen = routing.route(state.requested_backend, Inputs.of(q, k, v, phase="chunked_prefill"))
        setup = (chosen.name, chosen.implementation, budgets, scale)
    return from_bhsd(state.extend(q, k, v, setup), layout)


def finish_prefill(state):
    """End a chunked prefill; returns the compressed cache of section 5, which `decode` continues."""
    if not isinstance(state, ChunkedPrefill):
        raise TypeError(f"state must be a tca.ChunkedPrefill made by tca.start_prefill, got {type(state).__name__}")
    cache = state.finish()
    if cache.backend is None:  # a shared cache decodes on the device's fastest decode kernels, as after tca.prefill
        _use_decode_kernels(cache, "auto")
    return cache


def prefill_in_chunks(
    q, k, v, *, chunk_size, mode="exact", budgets=None, config=None, scale=None, layout="bhsd", backend="auto"
):
    """`prefill` of a prompt already in memory, `chunk_size` tokens at a time (the last chunk may be shorter).

    q: [B, HQ, L, D], k, v: [B, HKV, L, D] (or "bshd"). Returns (out in q's layout: every chunk's output,
    concatenated; cache). Streaming mode needs chunk_size to be a multiple of config.block_size.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    state = start_prefill(mode=mode, budgets=budgets, config=config, scale=scale, backend=backend)
    block = state.config.block_size
    if mode == "streaming" and chunk_size % block:
        raise ValueError(
            f"streaming chunks must be multiples of the block size {block} (all but the last), got chunk_size="
            f"{chunk_size}; try {max(block, chunk_size // block * block)}"
        )
    q, k, v = to_bhsd(q, k, v, layout)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"a prefill needs one query per key (LQ == L), got LQ={q.shape[2]}, L={k.shape[2]}")
    outs = [
        prefill_chunk(*(t[:, :, s : s + chunk_size] for t in (q, k, v)), state) for s in range(0, k.shape[2], chunk_size)
    ]
    return from_bhsd(torch.cat(outs, dim=2), layout), finish_prefill(state)

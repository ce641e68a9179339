"""Long prompts, one chunk at a time: exact chunked and streaming prefill (docs/semantics.md section 5b).

    state = tca.start_prefill(mode="streaming")   # or "exact"; budgets, config, scale, backend as in tca.prefill
    for q, k, v in chunks:                        # [B, HQ, n, D], [B, HKV, n, D]: the prompt need not exist at once
        out = tca.prefill_chunk(q, k, v, state)   # this chunk's attention output
    cache = tca.finish_prefill(state)             # the compressed cache: continue with tca.decode

    out, cache = tca.prefill_in_chunks(q, k, v, chunk_size=4096, mode="exact")   # the same, in one call

"exact" gives each chunk the stateless result on its prefix and, once finished, the cache of a one-shot
prefill; it holds the dense KV meanwhile. "streaming" compresses as it goes: its memory stays at the window
plus the kept tokens. Shape letters: B batch, HQ query heads, HKV key/value heads, n chunk tokens, D head dim.
"""

from __future__ import annotations

import torch

from .backends import registry
from .validation import check_budgets, check_config, check_scale, from_bhsd, to_bhsd

MODES = ("exact", "streaming")


class ChunkedPrefill:
    """A prefill in progress: made by `tca.start_prefill`, fed by `tca.prefill_chunk`, ended by `tca.finish_prefill`.

    mode: "exact" or "streaming"; seq_len: tokens prefilled so far (the next chunk starts there); backend: the
    backend's name (chosen by the first chunk); nbytes: bytes of keys and values held now.
    """

    def __init__(self, mode, budgets, config, scale, backend, cache=None):
        self.mode = mode
        self.config = config
        self.finished = False
        self._budgets, self._scale, self._backend = budgets, scale, backend
        self._impl = None
        self._state = None  # exact: the backend's dense state; streaming: the cache
        self._shape = None  # what every chunk must match, fixed by the first chunk or the continued cache
        self._ended_mid_block = None  # streaming: end position of a chunk that ended inside a block
        self.seq_len = 0
        if cache is not None:
            self._continue(cache)

    def _continue(self, cache) -> None:
        spec = registry.get(cache.backend)
        if not spec.has_chunked_prefill:
            raise registry.BackendUnavailableError(
                f"backend {cache.backend!r} cannot continue this cache: {registry.chunked_prefill_missing()}"
            )
        self._impl, self._backend = spec.load(), cache.backend
        self._state, self.seq_len, self.config, self._scale = cache, cache.seq_len, cache.config, cache.scale
        self._shape = {
            "batch size": cache.batch_size,
            "number of KV heads": cache.num_kv_heads,
            "number of query heads": getattr(cache, "num_query_heads", None),
            "head dim": cache.head_dim,
            "dtype": cache.dtype,
            "device": cache.device,
        }
        if self._budgets is None:
            self._budgets = getattr(cache, "budgets", None)
            if self._budgets is None:
                raise ValueError(
                    "this cache does not record its budget configurations; pass the budgets it was made with: "
                    "tca.start_prefill(mode='streaming', cache=cache, budgets=...)"
                )
        else:
            self._budgets = check_budgets(self._budgets, cache.num_kv_heads, cache.config, cache.device)

    @property
    def backend(self) -> str | None:
        return self._backend if self._impl is not None else None

    @property
    def nbytes(self) -> int:
        return 0 if self._state is None else self._state.nbytes

    def __repr__(self) -> str:
        state = "finished" if self.finished else f"{self.seq_len} tokens"
        return f"ChunkedPrefill(mode={self.mode!r}, {state}, backend={self.backend!r})"


def start_prefill(*, mode="exact", budgets=None, config=None, scale=None, backend="auto", cache=None):
    """Begin a prefill that takes the prompt chunk by chunk (docs/semantics.md section 5b).

    mode: "exact" (each chunk equals the stateless rule on its prefix; the dense KV is held until
    `finish_prefill`, which gives the one-shot prefill's cache) or "streaming" (bounded memory: blocks leaving
    the window are compressed after every chunk; every chunk but the last must end on a multiple of
    config.block_size). budgets, config, scale, backend: as in `tca.prefill`. cache: a cache from
    `tca.prefill`, `tca.finish_prefill` or `tca.decode` to extend in streaming mode (it is mutated; its
    config, scale and backend are kept; budgets default to the ones it records).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if cache is None:
        return ChunkedPrefill(mode, budgets, check_config(config), scale, backend)
    for name in ("backend", "seq_len", "num_kv_heads", "config", "scale"):
        if not hasattr(cache, name):
            raise TypeError(
                f"cache must be a cache made by tca.prefill or tca.finish_prefill, got {type(cache).__name__}"
            )
    if mode == "exact":
        raise ValueError(
            "exact chunked prefill cannot continue a compressed cache (it needs the dense keys of every earlier "
            "token); continue it with mode='streaming'"
        )
    if config is not None or scale is not None:
        raise ValueError("a continued cache keeps its own config and scale; leave config and scale unset")
    if backend not in ("auto", cache.backend):
        raise ValueError(f"the cache was made by backend {cache.backend!r} and continues there, not on {backend!r}")
    return ChunkedPrefill(mode, budgets, cache.config, None, cache.backend, cache=cache)


def prefill_chunk(q, k, v, state: ChunkedPrefill, *, position: int | None = None, layout: str = "bhsd"):
    """Prefill the next chunk of the prompt; returns its attention output (q's layout and dtype).

    q: [B, HQ, n, D], k, v: [B, HKV, n, D] ("bhsd") or [B, n, H, D] with layout="bshd": the n tokens that
    follow the ones prefilled so far. position: the chunk's first position, checked when given. Mutates
    `state`; on any error the state (and a continued cache) is left as it was.
    """
    if not isinstance(state, ChunkedPrefill):
        raise TypeError(f"state must be a tca.ChunkedPrefill made by tca.start_prefill, got {type(state).__name__}")
    if state.finished:
        raise ValueError(
            "this prefill was finished by tca.finish_prefill (an exact prefill's dense keys are gone); decode with "
            "its cache, or add chunks with tca.start_prefill(mode='streaming', cache=cache)"
        )
    q, k, v = to_bhsd(q, k, v, layout)
    n = k.shape[2]
    if q.shape[2] != n:
        raise ValueError(
            f"a chunk brings one query per new key: q has {q.shape[2]} positions, k has {n}; pass the chunk's "
            "queries, keys and values (earlier keys are in the state)"
        )
    if position is not None:
        if isinstance(position, bool) or not isinstance(position, int):
            raise TypeError(f"position must be an int or None, got {type(position).__name__}")
        if position != state.seq_len:
            raise ValueError(
                f"the chunk starts at position {position} but {state.seq_len} tokens were prefilled; chunks come "
                f"in order, each starting where the previous ended (next: {state.seq_len})"
            )
    shape = {
        "batch size": q.shape[0],
        "number of KV heads": k.shape[1],
        "number of query heads": q.shape[1],
        "head dim": q.shape[-1],
        "dtype": q.dtype,
        "device": q.device,
    }
    if state._shape is not None:
        _check_continues(state._shape, shape)
    block = state.config.block_size
    if state.mode == "streaming" and state._ended_mid_block is not None:
        raise ValueError(
            f"the previous streaming chunk ended inside a block (at position {state._ended_mid_block}, block size "
            f"{block}); only the last chunk may: make every other chunk end on a multiple of {block}"
        )
    if state._impl is None:
        backend, impl, budgets, scale = _first_chunk_setup(state, q, k)
    else:
        backend, impl, budgets, scale = state._backend, state._impl, state._budgets, state._scale
    if state.mode == "exact":
        out, new_state = impl.exact_chunk(q, k, v, state._state, budgets, state.config, scale)
    else:
        new_state = state._state
        if new_state is None:
            new_state = impl.empty_cache(
                q.shape[0], k.shape[1], q.shape[-1], q.dtype, q.device, budgets, state.config, scale
            )
        out = impl.streaming_chunk(q, k, v, new_state, budgets)
    # The chunk went through: commit.
    state._backend, state._impl, state._budgets, state._scale, state._state = backend, impl, budgets, scale, new_state
    if state._shape is None:
        state._shape = shape
    elif state._shape["number of query heads"] is None:
        state._shape["number of query heads"] = shape["number of query heads"]
    state.seq_len += n
    if state.seq_len % block:
        state._ended_mid_block = state.seq_len
    return from_bhsd(out, layout)


def _first_chunk_setup(state: ChunkedPrefill, q, k):
    """What needs the first chunk's shapes: the scale and budgets, checked, and the backend, chosen.

    Returns (backend name, implementation, budgets [HKV, len(K)] float64, scale); changes nothing.
    """
    scale = check_scale(state._scale, q.shape[-1])
    budgets = check_budgets(state._budgets, k.shape[1], state.config, q.device)
    spec = registry.resolve(state._backend, q.device, q.dtype, q.shape[-1], decode=True, chunked=True)
    return spec.name, spec.load(), budgets, scale


def _check_continues(expected: dict, given: dict) -> None:
    for what, value in given.items():
        if expected[what] is not None and expected[what] != value:
            raise ValueError(
                f"the chunk does not continue the prefill: its {what} is {value}, the earlier chunks' (or the "
                f"cache's) is {expected[what]}; every chunk continues the same sequences with the same shapes, "
                "dtype and device"
            )


def finish_prefill(state: ChunkedPrefill):
    """End the prefill; returns the compressed cache (section 5), which `tca.decode` continues.

    Exact mode compresses with the last chunk's last query (the one-shot prefill's cache); streaming mode
    returns its cache as it is.
    """
    if not isinstance(state, ChunkedPrefill):
        raise TypeError(f"state must be a tca.ChunkedPrefill made by tca.start_prefill, got {type(state).__name__}")
    if state.finished:
        raise ValueError("this prefill was already finished; decode with the cache tca.finish_prefill returned")
    if state._state is None:
        raise ValueError("no chunk was prefilled: call tca.prefill_chunk at least once before tca.finish_prefill")
    cache = state._impl.exact_finish(state._state) if state.mode == "exact" else state._state
    cache.num_query_heads = state._shape["number of query heads"]  # tca.decode checks it
    state.finished, state._state = True, None  # an exact prefill's dense keys are released here
    return cache


def prefill_in_chunks(
    q, k, v, *, chunk_size: int, mode="exact", budgets=None, config=None, scale=None, layout="bhsd", backend="auto"
):
    """`tca.prefill` of a prompt already in memory, in chunks of `chunk_size` tokens (the last may be shorter).

    q: [B, HQ, L, D], k, v: [B, HKV, L, D] (or "bshd"). Returns (out [B, HQ, L, D] in q's layout, cache):
    out is every chunk's output, concatenated. In streaming mode chunk_size must be a multiple of
    config.block_size.
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
    L = k.shape[2]
    outs = [
        prefill_chunk(q[:, :, s : s + chunk_size], k[:, :, s : s + chunk_size], v[:, :, s : s + chunk_size], state)
        for s in range(0, L, chunk_size)
    ]
    return from_bhsd(torch.cat(outs, dim=2), layout), finish_prefill(state)

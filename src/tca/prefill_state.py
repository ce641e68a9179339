"""A prefill in progress, chunk by chunk (docs/semantics.md section 5b): the state behind `tca.start_prefill`,
`tca.prefill_chunk` and `tca.finish_prefill` (api.py validates the inputs; this module checks that each chunk
continues the prefill and drives the backend).

"exact" gives each chunk the stateless result on its prefix and, once finished, the cache of a one-shot
prefill; it holds the dense KV meanwhile. "streaming" compresses as it goes: its memory stays at the window
plus the kept tokens. Shape letters: B batch, HQ query heads, HKV key/value heads, n chunk tokens, D head dim.
"""

from __future__ import annotations

import torch

from .backends import registry, routing
from .inference_tensors import leave_inference_tensors

MODES = ("exact", "streaming")


class ChunkedPrefill:
    """A prefill in progress: made by `tca.start_prefill`, fed by `tca.prefill_chunk`, ended by `tca.finish_prefill`.

    mode: "exact" or "streaming"; seq_len: tokens prefilled so far (the next chunk starts there); backend: the
    backend's name once the first chunk chose it (else None); nbytes: bytes of keys and values held now;
    finished: whether `tca.finish_prefill` ended it.
    """

    def __init__(self, mode: str, budgets, config, scale, backend: str):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.config = mode, config
        self.finished = False
        self.seq_len = 0
        # As given: validated by the first chunk, whose shapes they need (then the validated values).
        self.budgets, self.scale, self.requested_backend = budgets, scale, backend
        self._impl, self._backend = None, None
        self._state = None  # exact: the backend's dense state; streaming: the cache
        self._shape = None  # what every chunk must match: fixed by the first chunk or the continued cache
        self._ended_mid_block = None  # streaming: where a chunk ended inside a block (only the last may)

    @classmethod
    def continuing(cls, cache, budgets, backend: str = "auto") -> ChunkedPrefill:
        """A streaming prefill that extends `cache` (mutating it). budgets: validated [HKV, len(K)], or None for
        the ones the cache records. backend: a cache bound to one backend (the reference's) continues there; a
        PackedKVCache continues on the named backend with chunked prefill, or for "auto" the best one."""
        name = cache.backend or backend
        spec = routing.resolve(name, cache.device, cache.dtype, cache.head_dim, phase="chunked_prefill")
        if cache.backend is None and spec.own_cache:
            raise registry.BackendUnavailableError(
                f"backend {spec.name!r} cannot continue this cache (a PackedKVCache): name a backend that decodes "
                "it and has chunked prefill (e.g. 'torch'), or 'auto'"
            )
        if budgets is None:
            budgets = cache.budgets
            if budgets is None:
                raise ValueError(
                    "this cache does not record its budget configurations; pass the budgets it was made with: "
                    "tca.start_prefill(mode='streaming', cache=cache, budgets=...)"
                )
        self = cls("streaming", budgets, cache.config, cache.scale, spec.name)
        self._impl, self._backend, self._state, self.seq_len = spec.load(), spec.name, cache, cache.seq_len
        # What the cache knows of its shapes (the query heads may be unknown, None: then not checked).
        self._shape = {
            "batch size": cache.batch_size,
            "number of KV heads": cache.num_kv_heads,
            "number of query heads": cache.num_query_heads,
            "head dim": cache.head_dim,
            "dtype": cache.dtype,
            "device": cache.device,
        }
        return self

    @property
    def backend(self) -> str | None:
        return self._backend

    @property
    def nbytes(self) -> int:
        return 0 if self._state is None else self._state.nbytes

    def __repr__(self) -> str:
        state = "finished" if self.finished else f"{self.seq_len} tokens"
        return f"ChunkedPrefill(mode={self.mode!r}, {state}, backend={self.backend!r})"

    def check_chunk(self, q, k, position) -> None:
        """Raise unless q [B, HQ, n, D], k [B, HKV, n, D] ("bhsd") continue this prefill; changes nothing."""
        if self.finished:
            raise ValueError(
                "this prefill was finished by tca.finish_prefill (an exact prefill's dense keys are gone); decode "
                "with its cache, or add chunks with tca.start_prefill(mode='streaming', cache=cache)"
            )
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"a chunk brings one query per new key: q has {q.shape[2]} positions, k has {k.shape[2]}; pass the "
                "chunk's queries, keys and values (earlier keys are in the state)"
            )
        if position is not None:
            if isinstance(position, bool) or not isinstance(position, int):
                raise TypeError(f"position must be an int or None, got {type(position).__name__}")
            if position != self.seq_len:
                raise ValueError(
                    f"the chunk starts at position {position} but {self.seq_len} tokens were prefilled; chunks come "
                    f"in order, each starting where the previous ended (next: {self.seq_len})"
                )
        if self._shape is not None:
            for what, value in _shape(q, k).items():
                expected = self._shape[what]
                if expected is not None and expected != value:
                    raise ValueError(
                        f"the chunk does not continue the prefill: its {what} is {value}, the earlier chunks' (or "
                        f"the cache's) is {expected}; every chunk continues the same sequences with the same "
                        "shapes, dtype and device"
                    )
        if self._ended_mid_block is not None:
            block = self.config.block_size
            raise ValueError(
                f"the previous streaming chunk ended inside a block (at position {self._ended_mid_block}, block "
                f"size {block}); only the last chunk may: make every other chunk end on a multiple of {block}"
            )

    def extend(self, q, k, v, setup=None):
        """Run a checked chunk ("bhsd"); returns its output [B, HQ, n, D]. The first chunk brings `setup`:
        (backend name, implementation, validated budgets, scale). Nothing changes unless the chunk succeeds."""
        backend, impl, budgets, scale = setup or (self._backend, self._impl, self.budgets, self.scale)
        if self._state is not None and not torch.is_inference_mode_enabled():
            leave_inference_tensors(self._state)  # a state filled in inference mode is extended in place below
        if self.mode == "exact":
            out, state = impl.exact_chunk(q, k, v, self._state, budgets, self.config, scale)
        else:
            state = self._state
            if state is None:
                B, HKV, _, D = k.shape
                state = impl.empty_cache(B, HKV, D, q.dtype, q.device, budgets, self.config, scale)
            out = impl.streaming_chunk(q, k, v, state, budgets)
        # The chunk went through: commit.
        self._backend, self._impl, self.budgets, self.scale, self._state = backend, impl, budgets, scale, state
        shape = _shape(q, k)
        if self._shape is None:
            self._shape = shape
        else:  # a continued cache may not have known some of them
            self._shape = {what: shape[what] if known is None else known for what, known in self._shape.items()}
        self.seq_len += k.shape[2]
        if self.mode == "streaming" and self.seq_len % self.config.block_size:
            self._ended_mid_block = self.seq_len
        return out

    def finish(self):
        """The compressed cache (section 5): exact mode compresses with the last chunk's last query (the
        one-shot prefill's cache); streaming mode hands over its cache."""
        if self.finished:
            raise ValueError("this prefill was already finished; decode with the cache tca.finish_prefill returned")
        if self._state is None:
            raise ValueError("no chunk was prefilled: call tca.prefill_chunk at least once before tca.finish_prefill")
        cache = self._impl.exact_finish(self._state) if self.mode == "exact" else self._state
        cache.record(num_query_heads=self._shape["number of query heads"])  # tca.decode checks it
        self.finished, self._state = True, None  # an exact prefill's dense keys are released here
        return cache


def _shape(q, k) -> dict:
    return {
        "batch size": q.shape[0],
        "number of KV heads": k.shape[1],
        "number of query heads": q.shape[1],
        "head dim": q.shape[-1],
        "dtype": q.dtype,
        "device": q.device,
    }

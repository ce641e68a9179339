"""TCACache: a transformers Cache that holds the TCA-compressed KV cache of every layer (semantics.md section 5).

In transformers >= 5 the modeling code calls `cache.update(k, v, layer_idx)` *before* the attention function,
and the attention function never sees the cache. So `update` does not store anything: it returns the new
tokens' k/v and offers its layer to the attention call that receives exactly those keys (attention.handoff);
the "tca" attention function (attention.py), which also has the queries that TCA's selection needs, prefills
or decodes that layer's compressed state (a tca cache that follows the cache contract, KVCache):

- prefill (first call): `tca.prefill` keeps, per sequence and KV head, only Sel_g U [J*b, L) (ragged); a
  left-padded batch passes each sequence's start (`starts`): one call on the triton backend, sequence by
  sequence on the others, either way one cache of per-sequence lengths;
- later calls: one decode step per new token (compress the block leaving the window, append, attend: the cache's
  own step, shapes checked once at prefill), on the fastest decode kernels for the device, whichever backend
  prefilled; below the crossover (backend="auto") the layer holds the dense path's cache, every token kept;
- between `begin_chunked_prefill(mode)` and `end_chunked_prefill()`: every call is the next chunk of a long prompt
  (semantics.md section 5b, `tca.prefill_chunk`); `tca.models.prefill_in_chunks` drives it.

Hybrid models: the sliding-window layers (config.layer_types) get transformers' own DynamicSlidingWindowLayer,
which the model's own attention reads as it would from its default cache; only full-attention layers are
TCACacheLayers.

Shape letters: B batch, HQ query heads, HKV key/value heads, L tokens, D head dim.
"""

from __future__ import annotations

import torch

from ..inference_tensors import leave_inference_tensors
from . import _hf
from .attention import IMPLEMENTATIONS, handoff, left_padding
from .shape import check_supported, text_config

_hf.require()
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer  # noqa: E402


class TCACacheLayer(CacheLayerMixin):
    """One layer's compressed cache: `state` is the backend's cache (any cache of the contract, KVCache)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, model_config=None, layer_idx: int = 0):
        super().__init__()
        self._state = None
        self.seen = 0  # tokens passed to update (positions 0 .. seen-1)
        self.layer_idx = layer_idx
        self._model_config = model_config
        self._awaiting_attention = False
        self.decode_backend = "auto"
        self.chunk_mode = None  # "exact" or "streaming" during a chunked prefill (section 5b), else None
        self.chunked = None  # that prefill's tca.ChunkedPrefill once its first chunk reached this layer
        self.policy = None  # tca.Reselect or None (section 5c), given to tca.prefill
        self._normal_state = None  # the state last checked to hold no inference tensors (see attend)
        self._step = None  # (state, its decode step): looked up once per state

    @property
    def state(self):
        """This layer's cache (a tca cache following the contract), or None before the prefill."""
        return self._state

    @state.setter
    def state(self, state) -> None:
        # The memos of the previous state go with it (they would keep its buffers alive).
        self._state, self._step, self._normal_state = state, None, None

    # -- transformers' Cache protocol ---------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Record the new tokens k, v [B, HKV, LQ, D] and hand them, tagged, to the attention function."""
        self._check_attention_ran()
        if self.chunk_mode is not None:
            self._check_chunk_position(key_states.shape[-2], kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        self._awaiting_attention = True
        handoff.offer(self, key_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen, self.is_initialized, self._awaiting_attention = None, 0, False, False
        self.chunk_mode = self.chunked = None

    def offload(self):
        pass

    def prefetch(self):
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("TCACache does not support beam search (its kept sets differ per sequence)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("TCACache cannot be cropped: compressed tokens are gone (no assisted decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            raise NotImplementedError("TCACache cannot repeat a filled cache over the batch; expand the inputs instead")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("TCACache cannot select batch elements of a filled cache")

    # -- the TCA side -------------------------------------------------------------------------------------------
    def _check_attention_ran(self) -> None:
        if self._model_config is not None:
            implementation = getattr(self._model_config, "_attn_implementation", None)
            if implementation not in IMPLEMENTATIONS:
                raise ValueError(
                    f"TCACache needs the model's attention to be 'tca' or 'tca_reference', but it is "
                    f"{implementation!r}; call tca.models.enable_tca(model) first (a dense cache is DynamicCache)"
                )
        if self._awaiting_attention:
            raise RuntimeError(
                f"layer {self.layer_idx}: the attention function never consumed the TCACache update of the previous "
                "call (its keys lost their tag, or the attention is not 'tca'); the compressed cache is out of sync"
            )

    def attend(self, q, k, v, settings, scale, backend, attention_mask=None) -> torch.Tensor:
        """Prefill (first call) or decode token by token. q [B, HQ, LQ, D], k, v [B, HKV, LQ, D] -> [B, HQ, LQ, D].

        attention_mask: the 2D padding mask of a left-padded prompt (prefill only), or None."""
        self._awaiting_attention = False
        if torch.is_inference_mode_enabled():
            self._normal_state = None  # tensors made from now on may be inference tensors
        elif self._normal_state is not self.state:
            self._leave_inference_tensors()
        if self.chunk_mode is not None:
            return self._prefill_chunk(q, k, v, settings, scale, backend, attention_mask)
        if self.state is None:
            return self._prefill(q, k, v, settings, scale, backend, attention_mask)
        # Later chunks (a decode step, or several tokens appended to a filled cache) go one token at a time:
        # token r attends to the compressed past plus tokens r' <= r of the chunk, exactly as in section 5.
        if self._step is None or self._step[0] is not self.state:
            self._step = (self.state, self._bind_decode())
        step = self._step[1]
        outs = [step(q[:, :, r : r + 1], k[:, :, r : r + 1], v[:, :, r : r + 1]) for r in range(q.shape[2])]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _prefill(self, q, k, v, settings, scale, backend, attention_mask) -> torch.Tensor:
        """The prompt: one tca.prefill; a left-padded batch passes each sequence's start (one path for the whole
        batch, a cache of per-sequence lengths)."""
        import tca

        out, self.state = tca.prefill(
            q, k, v, budgets=settings.budgets, config=settings.config, scale=scale, backend=backend,
            policy=self.policy, starts=left_padding(attention_mask, k.shape[2]),
        )
        return out

    def _bind_decode(self):
        """The decode step of this layer's cache (looked up once per cache): inputs come from the model, whose
        shapes the prefill fixed, so the per-token checks of tca.decode are skipped (they cost more host time
        than the dense path's whole step)."""
        from tca.api import bind_decode

        return bind_decode(self.state, self.decode_backend)

    def _check_chunk_position(self, n: int, kwargs: dict) -> None:
        """A chunk must start where the prefill stands: its position_ids (when the model passes them) say where."""
        positions = (kwargs.get("kwargs") or kwargs).get("position_ids")
        if positions is None or positions.numel() == 0:
            return
        first = positions.reshape(-1, positions.shape[-1])[:, 0].unique().tolist()
        if first != [self.seen]:
            raise ValueError(
                f"layer {self.layer_idx}: the chunk starts at position {first[0] if len(first) == 1 else first} but "
                f"{self.seen} tokens were prefilled; chunks come in order, each starting where the previous ended "
                f"(position_ids from {self.seen})"
            )

    def _prefill_chunk(self, q, k, v, settings, scale, backend, attention_mask) -> torch.Tensor:
        """The next chunk of a chunked prefill (section 5b). On an error this layer is left as it was."""
        import tca

        try:
            if left_padding(attention_mask, k.shape[2]):
                raise ValueError(
                    "a chunked prefill takes sequences of one length (no padding); prefill a padded batch in one "
                    "call, or its sequences one at a time"
                )
            if self.chunked is None:
                if self.state is None:
                    self.chunked = tca.start_prefill(
                        mode=self.chunk_mode, budgets=settings.budgets, config=settings.config, scale=scale,
                        backend=backend,
                    )
                else:  # streaming continues the filled cache (begin_chunked_prefill refused exact)
                    self.chunked = tca.start_prefill(
                        mode="streaming", cache=self.state, budgets=settings.budgets, backend=backend
                    )
            return tca.prefill_chunk(q, k, v, self.chunked)
        except Exception:
            self.seen -= k.shape[2]  # update() counted the chunk; it did not go through
            raise

    def end_chunk_mode(self) -> None:
        """Close this layer's chunked prefill: an exact one compresses here (tca.finish_prefill)."""
        import tca

        if self.chunked is not None and self.chunked.seq_len:
            self.state = tca.finish_prefill(self.chunked)
        self.chunk_mode = self.chunked = None

    def _leave_inference_tensors(self) -> None:
        """A cache filled under torch.inference_mode() holds inference tensors, which cannot be updated in place
        outside it: copy them once into normal tensors (the reverse direction needs nothing)."""
        self._normal_state = self.state
        if self.state is not None:
            leave_inference_tensors(self.state)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for this layer's keys and values (0 before the prefill; during a chunked prefill, what
        it holds: the dense keys of an exact one, the compressed cache of a streaming one)."""
        if self.chunked is not None and self.chunked.seq_len:
            return int(self.chunked.nbytes)
        return 0 if self.state is None else int(self.state.nbytes)

    @property
    def lengths(self) -> torch.Tensor | None:
        """[B, HKV] tokens kept per batch element and KV head (None before the prefill)."""
        return None if self.state is None else self.state.lengths


class TCACache(Cache):
    """The compressed KV cache of a TCA-enabled model, for `model.generate` and manual forward loops.

        model = tca.models.enable_tca(model, plan)
        cache = tca.models.TCACache(model)
        out = model.generate(input_ids, **cache_kwargs(model, cache), max_new_tokens=32)  # the right keyword for this transformers
        cache.nbytes, cache.kept_fraction()

    Batches may hold prompts of different lengths, left-padded (the attention_mask of a tokenizer with
    padding_side="left"): each sequence is prefilled on its own tokens and decoded at its own position, so a
    batched run gives each prompt's tokens alone on the same path (with backend="auto" the padded length picks
    the path for the whole batch: a short prompt in a batch above the crossover runs TCA, alone it would run
    dense). One cache serves one generation: make a new one (or call
    `cache.reset()`) for the next prompt.

    decode_backend: "auto" (the fastest decode kernels for the device: Triton on a GPU, else torch) or a
    backend name; prefill runs on the model's TCA backend (enable_tca's `backend`).

    A long prompt can be prefilled in chunks (docs/semantics.md section 5b): `tca.models.prefill_in_chunks`, or
    by hand `cache.begin_chunked_prefill(mode)`, one forward call per chunk, `cache.end_chunked_prefill()`.

    policy: None (section 5, the paper's rule) or tca.Reselect(every=N, offload=..., blocks=...) (section 5c:
    evicted tokens are kept and re-selected every N decode steps, over M candidate blocks with blocks=M); `nbytes` then counts the evicted store too, and
    `device_nbytes` / `offloaded_nbytes` split it by where it lives.
    """

    def __init__(self, model=None, num_layers: int | None = None, decode_backend: str = "auto", policy=None):
        from tca.policy import check_policy

        policy = check_policy(policy)
        config = None
        self.shape = None
        if model is not None:
            if not hasattr(model, "config"):
                raise TypeError(f"TCACache(model): expected a transformers model, got {type(model).__name__}")
            self.shape = check_supported(model)
            config = text_config(model)
            num_layers = config.num_hidden_layers
        if num_layers is None:
            raise ValueError("TCACache needs the model (TCACache(model)) or num_layers")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if not isinstance(decode_backend, str):
            raise TypeError(f"decode_backend must be a backend name or 'auto', got {type(decode_backend).__name__}")
        if decode_backend != "auto":
            from tca.backends import registry

            registry.get(decode_backend)  # unknown names fail here, listing the known ones
        native = self.shape.native_layers if self.shape is not None else ()
        layers = [
            DynamicSlidingWindowLayer(sliding_window=config.sliding_window) if index in native
            else TCACacheLayer(config, index)
            for index in range(num_layers)
        ]
        for layer in self.tca_layers(layers):
            layer.decode_backend = decode_backend
            layer.policy = policy
        super().__init__(layers=layers)

    def reset(self) -> None:
        """Empty every layer for the next prompt. Sliding-window layers are replaced by fresh ones: some
        transformers releases reset a dynamic layer by zeroing its tensors in place, which would leave stale
        positions in front of the next prompt's keys."""
        for index, layer in enumerate(self.layers):
            if isinstance(layer, TCACacheLayer):
                layer.reset()
            else:
                self.layers[index] = DynamicSlidingWindowLayer(sliding_window=layer.sliding_window)

    @staticmethod
    def tca_layers(layers) -> list[TCACacheLayer]:
        """The compressed layers (a hybrid model's sliding-window layers are transformers' own)."""
        return [layer for layer in layers if isinstance(layer, TCACacheLayer)]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """transformers' entry point; checks that this cache was made for the model that calls it."""
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"this TCACache has {len(self.layers)} layers but the model asked for layer {layer_idx}: it was made "
                "for another model; make one with TCACache(model) for this model"
            )
        if self.shape is not None and (key_states.shape[1], key_states.shape[-1]) != (self.shape.num_kv_heads, self.shape.head_dim):
            raise ValueError(
                f"this TCACache was made for a model with {self.shape.num_kv_heads} KV heads of dim {self.shape.head_dim}, "
                f"but got keys of {key_states.shape[1]} heads of dim {key_states.shape[-1]}; make one with "
                "TCACache(model) for this model"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # -- chunked prefill (docs/semantics.md section 5b) ------------------------------------------------------------
    @property
    def chunk_mode(self) -> str | None:
        """"exact" or "streaming" while a chunked prefill is open, else None."""
        return self.layers[0].chunk_mode if self.layers else None

    def begin_chunked_prefill(self, mode: str = "exact") -> None:
        """From now on every forward call brings the next chunk of the prompt (any number of tokens), until
        `end_chunked_prefill`. mode: "exact" (each chunk is stateless TCA on its prefix; the dense keys are held
        until the end, which compresses as a one-shot prefill would; only on an empty cache) or "streaming"
        (bounded memory: blocks leaving the window are compressed after every chunk; every chunk but the last
        ends on a multiple of the block size; it may continue a filled cache, e.g. a follow-up question)."""
        from tca.prefill_state import MODES

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if self.chunk_mode is not None:
            raise ValueError(
                f"a {self.chunk_mode!r} chunked prefill is already open; close it with cache.end_chunked_prefill() "
                "before starting another (one prefill has one mode)"
            )
        if mode == "exact" and self.seq_len:
            raise ValueError(
                f"exact chunked prefill needs an empty cache, but this one holds {self.seq_len} tokens (compressed: "
                "their dense keys are gone); continue it with mode='streaming', or cache.reset() first"
            )
        for layer in self.layers:
            layer.chunk_mode, layer.chunked = mode, None

    def end_chunked_prefill(self) -> None:
        """Close the chunked prefill: the cache is then ready for decoding (`generate`, single-token calls)."""
        if self.chunk_mode is None:
            raise ValueError("no chunked prefill is open: call cache.begin_chunked_prefill(mode) first")
        for layer in self.layers:
            layer.end_chunk_mode()

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values, all layers (a hybrid model's sliding-window layers included):
        the KV memory this cache really holds."""
        return sum(layer.nbytes for layer in self.tca_layers(self.layers)) + self._native_nbytes()

    @property
    def used_nbytes(self) -> int:
        """Bytes of keys and values holding kept tokens (nbytes minus spare capacity, if the backend has any)."""
        return self._native_nbytes() + sum(
            int(layer.state.used_nbytes)
            for layer in self.tca_layers(self.layers)
            if layer.state is not None
        )

    def _native_nbytes(self) -> int:
        """Bytes of the sliding-window layers' keys and values (held as transformers holds them)."""
        return sum(
            int(t.numel() * t.element_size())
            for layer in self.layers
            if not isinstance(layer, TCACacheLayer)
            for t in (layer.keys, layer.values)
            if isinstance(t, torch.Tensor)
        )

    @property
    def offloaded_nbytes(self) -> int:
        """Bytes of keys and values in host memory (a re-selecting cache's offloaded store; else 0)."""
        return sum(int(layer.state.offloaded_nbytes) for layer in self.layers if layer.state is not None)

    @property
    def device_nbytes(self) -> int:
        """Bytes of keys and values on the model's device: nbytes minus what is offloaded."""
        return self.nbytes - self.offloaded_nbytes

    @property
    def seq_len(self) -> int:
        """Tokens seen so far."""
        return self.layers[0].get_seq_length() if self.layers else 0

    def kept_tokens(self) -> int:
        """Tokens kept by the TCA layers, summed over layers, batch elements and KV heads."""
        return sum(int(layer.lengths.sum()) for layer in self.tca_layers(self.layers) if layer.state is not None)

    def kept_fraction(self) -> float:
        """Kept tokens / tokens a dense cache would hold in the TCA layers (same layers, batch, KV heads,
        sequence length). A hybrid model's sliding-window layers are not counted: they hold their window."""
        filled = [layer for layer in self.tca_layers(self.layers) if layer.state is not None]
        if not filled:
            return 1.0
        dense = sum(_dense_positions(layer.state) * layer.lengths.shape[1] for layer in filled)
        return self.kept_tokens() / dense

    def dense_nbytes(self) -> int:
        """Bytes the model's own dense cache would hold for the same sequence: 2 (K and V) x B x HKV x seq_len x D
        per TCA layer, plus the sliding-window layers as they are (they are the same in both)."""
        total = self._native_nbytes()
        for layer in self.tca_layers(self.layers):
            if layer.state is not None:
                H = layer.lengths.shape[1]
                element = torch.empty((), dtype=layer.dtype).element_size()
                total += 2 * H * _dense_positions(layer.state) * layer.state.head_dim * element
        return total


def _dense_positions(state) -> int:
    """Positions a dense cache of the same sequences holds per KV head, summed over the batch (padding excluded)."""
    return sum(state.seq_lens)

"""TCACache: a transformers Cache that holds the TCA-compressed KV cache of every layer (semantics.md section 5).

In transformers >= 5 the modeling code calls `cache.update(k, v, layer_idx)` *before* the attention function,
and the attention function never sees the cache. So `update` does not store anything: it returns the new
tokens' k/v and offers its layer to the attention call that receives exactly those keys (attention.handoff);
the "tca" attention function (attention.py), which also has the queries that TCA's selection needs, prefills
or decodes that layer's compressed state (a tca cache that follows the cache contract, KVCache):

- prefill (first call): `tca.prefill` keeps, per sequence and KV head, only Sel_g U [J*b, L) (ragged); a
  left-padded batch is prefilled sequence by sequence and joined into one cache of per-sequence lengths;
- later calls: one `tca.decode` per new token (compress the block leaving the window, append, attend), on the
  fastest decode kernels for the device, whichever backend prefilled.

Shape letters: B batch, HQ query heads, HKV key/value heads, L tokens, D head dim.
"""

from __future__ import annotations

import torch

from . import _hf
from .attention import IMPLEMENTATIONS, handoff, left_padding
from .shape import check_supported, text_config

_hf.require()
from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: E402


class TCACacheLayer(CacheLayerMixin):
    """One layer's compressed cache: `state` is the backend's cache (PackedKVCache, ReferenceKVCache, ...)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, model_config=None, layer_idx: int = 0):
        super().__init__()
        self.state = None
        self.seen = 0  # tokens passed to update (positions 0 .. seen-1)
        self.layer_idx = layer_idx
        self._model_config = model_config
        self._awaiting_attention = False
        self.decode_backend = "auto"
        self.policy = None  # tca.Reselect or None (section 5c), given to tca.prefill

    # -- transformers' Cache protocol ---------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Record the new tokens k, v [B, HKV, LQ, D] and hand them, tagged, to the attention function."""
        self._check_attention_ran()
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
        import tca
        from tca.backends.common.packed_cache import PackedKVCache
        from tca.backends.common.reselecting_cache import ReselectingCache

        self._awaiting_attention = False
        self._leave_inference_tensors()
        if self.state is None:

            def prefill(qb, kb, vb):
                return tca.prefill(qb, kb, vb, budgets=settings.budgets, config=settings.config, scale=scale,
                                   backend=backend, policy=self.policy)

            pads = left_padding(attention_mask, k.shape[2])
            if not pads:
                out, self.state = prefill(q, k, v)
                return out
            out = torch.zeros_like(q)
            states = []
            for b, pad in enumerate(pads):
                out[b : b + 1, :, pad:], state = prefill(q[b : b + 1, :, pad:], k[b : b + 1, :, pad:], v[b : b + 1, :, pad:])
                states.append(state)
            joined = next((kind for kind in (PackedKVCache, ReselectingCache) if all(isinstance(s, kind) for s in states)), None)
            if joined is None:
                raise ValueError(
                    "padded batches need a backend with the packed cache (torch, triton or flash); the reference's "
                    "cache holds one length for the whole batch: run the sequences one at a time"
                )
            self.state = joined.concat(states)
            self.state.num_query_heads = q.shape[1]
            return out
        # Later chunks (a decode step, or several tokens appended to a filled cache) go one token at a time:
        # token r attends to the compressed past plus tokens r' <= r of the chunk, exactly as in section 5.
        kwargs = {"backend": self.decode_backend} if isinstance(self.state, (PackedKVCache, ReselectingCache)) else {}
        outs = [tca.decode(q[:, :, r : r + 1], k[:, :, r : r + 1], v[:, :, r : r + 1], self.state, **kwargs)
                for r in range(q.shape[2])]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _leave_inference_tensors(self) -> None:
        """A cache filled under torch.inference_mode() holds inference tensors, which cannot be updated in place
        outside it: copy them once into normal tensors (the reverse direction needs nothing)."""
        if self.state is None or torch.is_inference_mode_enabled():
            return
        for state in (self.state, getattr(self.state, "active", None)):  # a re-selecting cache wraps its active set
            if state is not None:
                _clone_inference_tensors(state)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for this layer's keys and values (0 before the prefill)."""
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
    batched run gives each prompt's tokens alone. One cache serves one generation: make a new one (or call
    `cache.reset()`) for the next prompt.

    decode_backend: "auto" (the fastest decode kernels for the device: Triton on a GPU, else torch) or a
    backend name; prefill runs on the model's TCA backend (enable_tca's `backend`).
    policy: None (section 5, the paper's rule) or tca.Reselect(every=N, offload=...) (section 5c: evicted tokens
    are kept and re-selected every N decode steps); `nbytes` then counts the evicted store too, and
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
        layers = [TCACacheLayer(config, index) for index in range(num_layers)]
        for layer in layers:
            layer.decode_backend = decode_backend
            layer.policy = policy
        super().__init__(layers=layers)

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

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values, all layers: the KV memory this cache really holds."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def used_nbytes(self) -> int:
        """Bytes of keys and values holding kept tokens (nbytes minus spare capacity, if the backend has any)."""
        return sum(
            int(getattr(layer.state, "used_nbytes", layer.state.nbytes)) for layer in self.layers if layer.state is not None
        )

    @property
    def offloaded_nbytes(self) -> int:
        """Bytes of keys and values in host memory (a re-selecting cache's offloaded store; else 0)."""
        return sum(int(getattr(layer.state, "offloaded_nbytes", 0)) for layer in self.layers if layer.state is not None)

    @property
    def device_nbytes(self) -> int:
        """Bytes of keys and values on the model's device: nbytes minus what is offloaded."""
        return self.nbytes - self.offloaded_nbytes

    @property
    def seq_len(self) -> int:
        """Tokens seen so far."""
        return self.layers[0].seen if self.layers else 0

    def kept_tokens(self) -> int:
        """Tokens kept, summed over layers, batch elements and KV heads."""
        return sum(int(layer.lengths.sum()) for layer in self.layers if layer.state is not None)

    def kept_fraction(self) -> float:
        """Kept tokens / tokens a dense cache would hold (same layers, batch, KV heads, sequence length)."""
        filled = [layer for layer in self.layers if layer.state is not None]
        if not filled:
            return 1.0
        dense = sum(_dense_positions(layer.state) * layer.lengths.shape[1] for layer in filled)
        return self.kept_tokens() / dense

    def dense_nbytes(self) -> int:
        """Bytes a dense cache of the same sequence would hold: 2 (K and V) x B x HKV x seq_len x D per layer."""
        total = 0
        for layer in self.layers:
            if layer.state is not None:
                H = layer.lengths.shape[1]
                element = torch.empty((), dtype=layer.dtype).element_size()
                total += 2 * H * _dense_positions(layer.state) * layer.state.head_dim * element
        return total


def _clone_inference_tensors(state) -> None:
    """Every inference tensor of a tca cache, also in ragged lists [b][h] (the reference's), copied once."""
    tensors = {name: t for name, t in vars(state).items() if isinstance(t, torch.Tensor) and t.is_inference()}
    for name, t in tensors.items():
        setattr(state, name, t.clone())
    for rows_name in ("keys", "values", "positions", "evicted_keys", "evicted_values", "evicted_positions"):
        rows = getattr(state, rows_name, None)
        if isinstance(rows, list):
            setattr(state, rows_name, [[t.clone() if t.is_inference() else t for t in row] for row in rows])


def _dense_positions(state) -> int:
    """Positions a dense cache of the same sequences holds per KV head, summed over the batch (padding excluded)."""
    seq_lens = getattr(state, "seq_lens", None)  # PackedKVCache: one length per sequence
    return sum(seq_lens) if seq_lens is not None else state.seq_len * state.batch_size

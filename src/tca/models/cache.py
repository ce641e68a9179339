"""TCACache: a transformers Cache that holds the TCA-compressed KV cache of every layer (semantics.md section 5).

In transformers >= 5 the modeling code calls `cache.update(k, v, layer_idx)` *before* the attention function,
and the attention function never sees the cache. So `update` does not store anything: it returns the new
tokens' k/v as fresh views tagged with their cache layer (attribute `_tca_cache_layer`), and the "tca"
attention function (attention.py), which also has the queries that TCA's selection needs, prefills or decodes
that layer's compressed state:

- prefill (first call): `tca.prefill` keeps, per batch element and KV head, only Sel_g U [J*b, L) (ragged);
- later calls: one `tca.decode` per new token (append, compress the block leaving the window, attend).

Shape letters: B batch, HQ query heads, HKV key/value heads, L tokens, D head dim.
"""

from __future__ import annotations

import torch

from . import _hf
from .attention import CACHE_TAG, IMPLEMENTATIONS
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
        keys, values = key_states.view(key_states.shape), value_states.view(value_states.shape)
        setattr(keys, CACHE_TAG, self)
        return keys, values

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

    def attend(self, q, k, v, settings, scale, backend) -> torch.Tensor:
        """Prefill (first call) or decode token by token. q [B, HQ, LQ, D], k, v [B, HKV, LQ, D] -> [B, HQ, LQ, D]."""
        import tca

        self._awaiting_attention = False
        if self.state is None:
            out, self.state = tca.prefill(
                q, k, v, budgets=settings.budgets, config=settings.config, scale=scale, backend=backend
            )
            return out
        # Later chunks (a decode step, or several tokens appended to a filled cache) go one token at a time:
        # token r attends to the compressed past plus tokens r' <= r of the chunk, exactly as in section 5.
        outs = [tca.decode(q[:, :, r : r + 1], k[:, :, r : r + 1], v[:, :, r : r + 1], self.state) for r in range(q.shape[2])]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

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

    Batches must hold sequences of equal length (no padding). One cache serves one generation: make a new
    one (or call `cache.reset()`) for the next prompt.
    """

    def __init__(self, model=None, num_layers: int | None = None):
        config = None
        if model is not None:
            check_supported(model)
            config = text_config(model)
            num_layers = config.num_hidden_layers
        if num_layers is None:
            raise ValueError("TCACache needs the model (TCACache(model)) or num_layers")
        layers = [TCACacheLayer(config, index) for index in range(num_layers)]
        super().__init__(layers=layers)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values, all layers: the KV memory this cache really holds."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def used_nbytes(self) -> int:
        """Bytes of keys and values holding kept tokens (nbytes minus spare capacity, if the backend has any)."""
        return sum(int(getattr(layer.state, "used_nbytes", layer.state.nbytes)) for layer in self.layers if layer.state is not None)

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
        dense = sum(layer.lengths.numel() * layer.state.seq_len for layer in filled)
        return self.kept_tokens() / dense

    def dense_nbytes(self) -> int:
        """Bytes a dense cache of the same sequence would hold: 2 (K and V) x B x HKV x seq_len x D per layer."""
        total = 0
        for layer in self.layers:
            if layer.state is not None:
                B, H = layer.lengths.shape
                d = _head_dim(layer.state)
                total += 2 * B * H * layer.state.seq_len * d * torch.empty((), dtype=layer.dtype).element_size()
        return total


def _head_dim(state) -> int:
    for name in ("local_k", "global_k"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            return t.shape[-1]
    return state.keys[0][0].shape[-1]  # ReferenceKVCache: ragged lists [b][h] of [n, D]

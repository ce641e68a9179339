"""TCA in vLLM on CUDA: vLLM's own FlashAttention backend, with TCA for the sequences long enough to gain from it.

The classes extend vLLM's FlashAttention backend, so pages, their layout, the KV writes and every dense step are
vLLM's own code. Per batch the builder decides, from host-side numbers it already has:
- every sequence under `dense_below` tokens (the crossover, settings.py) and at least one prompt row: the whole
  batch runs vLLM's FlashAttention unchanged (and always, in engines that can never reach `dense_below`, which
  keep all of vLLM's CUDA graphs);
- a batch of decode rows only (one token each): one batched decode step for all rows (paged_states.py: three
  kernel launches, no host synchronisation), each row with its sequence's TCA state, or exact attention over all
  its tokens when it has none. vLLM captures these batches in full CUDA graphs (UNIFORM_SINGLE_TOKEN_DECODE);
- otherwise the rows loop (layer.py): TCA for prompts and chunks reaching `dense_below`, exact attention for
  shorter ones, and the same batched decode step for the batch's decode rows.
The states live in pools shaped like vLLM's pages (paged_states.py), made by the builder when the engine sizes
its KV pool; a sequence that starts drops whatever state its first page held.

Shape letters: T tokens in the batch, HQ query heads, HKV key/value heads, D head dim, NP pages, P page size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from ...devices import to_device
from . import stats
from .checks import layer_settings, log_settings
from .layer import LayerRunner, Rows
from .memory import LIVE_BUILDERS, LIVE_IMPLS
from .paged import split_channels
from .paged_states import PagedStates, engine_states, states_usage
from .settings import engine_dense_below


@dataclass(frozen=True)
class TCABatch:
    """What the TCA layers need of one batch besides FlashAttention's metadata.

    states: the engine's decode states (None in engines that never run TCA); decode_only: every row is one token;
    rows: host copies for the rows loop, or None when FlashAttention runs alone or the batch is decode-only.
    """

    states: PagedStates | None
    decode_only: bool
    rows: Rows | None
    dense_below: int


class TCAFlashMetadataBuilder(FlashAttentionMetadataBuilder):
    # vLLM may reuse one group's metadata for another group of the same spec by swapping the block table; that
    # metadata would carry this builder's decode states, and the other group's sequences would not be dropped.
    supports_update_block_table = False

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        if vllm_config.model_config.max_model_len >= engine_dense_below(vllm_config):
            # decode-only batches replay from full graphs; batches with prompts run attention eagerly (host-driven)
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return super().get_cudagraph_support(vllm_config, kv_cache_spec)

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.dense_below = engine_dense_below(vllm_config, device)
        self.may_run_tca = vllm_config.model_config.max_model_len >= self.dense_below
        self.states = engine_states(kv_cache_spec, layer_names, vllm_config, device) if self.may_run_tca else None
        graphs = ("decode-only batches in full CUDA graphs, attention of batches with prompts eager"
                  if self.may_run_tca else "vLLM's CUDA graphs")
        log_settings(vllm_config, self.dense_below, graphs)
        LIVE_BUILDERS.add(self)

    @property
    def usage(self):
        """The decode counters of the batched step (memory.kv_usage sums them with the layers')."""
        return states_usage(self.states)

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        meta.tca = self.tca_batch(common_attn_metadata)
        if self.may_run_tca:
            stats.tick()  # here, as it runs every step, also when the forward replays from a graph
        return meta

    def tca_batch(self, common) -> TCABatch:
        if not self.may_run_tca:
            return TCABatch(None, False, None, self.dense_below)
        rows = common.num_reqs
        starts = common.query_start_loc_cpu[: rows + 1]
        # Exact for prompt rows, and for every row without speculative decoding (refused): no device sync.
        seq_lens = getattr(common, "seq_lens_cpu_upper_bound", None)
        seq_lens = common.seq_lens[:rows].cpu() if seq_lens is None else seq_lens[:rows]
        table = common.block_table_tensor[:rows]
        lengths = starts[1:] - starts[:-1]
        new = (lengths == seq_lens) & (seq_lens > 0)
        prefilling = getattr(common, "is_prefilling", None)
        if prefilling is not None:  # a dummy batch (an idle data-parallel rank) has stale rows that prefill nothing
            new[prefilling.shape[0]:] = False
            new[: prefilling.shape[0]] &= prefilling[:rows].to(torch.bool)
        new = new.nonzero().flatten()
        if new.numel():  # sequences that start here: whatever state their first page held is an earlier one's
            self.states.forget(table[to_device(new, table.device), 0])
        if common.max_query_len <= 1:
            return TCABatch(self.states, True, None, self.dense_below)
        if common.max_seq_len < self.dense_below:
            return TCABatch(self.states, False, None, self.dense_below)
        return TCABatch(self.states, False, Rows(starts.tolist(), seq_lens.tolist(), table), self.dense_below)


class TCAFlashImpl(FlashAttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes,
        sliding_window,
        kv_cache_dtype: str,
        logits_soft_cap=None,
        attn_type=AttentionType.DECODER,
        kv_sharing_target_layer_name=None,
        sinks=None,
    ) -> None:
        settings = layer_settings(num_kv_heads=num_kv_heads, head_size=head_size, alibi_slopes=alibi_slopes,
                                  sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, sinks=sinks,
                                  attn_type=attn_type, decoder=AttentionType.DECODER)
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self.tca = LayerRunner(num_heads, num_kv_heads, head_size, float(scale), settings)
        LIVE_IMPLS.add(self)

    @property
    def usage(self):
        return self.tca.usage

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """query [T, HQ, D]; kv_cache [NP, HKV, P, 2 * D] (FlashAttention's); writes output [T, HQ * D]."""
        batch = getattr(attn_metadata, "tca", None)
        if batch is None or batch.states is None or (batch.rows is None and not batch.decode_only):
            # profiling runs, engines that never run TCA, and batches of short sequences with a prompt
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("the TCA attention backend does not fuse output quantization")
        n = attn_metadata.num_actual_tokens
        self.tca.usage.pool_bytes = kv_cache.numel() * kv_cache.element_size()
        key_pages, value_pages = split_channels(kv_cache, self.head_size)
        batch.states.check_pool(key_pages)
        out = output[:n].view(-1, self.num_heads, self.head_size)
        if batch.decode_only:  # also what a CUDA graph captures: no host code of ours runs when it replays
            rows = min(n, attn_metadata.seq_lens.shape[0])
            batch.states.decode(layer.layer_name, query[:rows], key_pages, value_pages, attn_metadata.block_table,
                                attn_metadata.seq_lens, self.scale, out[:rows])
            return output
        self.tca.run(layer.layer_name, query[:n], key_pages, value_pages, batch.rows, out, batch.dense_below,
                           batch.states)
        return output


class TCAFlashBackend(FlashAttentionBackend):
    """`--attention-backend CUSTOM` on CUDA once tca's plugin registered it."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return TCAFlashImpl

    @staticmethod
    def get_builder_cls():
        return TCAFlashMetadataBuilder

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

"""TCA in vLLM on CUDA: vLLM's own FlashAttention backend, with TCA for the sequences long enough to gain from it.

The classes extend vLLM's FlashAttention backend, so pages, their layout, the KV writes and every dense step are
vLLM's own code. Per batch the builder decides, from host-side numbers it already has:
- every sequence under `dense_below` tokens (the crossover, settings.py): the whole batch runs vLLM's
  FlashAttention unchanged, with vLLM's CUDA graphs when the engine can never reach `dense_below`;
- otherwise the TCA rows loop (layer.py): TCA for long prompts and for the decode steps of sequences prefilled
  with TCA, exact dense attention for the others.
Engines whose `max_model_len` reaches `dense_below` declare no full CUDA-graph support for attention (vLLM then
captures the rest of the model piecewise and runs attention eagerly), since a captured graph would replay the
dense path for a sequence that needs TCA.

Shape letters: T tokens in the batch, HQ query heads, HKV key/value heads, D head dim, NP pages, P page size.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from .checks import layer_settings, log_settings
from .layer import LayerRunner, Rows
from .memory import LIVE_IMPLS
from .paged import split_channels
from .settings import engine_dense_below


@dataclass(frozen=True)
class TCABatch:
    """What the TCA layers need of one batch besides FlashAttention's metadata.

    rows: host copies for the TCA rows loop, or None when every sequence is dense (FlashAttention runs alone);
    fresh: first pages of sequences that start in this batch (their pages may hold an earlier sequence's state).
    """

    rows: Rows | None
    fresh: tuple[int, ...]
    dense_below: int


class TCAFlashMetadataBuilder(FlashAttentionMetadataBuilder):
    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        if vllm_config.model_config.max_model_len >= engine_dense_below(vllm_config):
            return AttentionCGSupport.NEVER  # TCA rows run a host-driven loop: attention stays out of full graphs
        return super().get_cudagraph_support(vllm_config, kv_cache_spec)

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.dense_below = engine_dense_below(vllm_config, device)
        self.may_run_tca = vllm_config.model_config.max_model_len >= self.dense_below
        graphs = "eager attention, the rest of the model in CUDA graphs" if self.may_run_tca else "vLLM's CUDA graphs"
        log_settings(vllm_config, self.dense_below, graphs)

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        meta.tca = self.tca_batch(common_attn_metadata)
        return meta

    def tca_batch(self, common) -> TCABatch:
        if not self.may_run_tca:
            return TCABatch(None, (), self.dense_below)
        rows = common.num_reqs
        starts = common.query_start_loc_cpu[: rows + 1]
        # Exact for prompt rows, and for every row without speculative decoding (refused): no device sync.
        seq_lens = getattr(common, "seq_lens_cpu_upper_bound", None)
        seq_lens = common.seq_lens[:rows].cpu() if seq_lens is None else seq_lens[:rows]
        table = common.block_table_tensor[:rows]
        new = ((starts[1:] - starts[:-1]) == seq_lens).nonzero().flatten().tolist()
        if common.max_seq_len < self.dense_below:
            # Only the pages of starting sequences are needed (their stale states are dropped): no copy otherwise.
            fresh = tuple(table[new, 0].tolist()) if new else ()
            return TCABatch(None, fresh, self.dense_below)
        owners = table[:, 0].tolist()  # one copy per step, so that the layers' loops never wait for the device
        fresh = tuple(owners[row] for row in new)
        return TCABatch(Rows(starts.tolist(), seq_lens.tolist(), table, owners), fresh, self.dense_below)


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
        if batch is not None and batch.fresh:
            self.tca.forget(batch.fresh)
        if batch is None or batch.rows is None:  # profiling runs, and batches of short sequences only
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("the TCA attention backend does not fuse output quantization")
        n = attn_metadata.num_actual_tokens
        self.tca.usage.pool_bytes = kv_cache.numel() * kv_cache.element_size()
        key_pages, value_pages = split_channels(kv_cache, self.head_size)
        out = output[:n].view(-1, self.num_heads, self.head_size)
        self.tca.run(layer.layer_name, query[:n], key_pages, value_pages, batch.rows, out, batch.dense_below)
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

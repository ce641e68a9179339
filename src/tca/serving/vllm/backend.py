"""The vLLM attention backend running TCA-Attention: metadata builder, layer implementation, backend class.

Imported by vLLM through the class path the plugin registers (`register` in this package), never by
`import tca`. One TCAAttentionImpl serves one attention layer: it writes new tokens into vLLM's pages, then
runs each sequence of the batch on its own (sequence.py): a prompt or prompt chunk through a tca backend's
selection and sparse attention, a decode token through the per-sequence state (docs/semantics.md section 5).
Mixed batches (prefills, chunks and decodes of different lengths in one forward) are handled row by row.

Shape letters: T tokens in the batch, HQ query heads, HKV key/value heads, D head dim, NP pages, P page size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from .checks import layer_settings, log_settings
from .compat import cpu_layouts
from .layer import LayerRunner, Rows
from .memory import LIVE_IMPLS
from .paged import split_pages, write_tokens
from .settings import engine_dense_below


@dataclass
class TCAMetadata:
    """One batch: host copies of the row boundaries and lengths (the per-row loop reads them), device tables."""

    num_actual_tokens: int
    query_start: list[int]  # [rows + 1]
    seq_lens: list[int]  # [rows]
    block_table: torch.Tensor  # [rows, max pages]
    slot_mapping: torch.Tensor  # [T]
    dense_below: int  # sequences shorter than this run dense (settings.engine_dense_below)


class TCAMetadataBuilder(AttentionMetadataBuilder[TCAMetadata]):
    _cudagraph_support = AttentionCGSupport.NEVER  # a Python loop over rows with host-side lengths

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.dense_below = engine_dense_below(vllm_config, device)
        log_settings(vllm_config, self.dense_below, "eager attention (vLLM's CPU engine)")

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        meta = common_attn_metadata
        rows = meta.num_reqs
        return TCAMetadata(
            num_actual_tokens=meta.num_actual_tokens,
            query_start=meta.query_start_loc_cpu[: rows + 1].tolist(),
            seq_lens=meta.seq_lens[:rows].cpu().tolist(),
            block_table=meta.block_table_tensor[:rows],
            slot_mapping=meta.slot_mapping,
            dense_below=self.dense_below,
        )


class TCAAttentionImpl(AttentionImpl[TCAMetadata]):
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
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name=None,
        sinks=None,
    ) -> None:
        settings = layer_settings(num_kv_heads=num_kv_heads, head_size=head_size, alibi_slopes=alibi_slopes,
                                  sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, sinks=sinks,
                                  attn_type=attn_type, decoder=AttentionType.DECODER)
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.attn_type = attn_type
        self.tca = LayerRunner(num_heads, num_kv_heads, head_size, float(scale), settings)
        LIVE_IMPLS.add(self)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        key_pages, value_pages = split_pages(kv_cache, self.head_size)
        n = min(key.shape[0], slot_mapping.shape[0])
        write_tokens(key_pages, value_pages, key[:n], value[:n], slot_mapping[:n])

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """query [T, HQ, D]; kv_cache [NP, HKV, P, 2 * D]; writes output [T, HQ * D] (or [T, HQ, D])."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("the TCA attention backend does not fuse output quantization")
        if attn_metadata is None:  # vLLM's profiling and warm-up runs
            return output
        key_pages, value_pages = split_pages(kv_cache, self.head_size)
        self.tca.usage.pool_bytes = kv_cache.numel() * kv_cache.element_size()
        out = output[: attn_metadata.num_actual_tokens].view(-1, self.num_heads, self.head_size)
        table = attn_metadata.block_table
        rows = Rows(attn_metadata.query_start, attn_metadata.seq_lens, table, table[:, 0].tolist())
        self.tca.run(layer.layer_name, query, key_pages, value_pages, rows, out, attn_metadata.dense_below)
        return output

    @property
    def usage(self):
        return self.tca.usage


class TCAAttentionBackend(AttentionBackend):
    """TCA-Attention for vLLM: `--attention-backend CUSTOM` once tca's plugin registered it (on any platform)."""

    forward_includes_kv_cache_update = False  # vLLM calls do_kv_cache_update first
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return TCAAttentionImpl

    @staticmethod
    def get_builder_cls():
        return TCAMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)  # what paged.split_pages reads

    @classmethod
    def supported_kv_cache_layouts(cls):
        return cpu_layouts()  # head-major pages (vLLM versions that choose a layout per backend)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

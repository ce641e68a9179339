"""The vLLM attention backend running TCA-Attention: metadata builder, layer implementation, backend class.

Imported by vLLM through the class path the plugin registers (`register` in this package), never by
`import tca`. One TCAAttentionImpl serves one attention layer: it writes new tokens into vLLM's pages, then
runs each sequence of the batch on its own (sequence.py): a prompt or prompt chunk through a tca backend's
selection and sparse attention, a decode token through the per-sequence state (docs/semantics.md section 5).
Mixed batches (prefills, chunks and decodes of different lengths in one forward) are handled row by row.

Shape letters: T tokens in the batch, HQ query heads, HKV key/value heads, D head dim, NP pages, P page size.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import KVCacheLayout

from ...backends import registry
from ...budgets import block_keep_count
from .checks import engine_problems, layer_problems
from .memory import LayerUsage
from .paged import PagedSequence, split_pages, write_tokens
from .sequence import SequenceState, attend_chunk, decode_step
from .settings import Settings, layer_index

# Every live layer implementation, for kv_usage() (memory.py): weak, so finished engines are not kept alive.
LIVE_IMPLS: weakref.WeakSet = weakref.WeakSet()


def refuse(vllm_config) -> None:
    problems = engine_problems(vllm_config)
    if problems:
        raise ValueError("the TCA attention backend cannot run this vLLM configuration:\n  - " + "\n  - ".join(problems))


@dataclass
class TCAMetadata:
    """One batch: host copies of the row boundaries and lengths (the per-row loop reads them), device tables."""

    num_actual_tokens: int
    query_start: list[int]  # [rows + 1]
    seq_lens: list[int]  # [rows]
    block_table: torch.Tensor  # [rows, max pages]
    slot_mapping: torch.Tensor  # [T]


class TCAMetadataBuilder(AttentionMetadataBuilder[TCAMetadata]):
    _cudagraph_support = AttentionCGSupport.NEVER  # a Python loop over rows with host-side lengths

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        refuse(vllm_config)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        meta = common_attn_metadata
        rows = meta.num_reqs
        return TCAMetadata(
            num_actual_tokens=meta.num_actual_tokens,
            query_start=meta.query_start_loc_cpu[: rows + 1].tolist(),
            seq_lens=meta.seq_lens[:rows].cpu().tolist(),
            block_table=meta.block_table_tensor[:rows],
            slot_mapping=meta.slot_mapping,
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
        problems = layer_problems(
            alibi_slopes=alibi_slopes, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, sinks=sinks,
            attn_type=attn_type, decoder=AttentionType.DECODER,
        )
        if problems:
            raise ValueError(
                "the TCA attention backend cannot run this model's attention: it uses " + "; ".join(problems)
                + "; serve it with vLLM's own backend (drop --attention-backend CUSTOM)"
            )
        refuse(get_current_vllm_config())
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.attn_type = attn_type
        self.settings = Settings.from_environment()
        # Per running sequence, keyed by its first page: unique while it runs (prefix caching is refused), and
        # a new owner of that page always starts with a prompt (context 0), which replaces the old state.
        self.states: dict[int, SequenceState] = {}
        self.usage = LayerUsage()
        self._budgets = None
        LIVE_IMPLS.add(self)

    def _layer_budgets(self, layer, device: torch.device, dtype: torch.dtype):
        if self._budgets is None:
            from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

            budgets = self.settings.layer_budgets(
                layer_index(layer.layer_name), self.num_kv_heads,
                get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(),
            )
            impl = registry.resolve(self.settings.backend, device, dtype, self.head_size).load()
            self._budgets = (budgets.to(device), block_keep_count(budgets).to(device), impl)
        return self._budgets

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
        budgets, keep, impl = self._layer_budgets(layer, query.device, query.dtype)
        config = self.settings.config
        key_pages, value_pages = split_pages(kv_cache, self.head_size)
        page_size = key_pages.shape[2]
        out = output[: attn_metadata.num_actual_tokens].view(-1, self.num_heads, self.head_size)
        self.usage.pool_bytes = kv_cache.numel() * kv_cache.element_size()
        bounds = attn_metadata.query_start
        kinds = set()
        for row, seq_len in enumerate(attn_metadata.seq_lens):
            start, end = bounds[row], bounds[row + 1]
            if end == start:
                continue
            pages = attn_metadata.block_table[row, : -(-seq_len // page_size)]
            paged = PagedSequence(key_pages, value_pages, pages)
            owner = int(pages[0])
            state = self.states.get(owner)
            if end - start == 1 and state is not None and state.seq_len == seq_len - 1:
                out[start] = decode_step(query[start], paged, state, keep, config, self.scale)
                kind = "decodes"
            else:
                # A prompt, a prompt chunk, or a row with no state to continue: section 4 over all its keys.
                out[start:end], state = attend_chunk(query[start:end], paged, seq_len, budgets, config, self.scale, impl)
                self.states[owner] = state
                kind = "prompts" if end - start == seq_len else "chunks"
            self.usage.add(kind, seq_len, state.kept_tokens(), self.head_size, key_pages.element_size())
            kinds.add(kind)
        if "decodes" in kinds and len(kinds) > 1:
            self.usage.mixed += 1
        return output


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

    @classmethod
    def supported_kv_cache_layouts(cls):
        return (KVCacheLayout.LBHNC,)  # pages [NP, HKV, P, 2 * D], what paged.split_pages reads

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

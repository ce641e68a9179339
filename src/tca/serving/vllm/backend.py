"""TCA in vLLM on the CPU: vLLM's own CPU attention backend, with TCA for the sequences long enough to gain from it.

Imported by vLLM through the class path the plugin registers (`register` in this package), never by
`import tca`. The classes extend vLLM's CPU backend (CPU_ATTN), so the pool, its page layout and the KV writes are
vLLM's own, and a batch whose sequences are all under `dense_below` (the crossover, settings.py) runs vLLM's CPU
kernel unchanged. Otherwise one TCAAttentionImpl runs its layer's rows (layer.py, as on CUDA): a prompt or prompt
chunk reaching `dense_below` through a tca backend's selection and sparse attention, every decode token through
one batched step over the sequences' states (paged_states.py, in PyTorch here), exact attention for the rest.

The plugin reads vLLM's pages where it knows their layout: for the `vec` and `vec16` instruction sets (x86
without AMX), each page holds, per KV head, its P keys channel-major ([D, P]) and then its P values ([P, D])
(paged.split_cpu_pages). On other instruction sets (AMX, Arm, Power, s390x, RISC-V) vLLM packs keys in ways the
plugin does not read: there the plugin writes and reads pages in its own layout (paged.split_pages) and computes
every row itself, vLLM's CPU kernel never runs.

Shape letters: T tokens in the batch, HQ query heads, HKV key/value heads, D head dim, NP pages, P page size.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from . import stats
from .checks import layer_settings, log_settings
from .layer import LayerRunner, Rows
from .memory import LIVE_BUILDERS, LIVE_IMPLS
from .paged import split_cpu_pages, split_pages, write_tokens
from .paged_states import PagedStates, engine_states, states_usage
from .settings import engine_dense_below

READABLE_ISAS = ("vec", "vec16")  # vLLM CPU instruction sets whose page layout the plugin reads


@dataclass(frozen=True)
class TCARows:
    """What the TCA layers need of one batch besides vLLM's CPU metadata: host copies of the row boundaries and
    lengths, whether every sequence is under dense_below, the engine's decode states."""

    rows: Rows
    short: bool
    dense_below: int
    states: PagedStates


class TCAMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.dense_below = engine_dense_below(vllm_config, device)
        self.states = engine_states(kv_cache_spec, layer_names, vllm_config, device)
        dense = ("vLLM's CPU kernel for batches under the crossover" if self.isa in READABLE_ISAS else
                 f"the plugin's own pages and attention (vLLM's {self.isa!r} page layout is not read)")
        log_settings(vllm_config, self.dense_below, f"eager attention (vLLM's CPU engine), {dense}")
        LIVE_BUILDERS.add(self)

    @property
    def usage(self):
        """The batched decode step's counters (memory.kv_usage sums them with the layers')."""
        return states_usage(self.states)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        common = common_attn_metadata
        rows = common.num_reqs
        starts = common.query_start_loc_cpu[: rows + 1].tolist()
        seq_lens = common.seq_lens[:rows].tolist()  # CPU tensors: no wait
        table = common.block_table_tensor[:rows]
        fresh = [r for r in range(rows) if 0 < seq_lens[r] == starts[r + 1] - starts[r]]
        if fresh:  # sequences that start here: whatever state their first page held is an earlier one's
            self.states.forget(table[fresh, 0])
        short = common.max_seq_len < self.dense_below
        meta.tca = TCARows(Rows(starts, seq_lens, table), short, self.dense_below, self.states)
        stats.tick()
        return meta


class TCAAttentionImpl(CPUAttentionBackendImpl):
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
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self.tca = LayerRunner(num_heads, num_kv_heads, head_size, float(scale), settings)
        LIVE_IMPLS.add(self)

    @staticmethod
    def _vllm_pages(layer) -> bool:
        return getattr(layer, "isa", None) in READABLE_ISAS

    def _pages(self, layer, kv_cache):
        split = split_cpu_pages if self._vllm_pages(layer) else split_pages
        return split(kv_cache, self.head_size)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self._vllm_pages(layer):
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
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
        batch = attn_metadata.tca
        if batch.short and self._vllm_pages(layer):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
        key_pages, value_pages = self._pages(layer, kv_cache)
        batch.states.check_pool(key_pages)
        self.tca.usage.pool_bytes = kv_cache.numel() * kv_cache.element_size()
        n = attn_metadata.num_actual_tokens
        out = output[:n].view(-1, self.num_heads, self.head_size)
        self.tca.run(layer.layer_name, query[:n], key_pages, value_pages, batch.rows, out, batch.dense_below,
                           batch.states)
        return output

    @property
    def usage(self):
        return self.tca.usage


class TCAAttentionBackend(CPUAttentionBackend):
    """TCA-Attention for vLLM on the CPU: `--attention-backend CUSTOM` once tca's plugin registered it."""

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
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

"""The decode states of every TCA layer of one CUDA engine, in pools shaped like vLLM's pages (pure PyTorch, no
vLLM import): what lets a decode step replay from a CUDA graph.

A sequence's state (docs/semantics.md section 5, positions only: keys and values stay in vLLM's pages) is found
through its block-table row, as its keys are (tca.backends.common.kernels_paged_decode): its kept positions in
the pages of its own row, its counts at its first page, -1 when it has no state (it was prefilled densely, or
is new). So a state needs no slot, no host bookkeeping and no allocation while the engine runs: the pools are
made once, when the engine sizes its KV pool, before vLLM captures its graphs. They take 4 bytes per token and KV
head per layer (`nbytes`), against 4 * D bytes (bf16 keys and values) of the KV pool itself. A state also records
how many tokens it covers, so that a step continues it only when it is that sequence's next token.

Shape letters: NL TCA layers, NP pages (vLLM's kernel blocks), HKV KV heads per rank, P page size.
"""

from __future__ import annotations

import torch

from ...budgets import block_keep_count
from ...config import TCAConfig


class PagedStates:
    """positions [NL, NP, HKV, P] int32, counts [NL, NP, HKV] int32 (-1: no state), covered [NL, NP] int32 (tokens
    each state covers), usage [NL, 3] int64 (decode rows with a state, KV bytes dense steps read, KV bytes read),
    keep [NL, HKV] int32 per layer."""

    def __init__(self, layer_names: list[str], budgets: list[torch.Tensor], num_pages: int, page_size: int,
                 config: TCAConfig, max_model_len: int, device: torch.device):
        HKV = budgets[0].shape[0]
        self.layer = {name: index for index, name in enumerate(layer_names)}
        self.config = config
        self.max_model_len = max_model_len
        self.num_pages, self.page_size = num_pages, page_size
        NL = len(layer_names)
        self.positions = torch.zeros(NL, num_pages, HKV, page_size, dtype=torch.int32, device=device)
        self.counts = torch.full((NL, num_pages, HKV), -1, dtype=torch.int32, device=device)
        self.covered = torch.zeros(NL, num_pages, dtype=torch.int32, device=device)
        self.usage = torch.zeros(NL, 3, dtype=torch.int64, device=device)
        self.keep = torch.stack([block_keep_count(b) for b in budgets]).to(device, torch.int32)
        self._splits: dict[int, int] = {}

    @property
    def nbytes(self) -> int:
        pools = (self.positions, self.counts, self.covered, self.usage, self.keep)
        return sum(t.numel() * t.element_size() for t in pools)

    def check_pool(self, key_pages: torch.Tensor) -> None:
        """Refuse a KV pool that the state pools were not made for (more pages, or other pages)."""
        NP, _, P, _ = key_pages.shape
        if (NP, P) != (self.num_pages, self.page_size):
            raise RuntimeError(
                f"the TCA decode states were made for {self.num_pages} pages of {self.page_size} tokens, but the KV "
                f"pool has {NP} pages of {P}: this vLLM version sizes its pool in a way the plugin does not follow"
            )

    def forget(self, first_pages: torch.Tensor) -> None:
        """Sequences starting now (first pages [n] on the device): no state, in every layer."""
        if first_pages.numel():
            self.counts[:, first_pages.long()] = -1

    def store(self, layer_name: str, block_table_row: torch.Tensor, kept: torch.Tensor, counts: torch.Tensor,
              seq_len: int) -> None:
        """The state a TCA prefill (or prompt chunk) of seq_len tokens of one sequence made in one layer
        (sequence.SequenceState)."""
        from ...backends.common.paged_decode_torch import store_state

        index = self.layer[layer_name]
        store_state(self.positions[index], self.counts[index], self.covered[index], block_table_row, kept, counts,
                    seq_len)

    def decode(self, layer_name: str, query: torch.Tensor, key_pages: torch.Tensor, value_pages: torch.Tensor,
               block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
        """Section 5 for rows of one token each (query [R, HQ, D]; seq_lens [R] after this step), with their states
        (or exact attention for rows with none): on CUDA three kernel launches, no host synchronisation (what a
        CUDA graph captures); elsewhere the same step in PyTorch."""
        index = self.layer[layer_name]
        pools = (self.positions[index], self.counts[index], self.covered[index], self.keep[index], self.usage[index])
        if not query.is_cuda:
            from ...backends.common.paged_decode_torch import paged_decode_torch

            return paged_decode_torch(query, key_pages, value_pages, block_table, seq_lens, *pools,
                                      self.config.block_size, self.config.window, scale, out=out)
        from ...backends.common.paged_decode import paged_decode, splits_for  # imports triton: only where it runs

        R = query.shape[0]
        splits = self._splits.get(R)
        if splits is None:  # fixed per batch size, so that a captured graph keeps its grid
            splits = self._splits[R] = splits_for(query.device, R, key_pages.shape[1], self.max_model_len)
        return paged_decode(query, key_pages, value_pages, block_table, seq_lens, *pools, self.config.block_size,
                            self.config.window, scale, splits, out=out)


def engine_states(kv_cache_spec, layer_names: list[str], vllm_config, device) -> PagedStates:
    """The states of one metadata builder's layers, sized from the KV pool vLLM allocated (called while the engine
    builds its attention backends, after it sized the pool and before it captures CUDA graphs)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    from .settings import Settings, layer_index

    settings = Settings.from_environment()
    heads = kv_cache_spec.num_kv_heads
    rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    budgets = [settings.layer_budgets(layer_index(name), heads, rank, world) for name in layer_names]
    cache = vllm_config.cache_config
    if not cache.num_gpu_blocks:
        raise RuntimeError("the TCA backend needs the KV pool's size when it is built (cache_config.num_gpu_blocks)")
    page = kv_cache_spec.block_size  # the kernel block: the pages the block table and the KV tensors count
    num_pages = cache.num_gpu_blocks * cache.block_size // page
    return PagedStates(layer_names, budgets, num_pages, page, settings.config, vllm_config.model_config.max_model_len,
                       torch.device(device))


def states_usage(states: PagedStates | None):
    """What memory.kv_usage reads of a builder: its states' pool bytes and the batched step's counters."""
    from .memory import LayerUsage

    if states is None:
        return LayerUsage()
    return LayerUsage(state_bytes=states.nbytes, paged=states.usage.sum(0))

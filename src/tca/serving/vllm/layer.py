"""One attention layer's TCA work over a vLLM batch (pure PyTorch, no vLLM import): the rows both backends share.

A batch is rows of query tokens (prompts, prompt chunks, decode steps) over vLLM's pages. Each row is one of:
- a **prompt or chunk** whose sequence reaches `dense_below` tokens: section 4 over all its keys, which becomes
  the sequence's state (sequence.attend_chunk, section 5.1), stored in the engine's page-shaped pools
  (paged_states.py);
- a **prompt or chunk** under `dense_below` tokens: exact causal attention over all its keys, no state;
- a **single token continuing a sequence**: every such row of the batch goes to one batched decode step
  (PagedStates.decode), which finds on the device whether the sequence has a state that ends where this token
  starts: section 5 on it, reading only the kept tokens; otherwise exact attention over every token (a sequence
  prefilled dense stays dense, as in tca's transformers integration).

`dense_below` is where TCA stops paying (tca.backends.crossover); 0 runs TCA on every row.
Shape letters: T tokens in the batch, HQ query heads, HKV key/value heads, D head dim, NP pages, P page size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...backends import routing
from ...backends.common.dense import causal_attention
from ...devices import to_device
from .memory import LayerUsage
from .paged import PagedSequence
from .sequence import attend_chunk
from .settings import Settings, layer_index


@dataclass(frozen=True)
class Rows:
    """Host copies of one batch's row boundaries and lengths, and the device block table.

    query_start: [rows + 1] token offsets; seq_lens: [rows] tokens of each sequence after this step;
    block_table: [rows, max pages] the pages of each row's sequence, in order.
    """

    query_start: list[int]
    seq_lens: list[int]
    block_table: torch.Tensor


class LayerRunner:
    """TCA for one attention layer: its budgets and the KV counters (the states are the engine's PagedStates)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float, settings: Settings):
        self.num_heads, self.num_kv_heads, self.head_size, self.scale = num_heads, num_kv_heads, head_size, scale
        self.settings = settings
        self.usage = LayerUsage()
        self._budgets = None

    def budgets(self, layer_name: str, device: torch.device, dtype: torch.dtype):
        """(budgets [HKV, len(K)] on `device`, the tca backend) of this layer, made once."""
        if self._budgets is None:
            from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

            budgets = self.settings.layer_budgets(
                layer_index(layer_name), self.num_kv_heads,
                get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(),
            )
            impl = routing.resolve(self.settings.backend, device, dtype, self.head_size).load()
            self._budgets = (budgets.to(device), impl)
        return self._budgets

    def run(self, layer_name: str, query: torch.Tensor, key_pages: torch.Tensor, value_pages: torch.Tensor,
            rows: Rows, out: torch.Tensor, dense_below: int, states) -> None:
        """query [T, HQ, D]; key_pages, value_pages [NP, HKV, P, D] (new tokens already written); out [T, HQ, D];
        states: the engine's paged_states.PagedStates (prompt and chunk rows store theirs, decode rows advance)."""
        budgets, impl = self.budgets(layer_name, query.device, query.dtype)
        config = self.settings.config
        page_size = key_pages.shape[2]
        element_size = key_pages.element_size()
        decoding = []  # rows of one token continuing a sequence
        kinds = set()
        for row, seq_len in enumerate(rows.seq_lens):
            start, end = rows.query_start[row], rows.query_start[row + 1]
            if end == start:
                continue
            if end - start == 1 and seq_len > 1:
                decoding.append(row)
                continue
            table = rows.block_table[row]
            paged = PagedSequence(key_pages, value_pages, table[: -(-seq_len // page_size)])
            if end - start > 1 and seq_len >= dense_below:
                out[start:end], state = attend_chunk(query[start:end], paged, seq_len, budgets, config, self.scale, impl)
                states.store(layer_name, table, state.positions, state.counts, seq_len)
                kind = "prompts" if end - start == seq_len else "chunks"
                self.usage.add(kind, seq_len, state.kept_tokens(), self.head_size, element_size)
                kinds.add(kind)
            else:  # a short prompt or chunk (its sequence keeps no state: the builder dropped any at its start)
                out[start:end] = dense_rows(query[start:end], paged, seq_len, self.scale)
        if decoding:
            starts = [rows.query_start[row] for row in decoding]
            lengths = [rows.seq_lens[row] for row in decoding]
            # one host-to-device copy: the rows' tokens, their block-table rows and their lengths
            index, table_rows, seq_lens = to_device(torch.tensor([starts, decoding, lengths]), query.device)
            seq_lens = seq_lens.to(torch.int32)
            tables = rows.block_table[table_rows.to(rows.block_table.device)]
            out[index] = states.decode(layer_name, query[index], key_pages, value_pages, tables, seq_lens, self.scale,
                                       torch.empty_like(query[index]))
            kinds.add("decodes")
        if "decodes" in kinds and len(kinds) > 1:
            self.usage.mixed += 1


def dense_rows(query: torch.Tensor, paged: PagedSequence, seq_len: int, scale: float) -> torch.Tensor:
    """Exact causal attention of query [LQ, HQ, D] (the last LQ positions) over all seq_len keys -> [LQ, HQ, D]."""
    k, v = paged.prefix(seq_len)  # [HKV, L, D]
    q = query.transpose(0, 1)[None]
    out = causal_attention(q, k[None].to(q.dtype), v[None].to(q.dtype), scale)
    return out[0].transpose(0, 1)

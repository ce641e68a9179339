"""The decode states of one layer's running sequences in device tensors, and one decode step for all decode rows
of a vLLM batch at once (pure PyTorch, no vLLM import).

A sequence's state (docs/semantics.md section 5, positions only: keys and values stay in vLLM's pages) is one
slot: `positions[slot]` [HKV, N] its kept global positions per KV head (ascending, -1 past the head's count),
`counts[slot]` [HKV] how many. The host holds what it needs to plan a step without reading the device: each
slot's sequence length and window start, and a mirror of the counts (they grow by the plan's keep per head,
a host number).

`decode` runs section 5 for R decode rows with a fixed number of operations whatever R: the rows whose window
moves compress their leaving block together (one gather, one softmax, one sort, one scatter), then every row
attends its kept tokens and its window in one masked SDPA over [R, HKV] groups. The per-sequence form it
batches is `sequence.decode_token`'s arithmetic; tests compare both with tca.decode.

Shape letters: R decode rows, S slots, HQ query heads, HKV key/value heads, G = HQ / HKV, D head dim, N kept
global positions (capacity), W window positions (the longest window of the rows), b TCA block size, P page size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...backends.common.decode_torch import leaving_block_importance
from ...config import TCAConfig
from ...devices import to_device
from ...dtypes import compute_dtype
from ...geometry import window_start
from .sequence import SequenceState


class DecodeStates:
    """The states of one layer, one slot per sequence (keyed by the sequence's first page, as LayerRunner keys it)."""

    def __init__(self, num_kv_heads: int) -> None:
        self.num_kv_heads = num_kv_heads
        self.positions: torch.Tensor | None = None  # [S, HKV, N] int64 on the device, -1 past each count
        self.counts: torch.Tensor | None = None  # [S, HKV] int64 on the device
        self.counts_host = torch.zeros(0, num_kv_heads, dtype=torch.int64)  # [S, HKV], the device counts' mirror
        self.seq_len: list[int] = []  # per slot: tokens the state covers
        self.window_start: list[int] = []  # per slot: lo(seq_len - 1)
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = []

    def __contains__(self, owner: int) -> bool:
        return owner in self.slot_of

    def covers(self, owner: int, seq_len: int) -> bool:
        """Whether `owner` has a state of the tokens before position seq_len - 1 (its next decode step)."""
        slot = self.slot_of.get(owner)
        return slot is not None and self.seq_len[slot] == seq_len - 1

    def kept_tokens(self, owner: int) -> torch.Tensor:
        """[HKV] tokens the owner's next step attends per head (global + window), on the host."""
        slot = self.slot_of[owner]
        return self.counts_host[slot] + (self.seq_len[slot] - self.window_start[slot])

    def put(self, owner: int, state: SequenceState) -> None:
        """Store the state a prefill (or prompt chunk) made for `owner` (replacing any earlier one)."""
        counts_host = state.counts.to("cpu")  # one read per layer and prompt: the prefill's selection has synced
        slot = self._slot(owner, state.positions.device)
        n = state.positions.shape[1]
        self._reserve(max(n, int(counts_host.max()) if counts_host.numel() else 0))
        self.positions[slot] = -1
        self.positions[slot, :, :n] = state.positions
        self.counts[slot] = state.counts
        self.counts_host[slot] = counts_host
        self.seq_len[slot], self.window_start[slot] = state.seq_len, state.window_start

    def drop(self, owner: int) -> None:
        slot = self.slot_of.pop(owner, None)
        if slot is not None:
            self.free.append(slot)

    def decode(self, owners: list[int], query: torch.Tensor, block_tables: torch.Tensor, key_pages: torch.Tensor,
               value_pages: torch.Tensor, keep: torch.Tensor, config: TCAConfig, scale: float) -> torch.Tensor:
        """One token for each of R sequences: query [R, HQ, D] at position seq_len of each owner's state (its key
        and value already in the pages); block_tables [R, pages] each row's pages in order; keep [HKV] int64 on
        the host (tokens kept of a block leaving the window). Returns out [R, HQ, D]; advances the states."""
        R, HQ, D = query.shape
        HKV, G = self.num_kv_heads, HQ // self.num_kv_heads
        device = query.device
        slots = [self.slot_of[o] for o in owners]
        position = [self.seq_len[s] for s in slots]
        lo = [window_start(p, config.block_size, config.window) for p in position]
        q = query.to(compute_dtype(query.dtype)).reshape(R, HKV, G, D)
        slots_t = to_device(torch.tensor(slots), device)
        moving = [r for r in range(R) if lo[r] > self.window_start[slots[r]]]
        if moving:
            self._compress(moving, slots, q, block_tables, key_pages, keep, config.block_size, scale)
        for r, s in enumerate(slots):
            self.seq_len[s], self.window_start[s] = position[r] + 1, lo[r]
        # Every kept position of each row: its globals (padded to the longest), then its window [lo, position].
        n = int(self.counts_host[slots].max())
        w = max(p - low + 1 for p, low in zip(position, lo, strict=True))
        glob = self.positions[slots_t, :, :n]  # [R, HKV, n]
        first = to_device(torch.tensor(lo), device)
        last = to_device(torch.tensor(position), device)
        window = first[:, None] + torch.arange(w, device=device)  # [R, W]
        window = torch.where(window <= last[:, None], window, -1)[:, None].expand(R, HKV, w)
        positions = torch.cat([glob, window], dim=-1)  # [R, HKV, n + W], -1 in the holes
        keys, values = _gather(key_pages, value_pages, block_tables, positions)
        mask = (positions >= 0)[:, :, None]  # [R, HKV, 1, n + W]
        # On CUDA, half-precision pages go to SDPA as they are (its kernels accumulate in float32); elsewhere the
        # float64-or-float32 rule of tca.dtypes. Not cuDNN's kernel: its plans are cached per key length.
        at = query.dtype if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) else q.dtype
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            out = F.scaled_dot_product_attention(q.to(at), keys.to(at), values.to(at), attn_mask=mask, scale=scale)
        return out.reshape(R, HQ, D).to(query.dtype)

    def _compress(self, moving: list[int], slots: list[int], q, block_tables, key_pages, keep, block: int,
                  scale: float) -> None:
        """Section 5 step 1 for the rows whose window moves: the block [lo(i-1), lo(i)) leaving it (b tokens) is
        scored by the row's query (the group's mean of a softmax, section 8's non-finite rule; ties to the smaller
        position); each head's keep[h] best tokens are appended, in position order, after its kept ones."""
        device = q.device
        width = int(keep.max())
        if width == 0:
            return
        moved = [slots[r] for r in moving]
        rows_t = to_device(torch.tensor(moving), device)
        moved_t = to_device(torch.tensor(moved), device)
        starts = to_device(torch.tensor([self.window_start[s] for s in moved]), device)  # [R']
        block_positions = (starts[:, None] + torch.arange(block, device=device))[:, None].expand(-1, self.num_kv_heads, -1)
        keys, _ = _gather(key_pages, key_pages, block_tables[rows_t], block_positions, values=False)  # [R', HKV, b, D]
        scores = leaving_block_importance(q[rows_t], keys, scale)  # [R', HKV, b]
        top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :width]  # [R', HKV, T]
        keep_t = to_device(keep, device)
        valid = torch.arange(width, device=device) < keep_t[:, None]  # [HKV, T]
        top = torch.where(valid, top, block).sort(dim=-1).values  # kept offsets ascending, the invalid last
        new = torch.where(valid, starts[:, None, None] + top, -1)  # [R', HKV, T]
        self._reserve(int((self.counts_host[moved] + keep).max()))
        capacity = self.positions.shape[-1]
        # Column `capacity` (one past the end) catches the invalid entries and is dropped.
        target = torch.where(valid, self.counts[moved_t][..., None] + torch.arange(width, device=device), capacity)
        grown = torch.cat([self.positions[moved_t], self.positions.new_full((len(moved), self.num_kv_heads, 1), -1)], -1)
        self.positions[moved_t] = grown.scatter(-1, target, new)[..., :capacity]
        self.counts[moved_t] += keep_t
        self.counts_host[moved] += keep

    def _slot(self, owner: int, device: torch.device) -> int:
        if owner in self.slot_of:
            return self.slot_of[owner]
        if self.positions is None:
            self.positions = torch.full((0, self.num_kv_heads, 0), -1, dtype=torch.int64, device=device)
            self.counts = torch.zeros(0, self.num_kv_heads, dtype=torch.int64, device=device)
        if self.free:
            slot = self.free.pop()
        else:
            slot = len(self.seq_len)
            self.seq_len.append(0)
            self.window_start.append(0)
            self.positions = torch.cat([self.positions, self.positions.new_full((1, *self.positions.shape[1:]), -1)])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(1, self.num_kv_heads)])
            self.counts_host = torch.cat([self.counts_host, self.counts_host.new_zeros(1, self.num_kv_heads)])
        self.slot_of[owner] = slot
        return slot

    def _reserve(self, columns: int) -> None:
        """Room for `columns` kept positions per slot and head (grown by half again, so that a decode loop copies
        the table a logarithmic number of times)."""
        capacity = self.positions.shape[-1]
        if columns > capacity:
            grown = self.positions.new_full((*self.positions.shape[:2], max(columns, capacity * 3 // 2)), -1)
            grown[..., :capacity] = self.positions
            self.positions = grown


def _gather(key_pages: torch.Tensor, value_pages: torch.Tensor, block_tables: torch.Tensor, positions: torch.Tensor,
            values: bool = True):
    """Keys (and values) of per-row, per-head positions [R, HKV, N] (holes -1 read position 0, to be masked):
    ([R, HKV, N, D], [R, HKV, N, D] or None). block_tables [R, pages]; key_pages, value_pages [NP, HKV, P, D]."""
    R, HKV, N = positions.shape
    page_size = key_pages.shape[2]
    positions = positions.clamp_min(0)
    pages = block_tables.long().gather(1, (positions // page_size).reshape(R, HKV * N)).reshape(R, HKV, N)
    offset = positions % page_size
    head = torch.arange(HKV, device=positions.device)[None, :, None]
    keys = key_pages[pages, head, offset]
    return keys, (value_pages[pages, head, offset] if values else None)

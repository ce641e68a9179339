"""The decode states of one layer's running sequences in device tensors, and one decode step for all decode rows
of a vLLM batch at once (pure PyTorch, no vLLM import).

A sequence's state (docs/semantics.md section 5, positions only: keys and values stay in vLLM's pages) is one
slot: per KV head its kept global positions (ascending) and how many. The positions live in fixed-size pages of
one pool, as vLLM keeps tokens: a slot lists its pages in order (`tables`), so memory follows what each sequence
keeps, not the longest one, and a dropped sequence's pages serve the next. The host holds what it needs to plan a
step without reading the device: each slot's sequence length, window start, page list and a mirror of its counts
(they grow by the plan's keep per head, a host number).

`decode` runs section 5 for R decode rows: the rows whose window moves compress their leaving block together
(one gather, one softmax, one sort, one scatter), then the rows attend their kept tokens and windows in groups,
one gather and one masked SDPA per group. Rows are grouped by how many tokens they read, so that padding a row to
its group's widest costs about twice its reads at most (the globals and the window are padded separately, so a
little more), and a group's gathered keys stay near GATHER_BYTES; a batch of similar rows is one group. Tests
compare every row with tca.decode of the same sequence alone.

Shape letters: R decode rows, S slots, HQ query heads, HKV key/value heads, G = HQ / HKV, D head dim, N kept
global positions, W window positions, b TCA block size, E positions per page of the pool.
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

PAGE = 256  # positions per page of the pool, per KV head
GATHER_BYTES = 256 << 20  # the most bytes of keys (and as many of values) one attention group gathers


class DecodeStates:
    """The states of one layer, one slot per sequence (keyed by the sequence's first page, as LayerRunner keys it)."""

    def __init__(self, num_kv_heads: int) -> None:
        self.num_kv_heads = num_kv_heads
        # The pool: page 0 is the sink, always -1 (table entries past a slot's pages point at it; invalid writes go
        # to it with the value -1).
        self.pool: torch.Tensor | None = None  # [pages, HKV, E] int32 on the device, -1 where nothing is kept
        self.free_pages: list[int] = []
        self.tables: list[list[int]] = []  # per slot: its pages, in order (host)
        self.table_device: torch.Tensor | None = None  # [S, most pages] int32, the tables padded with the sink
        self.counts: torch.Tensor | None = None  # [S, HKV] int64 on the device
        self.counts_host = torch.zeros(0, num_kv_heads, dtype=torch.int64)  # [S, HKV], the device counts' mirror
        self.seq_len: list[int] = []  # per slot: tokens the state covers
        self.window_start: list[int] = []  # per slot: lo(seq_len - 1)
        self.slot_of: dict[int, int] = {}
        self.free_slots: list[int] = []
        self._keep: tuple[torch.Tensor, torch.Tensor] | None = None  # (keep on the host, its device copy)

    def covers(self, owner: int, seq_len: int) -> bool:
        """Whether `owner` has a state of the tokens before position seq_len - 1 (its next decode step)."""
        slot = self.slot_of.get(owner)
        return slot is not None and self.seq_len[slot] == seq_len - 1

    def kept_tokens(self, owner: int) -> torch.Tensor:
        """[HKV] tokens the owner's next step attends per head (global + window), on the host."""
        slot = self.slot_of[owner]
        return self.counts_host[slot] + (self.seq_len[slot] - self.window_start[slot])

    @property
    def held_positions(self) -> int:
        """Positions the pages in use hold room for (4 bytes each; the pool keeps its free pages and never shrinks)."""
        return sum(len(t) for t in self.tables) * self.num_kv_heads * PAGE

    def put(self, owner: int, state: SequenceState) -> None:
        """Store the state a prefill (or prompt chunk) made for `owner` (replacing any earlier one)."""
        device = state.positions.device
        counts_host = state.counts.to("cpu")  # one read per layer and prompt: the prefill's selection has synced
        self.drop(owner)
        slot = self._new_slot(owner, device)
        n = state.positions.shape[1]
        pages = self._grow(slot, n, device)
        if pages:
            rows = state.positions.new_full((self.num_kv_heads, len(pages) * PAGE), -1)
            rows[:, :n] = state.positions
            self.pool[to_device(torch.tensor(pages), device)] = rows.view(self.num_kv_heads, len(pages), PAGE).transpose(
                0, 1).to(torch.int32)
        self.counts[slot] = state.counts
        self.counts_host[slot] = counts_host
        self.seq_len[slot], self.window_start[slot] = state.seq_len, state.window_start

    def drop(self, owner: int) -> None:
        """Forget `owner`'s state; its slot and pages serve later sequences."""
        slot = self.slot_of.pop(owner, None)
        if slot is None:
            return
        self.free_pages += self.tables[slot]
        self.tables[slot] = []
        self.table_device[slot] = 0
        self.free_slots.append(slot)

    def decode(self, owners: list[int], query: torch.Tensor, block_tables: torch.Tensor, key_pages: torch.Tensor,
               value_pages: torch.Tensor, keep: torch.Tensor, config: TCAConfig, scale: float) -> torch.Tensor:
        """One token for each of R sequences: query [R, HQ, D] at position seq_len of each owner's state (its key
        and value already in the pages); block_tables [R, pages] each row's pages in order; keep [HKV] int64 on
        the host (tokens kept of a block leaving the window). Returns out [R, HQ, D]; advances the states."""
        R, HQ, D = query.shape
        HKV, G = self.num_kv_heads, HQ // self.num_kv_heads
        slots = [self.slot_of[o] for o in owners]
        position = [self.seq_len[s] for s in slots]
        lo = [window_start(p, config.block_size, config.window) for p in position]
        q = query.to(compute_dtype(query.dtype)).reshape(R, HKV, G, D)
        moving = [r for r in range(R) if lo[r] > self.window_start[slots[r]]]
        if moving:
            self._compress(moving, slots, q, block_tables, key_pages, keep, config.block_size, scale)
        for r, s in enumerate(slots):
            self.seq_len[s], self.window_start[s] = position[r] + 1, lo[r]
        reads = [int(self.counts_host[s].max()) + p - low + 1 for s, p, low in zip(slots, position, lo, strict=True)]
        groups = _groups(reads, HKV * D * key_pages.element_size())
        out = None
        for group in groups:
            picked = [slots[r] for r in group]
            w = max(position[r] - lo[r] + 1 for r in group)
            # One host-to-device copy per group: its rows, their slots, window starts and positions.
            plan = to_device(torch.tensor([group, picked, [lo[r] for r in group], [position[r] for r in group]]),
                             query.device)
            got = self._attend(picked, w, plan, q, query.dtype, block_tables, key_pages, value_pages, scale)
            if group == list(range(R)):  # the common case: one group, the rows in their order
                return got.reshape(R, HQ, D)
            if out is None:
                out = torch.empty(R, HKV, G, D, dtype=query.dtype, device=query.device)
            out[plan[0]] = got
        return out.reshape(R, HQ, D)

    def _attend(self, picked: list[int], w: int, plan: torch.Tensor, q, dtype, block_tables, key_pages, value_pages,
                scale):
        """Section 5 step 3 for a group of rows (their slots `picked`, on the host): one softmax over each row's kept
        globals (padded to the group's most) and its window [lo, position] (padded to the longest, w). plan [4, rows]
        on the device: the rows, their slots, window starts and positions. Returns out [rows, HKV, G, D] in `dtype`."""
        device = q.device
        R, HKV = len(picked), self.num_kv_heads
        n = int(self.counts_host[picked].max())
        rows_t, slots_t, first, last = plan
        glob = self._positions(slots_t, n)  # [R, HKV, n]
        window = first[:, None] + torch.arange(w, device=device)  # [R, W]
        window = torch.where(window <= last[:, None], window, -1)[:, None].expand(R, HKV, w)
        positions = torch.cat([glob, window], dim=-1)  # [R, HKV, n + W], -1 in the holes
        keys, values = _gather(key_pages, value_pages, block_tables[rows_t], positions)
        mask = (positions >= 0)[:, :, None]  # [R, HKV, 1, n + W]
        qr = q[rows_t]
        # On CUDA, half-precision pages go to SDPA as they are (its kernels accumulate in float32); elsewhere the
        # float64-or-float32 rule of tca.dtypes. Not cuDNN's kernel: its plans are cached per key length.
        at = dtype if q.is_cuda and dtype in (torch.float16, torch.bfloat16) else qr.dtype
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            out = F.scaled_dot_product_attention(qr.to(at), keys.to(at), values.to(at), attn_mask=mask, scale=scale)
        return out.to(dtype)

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
        for slot in moved:
            self._grow(slot, int((self.counts_host[slot] + keep).max()), device)
        # One host-to-device copy: the rows, their slots and the starts of their leaving blocks.
        plan = to_device(torch.tensor([moving, moved, [self.window_start[s] for s in moved]]), device)
        rows_t, moved_t, starts = plan  # [R'] each
        block_positions = (starts[:, None] + torch.arange(block, device=device))[:, None].expand(-1, self.num_kv_heads, -1)
        keys, _ = _gather(key_pages, key_pages, block_tables[rows_t], block_positions, values=False)  # [R', HKV, b, D]
        scores = leaving_block_importance(q[rows_t], keys, scale)  # [R', HKV, b]
        top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :width]  # [R', HKV, T]
        keep_t = self._on_device(keep, device)
        valid = torch.arange(width, device=device) < keep_t[:, None]  # [HKV, T]
        top = torch.where(valid, top, block).sort(dim=-1).values  # kept offsets ascending, the invalid last
        new = torch.where(valid, starts[:, None, None] + top, -1)  # [R', HKV, T]
        # Entry c of (slot, head) lives in page tables[slot][c // E] at column c % E; invalid ones go to the sink.
        # (A head that keeps fewer than `width` would reach past the pages grown for it: look those up as entry 0.)
        entry = torch.where(valid, self.counts[moved_t][..., None] + torch.arange(width, device=device), 0)
        page = self.table_device[moved_t].long().gather(1, (entry // PAGE).flatten(1)).view_as(entry)
        page = torch.where(valid, page, 0)
        head = torch.arange(self.num_kv_heads, device=device)[None, :, None].expand_as(entry)
        self.pool.index_put_((page, head, entry % PAGE), new.to(torch.int32))
        self.counts[moved_t] += keep_t
        self.counts_host[moved] += keep

    def _on_device(self, keep: torch.Tensor, device: torch.device) -> torch.Tensor:
        """keep on the device, copied once per layer (the plan's keep does not change while the engine runs)."""
        if self._keep is None or self._keep[0] is not keep:
            self._keep = (keep, to_device(keep, device))
        return self._keep[1]

    def _positions(self, slots: torch.Tensor, n: int) -> torch.Tensor:
        """[R, HKV, n] int64: the first n kept positions of each slot and head, -1 past its count."""
        columns = torch.arange(n, device=slots.device)
        page = self.table_device[slots].long()[:, columns // PAGE]  # [R, n]
        head = torch.arange(self.num_kv_heads, device=slots.device)[None, :, None]
        return self.pool[page[:, None, :], head, (columns % PAGE)[None, None, :]].long()

    def _new_slot(self, owner: int, device: torch.device) -> int:
        if self.pool is None:
            self.pool = torch.full((1, self.num_kv_heads, PAGE), -1, dtype=torch.int32, device=device)
            self.table_device = torch.zeros(0, 1, dtype=torch.int32, device=device)
            self.counts = torch.zeros(0, self.num_kv_heads, dtype=torch.int64, device=device)
        if self.free_slots:
            slot = self.free_slots.pop()
        else:
            slot = len(self.tables)
            self.tables.append([])
            self.seq_len.append(0)
            self.window_start.append(0)
            self.table_device = torch.cat([self.table_device, self.table_device.new_zeros(1, self.table_device.shape[1])])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(1, self.num_kv_heads)])
            self.counts_host = torch.cat([self.counts_host, self.counts_host.new_zeros(1, self.num_kv_heads)])
        self.counts[slot] = 0
        self.counts_host[slot] = 0
        self.slot_of[owner] = slot
        return slot

    def _grow(self, slot: int, entries: int, device: torch.device) -> list[int]:
        """Pages enough for `entries` positions per head in `slot`; returns the pages added (reset to -1)."""
        table = self.tables[slot]
        need = -(-entries // PAGE) - len(table)
        if need <= 0:
            return []
        if len(self.free_pages) < need:  # grow the pool by half again (a logarithmic number of copies)
            total = self.pool.shape[0]
            more = max(need - len(self.free_pages), total // 2)
            self.pool = torch.cat([self.pool, self.pool.new_full((more, *self.pool.shape[1:]), -1)])
            self.free_pages += range(total, total + more)
        added = [self.free_pages.pop() for _ in range(need)]
        self.pool[to_device(torch.tensor(added), device)] = -1  # a page of an earlier sequence holds its positions
        first = len(table)
        table += added
        if len(table) > self.table_device.shape[1]:
            wider = self.table_device.new_zeros(self.table_device.shape[0], len(table))
            wider[:, : self.table_device.shape[1]] = self.table_device
            self.table_device = wider
        self.table_device[slot, first : len(table)] = to_device(torch.tensor(added, dtype=torch.int32), device)
        return added


def _groups(reads: list[int], row_bytes: int) -> list[list[int]]:
    """Rows grouped for attention: by tokens read, so that each group's longest reads at most twice its shortest,
    and each group's gathered keys stay under GATHER_BYTES (a row alone may exceed it)."""
    groups: list[list[int]] = []
    for r in sorted(range(len(reads)), key=lambda r: reads[r]):
        group = groups[-1] if groups else None
        if group and reads[r] <= 2 * reads[group[0]] and (len(group) + 1) * reads[r] * row_bytes <= GATHER_BYTES:
            group.append(r)
        else:
            groups.append([r])
    return groups


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

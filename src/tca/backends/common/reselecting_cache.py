"""ReselectingCache: decode with re-selection (docs/semantics.md section 5c) on a PackedKVCache.

The active set is a PackedKVCache (section 5, any backend's decode kernels); the evicted store keeps every token
section 5 drops, per (sequence, KV head), padded: evicted_k, evicted_v [B, HKV, E + 1, D], evicted_pos
[B, HKV, E + 1] (column E is scratch for predicated writes), evicted_len [B, HKV] (host; it follows from the
keep counts and the number of steps, so it is never read from the device).

Where the store lives (`offload`): on the cache's device, or in host memory (pinned when the device is a GPU).
A re-selection reads the keys of every candidate (the active global rows, and the store's keys, copied to the
device without blocking when offloaded), scores them with the current query, and swaps rows: the k-th token
entering the active set takes the place of the k-th one leaving it, so only the rows that change sides move
(and cross between host and device when offloaded). The global segments keep their sizes, so the bytes that
attention reads per step are section 5's.

With candidate blocks (`blocks=M`), the cache also keeps on the device the summary of every block that left the
window (per-channel min and max of its keys, [B, HKV, J', 2, D]); a re-selection reads the store's positions and
the summaries, bounds each block with the current query, and reads the keys of the chosen blocks' store tokens
only (at most M b per head, gathered from the store; offloaded, only those cross to the device).

Unlike the PackedKVCache, a step that re-selects or compresses reads a few counts back from the device (the
rows to swap), so these steps are not graph-capturable; the others are the active cache's steps.

Shape letters: B batch, HQ query heads, HKV key/value heads, G = HQ / HKV, D head dim, b block size,
N widest active global segment, E store columns, C = N + E candidates, P rows swapped per head.
"""

from __future__ import annotations

import math

import torch

from ...geometry import window_start
from . import decode_torch
from .packed_cache import PackedKVCache


class ReselectingCache:
    """Section 5c: a PackedKVCache (the active set) and an evicted store. Implements the cache contract
    (tca.backends.common.cache_protocol.KVCache) and its capabilities StepDecoding and Joinable, not GraphCapturable
    (a step that re-selects reads counts back from the device); made by
    `tca.prefill(..., policy=tca.Reselect(every=N))`."""

    backend = None  # any decode backend's kernels decode its active set

    def __init__(self, active: PackedKVCache, evicted_k, evicted_v, evicted_pos, evicted_len, *, every: int,
                 offload: bool, steps: int = 0, blocks: int | None = None, summaries: torch.Tensor | None = None) -> None:
        if every < 1:
            raise ValueError(f"a re-selecting cache needs every >= 1 (every=0 is the plain PackedKVCache), got {every}")
        self.active = active
        self.evicted_k, self.evicted_v, self.evicted_pos = evicted_k, evicted_v, evicted_pos
        self.evicted_len = evicted_len.to(device="cpu", dtype=torch.int64).clone()
        self.every = int(every)
        self.offload = bool(offload)
        self.steps = int(steps)
        self.blocks = blocks  # None, or the candidate blocks of a re-selection (section 5c)
        # With blocks: [B, HKV, J', 2, D] per-channel min and max of the keys of each block that left the window
        # (J' >= lo / b columns; those of a sequence's later blocks are unused), on the device
        self.summaries = summaries

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_prefill(cls, active: PackedKVCache, k: torch.Tensor, v: torch.Tensor, *, every: int, offload: bool = False,
                     blocks: int | None = None):
        """The store after a prefill: the positions before each sequence's length that `active` does not hold.

        k, v [B, HKV, L, D]: the prompt's dense keys and values ("bhsd")."""
        B, H, L, D = k.shape
        held = torch.zeros(B, H, L + 1, dtype=torch.bool, device=k.device)  # column L: where padding rows land
        n = int(active.global_len_host.max()) if active.global_len_host.numel() else 0
        offsets = torch.arange(n, device=k.device)
        valid = offsets < active.global_len[..., None]
        rows = torch.where(valid, active.global_start[..., None] + offsets, active.global_k.shape[0] - 1)
        held.scatter_(2, torch.where(valid, active.global_pos[rows], L), True)
        held[:, :, window_start(L - 1, active.config.block_size, active.config.window) :] = True
        dropped = ~held[:, :, :L]
        counts = dropped.sum(-1).cpu()  # the prefill's host read of the counts
        E = int(counts.max()) if counts.numel() else 0
        order = torch.where(dropped, torch.arange(L, device=k.device), L).sort(-1).values[..., :E]  # [B, HKV, E]
        filled = order < L
        pos = order.clamp_max(max(L - 1, 0))
        store_k, store_v = (_gather_rows(x, pos) * filled[..., None] for x in (k, v))
        store = _StoreLayout(active.device, offload)
        summaries = None
        if blocks is not None:  # every block before the window has left it
            J = window_start(L - 1, active.config.block_size, active.config.window) // active.config.block_size
            summaries = _block_summaries(k[:, :, : J * active.config.block_size], active.config.block_size)
        return cls(
            active, store.put(_pad_column(store_k)), store.put(_pad_column(store_v)),
            store.put(_pad_column(torch.where(filled, order, 0))), counts, every=every, offload=offload, blocks=blocks,
            summaries=summaries,
        )

    @classmethod
    def concat(cls, caches: list[ReselectingCache]) -> ReselectingCache:
        """One batch from caches of single sequences (prompts of different lengths), all at the same step."""
        first = caches[0]
        if any((c.every, c.offload, c.steps, c.blocks) != (first.every, first.offload, first.steps, first.blocks)
               for c in caches):
            raise ValueError("re-selecting caches joined into one batch must share every, offload, blocks and their step count")
        E = max(c.evicted_columns for c in caches)
        stores = [c._widened(E) for c in caches]
        summaries = None
        if first.blocks is not None:
            J = max(c.summaries.shape[2] for c in caches)
            summaries = torch.cat([_widened_summaries(c.summaries, J) for c in caches])
        return cls(
            PackedKVCache.concat([c.active for c in caches]),
            *(torch.cat([s[n] for s in stores]) for n in range(3)),
            torch.cat([c.evicted_len for c in caches]), every=first.every, offload=first.offload, steps=first.steps,
            blocks=first.blocks, summaries=summaries,
        )

    # ------------------------------------------------------------------ shape and size

    num_query_heads = property(lambda self: self.active.num_query_heads)
    budgets = property(lambda self: self.active.budgets)
    kernels = property(lambda self: self.active.kernels)
    config = property(lambda self: self.active.config)
    scale = property(lambda self: self.active.scale)
    batch_size = property(lambda self: self.active.batch_size)
    num_kv_heads = property(lambda self: self.active.num_kv_heads)
    head_dim = property(lambda self: self.active.head_dim)
    device = property(lambda self: self.active.device)
    dtype = property(lambda self: self.active.dtype)
    seq_lens = property(lambda self: self.active.seq_lens)
    seq_len = property(lambda self: self.active.seq_len)

    @property
    def evicted_columns(self) -> int:
        """E, the store's columns per (sequence, head), scratch excluded."""
        return self.evicted_k.shape[2] - 1

    @property
    def lengths(self) -> torch.Tensor:
        """[B, HKV] int64 tokens attention reads per step (the active set), on the host."""
        return self.active.lengths

    @property
    def evicted_lengths(self) -> torch.Tensor:
        """[B, HKV] int64 tokens in the evicted store, on the host."""
        return self.evicted_len.clone()

    @property
    def device_nbytes(self) -> int:
        """Bytes of keys and values allocated on the cache's device (the store too, unless offloaded; the block
        summaries of candidate blocks, which stay on the device)."""
        return self.active.nbytes + (0 if self.offload else self.evicted_nbytes) + self.summary_nbytes

    @property
    def summary_nbytes(self) -> int:
        """Bytes of the block summaries (per-channel min and max of each block's keys; 0 without blocks)."""
        return 0 if self.summaries is None else self.summaries.numel() * self.summaries.element_size()

    @property
    def offloaded_nbytes(self) -> int:
        """Bytes of keys and values allocated in host memory for the offloaded store (0 without offload)."""
        return self.evicted_nbytes if self.offload else 0

    @property
    def evicted_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.evicted_k, self.evicted_v))

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values, device and host: the active set plus the evicted store (plus the
        block summaries with candidate blocks)."""
        return self.active.nbytes + self.evicted_nbytes + self.summary_nbytes

    @property
    def used_nbytes(self) -> int:
        """Bytes holding tokens (active and evicted), without spare capacity or padding."""
        stored = 2 * int(self.evicted_len.sum()) * self.head_dim * self.evicted_k.element_size()
        return self.active.used_nbytes + stored

    def positions_of(self, b: int, h: int) -> torch.Tensor:
        """Sorted positions of the active set of (b, h)."""
        return self.active.positions_of(b, h)

    def evicted_positions_of(self, b: int, h: int) -> torch.Tensor:
        """Sorted positions in the store of (b, h) (on the store's device)."""
        return self.evicted_pos[b, h, : int(self.evicted_len[b, h])].sort().values

    # ------------------------------------------------------------------ the cache contract

    def compress_leaving(self, q: torch.Tensor) -> None:
        """Section 5 step 1 (the dropped tokens join the store), then a re-selection when steps % every == 0."""
        leaving = self.active._leaving_host()
        if any(leaving):
            block = self._leaving_block()
            if self.blocks is not None:
                self._summarise(block, leaving)
            before = self.active.global_len.clone()
            self.active.compress_leaving(q)
            self._store_dropped(block, before, torch.tensor(leaving))
        if self.steps % self.every == 0:
            self._reselect(q)
        self.steps += 1

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.active.append(k, v)

    def record(self, *, num_query_heads: int | None = None, budgets: torch.Tensor | None = None) -> None:
        """Record what a prefill knows beyond the tensors (on the active set; None leaves it as it is)."""
        self.active.record(num_query_heads=num_query_heads, budgets=budgets)

    def use_kernels(self, kernels) -> None:
        """Decode the active set on `kernels` from now on."""
        self.active.use_kernels(kernels)

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        return self.active.attend(q)

    def reset(self) -> None:
        self.active.reset()
        self.evicted_len.zero_()
        self.steps = 0
        if self.summaries is not None:
            self.summaries = self.summaries[:, :, :0]

    # ------------------------------------------------------------------ section 5 step 2: keep what it drops

    def _leaving_block(self):
        """(start [B], keys, values [B, HKV, b, D]) of the block leaving each window, read before it is compressed."""
        a = self.active
        bsz = a.config.block_size
        start = window_start(a.positions_t - 1, bsz, a.config.window)  # [B] lo(i - 1) of the next position i
        slots = (start[:, None] + torch.arange(bsz, device=a.device)) % a.window_slots  # [B, b]
        gather = slots[:, None, :, None].expand(-1, a.num_kv_heads, -1, a.head_dim)
        return start, a.local_k.gather(2, gather), a.local_v.gather(2, gather)

    def _store_dropped(self, block, before: torch.Tensor, leaving: torch.Tensor) -> None:
        """The tokens of the leaving block that section 5 did not append to the global segments join the store."""
        a = self.active
        start, block_k, block_v = block
        B, H, bsz, _ = block_k.shape
        T = max(a.keep_max, 1)
        added = a.global_len - before  # [B, HKV] rows appended by the compression
        offsets = torch.arange(T, device=a.device)
        valid = offsets < added[..., None]
        rows = torch.where(valid, (a.global_start + before)[..., None] + offsets, a.global_k.shape[0] - 1)
        kept = torch.zeros(B, H, bsz + 1, dtype=torch.bool, device=a.device)
        kept.scatter_(2, torch.where(valid, a.global_pos[rows] - start[:, None, None], bsz), True)
        moved = leaving.to(a.device)[:, None, None]
        dropped = ~kept[..., :bsz] & moved  # [B, HKV, b]
        new = leaving[:, None].to(torch.int64) * (bsz - a.keep_host)[None, :]  # [B, HKV] rows joining the store
        self._grow_store(int((self.evicted_len + new).max()))
        rank = dropped.cumsum(-1) - 1
        column = torch.where(dropped, self.evicted_len.to(a.device)[..., None] + rank, self.evicted_columns)
        positions = start[:, None, None] + torch.arange(bsz, device=a.device)
        self._write_store(column, block_k, block_v, positions.expand(B, H, bsz))
        self.evicted_len += new

    # ------------------------------------------------------------------ section 5c: re-selection

    def _reselect(self, q: torch.Tensor) -> None:
        """The active global tokens and the store compete, by the current query, for the active global places."""
        a = self.active
        n_host = a.global_len_host
        N = int(n_host.max()) if n_host.numel() else 0
        E = int(self.evicted_len.max()) if self.evicted_len.numel() else 0
        if N == 0 or E == 0:
            return  # nothing to choose from: every candidate is already active, or there are no places
        device = a.device
        qg = decode_torch.grouped_query(a, q)  # [B, HKV, G, D]
        g_valid = torch.arange(N, device=device) < a.global_len[..., None]  # [B, HKV, N]
        g_rows = torch.where(g_valid, a.global_start[..., None] + torch.arange(N, device=device), a.global_k.shape[0] - 1)
        e_len = self.evicted_len.to(device)
        e_valid = torch.arange(E, device=device) < e_len[..., None]  # [B, HKV, E]
        # The bytes a re-selection reads: the keys of every candidate (those of the store cross once when offloaded).
        if self.blocks is None:  # every store column is a candidate
            e_cols = torch.arange(E, device=device).expand_as(e_valid)
            e_k = self.evicted_k[:, :, :E].to(device, non_blocking=True)
            e_pos = self.evicted_pos[:, :, :E].to(device, non_blocking=True)
        else:  # only the store columns of the chosen blocks (their positions alone are read to find them)
            e_cols, e_valid = self._chosen_columns(qg, e_valid)
            E = e_cols.shape[-1]
            if E == 0:
                return
            store_cols = e_cols.to(self.evicted_k.device)
            e_k = self.evicted_k.gather(2, _expand_like(store_cols, self.evicted_k)).to(device, non_blocking=True)
            e_pos = self.evicted_pos.gather(2, store_cols).to(device, non_blocking=True)
        cand_k = torch.cat([a.global_k[g_rows], e_k], 2).to(qg.dtype)  # [B, HKV, C, D]
        cand_pos = torch.cat([a.global_pos[g_rows], e_pos], 2)
        cand_valid = torch.cat([g_valid, e_valid], 2)
        logits = torch.matmul(qg, cand_k.transpose(-1, -2)).mul_(a.scale)  # [B, HKV, G, C]
        logits.masked_fill_(~cand_valid[:, :, None], -math.inf)
        scores = logits.softmax(-1).mean(2).masked_fill_(~cand_valid, -math.inf)  # [B, HKV, C]
        # Ties to the smaller position: order the candidates by position, then a stable sort by score.
        by_pos = torch.where(cand_valid, cand_pos, torch.iinfo(torch.int64).max).sort(dim=-1, stable=True).indices
        ranked = by_pos.gather(-1, scores.gather(-1, by_pos).sort(dim=-1, descending=True, stable=True).indices)
        chosen = torch.zeros_like(cand_valid)
        chosen.scatter_(-1, ranked, torch.arange(N + E, device=device) < a.global_len[..., None])
        leaving = g_valid & ~chosen[..., :N]  # active rows that lose their place
        entering = chosen[..., N:]  # store columns that win one; as many as leaving, per head
        P = min(N, E)
        out_idx, out_valid = _first_true(leaving, P)  # [B, HKV, P] positions in the segment
        in_idx, _ = _first_true(entering, P)  # [B, HKV, P] candidates of the store
        in_idx = e_cols.gather(-1, in_idx)  # their store columns
        out_rows = torch.where(out_valid, g_rows.gather(-1, out_idx), a.global_k.shape[0] - 1)
        leaving_k, leaving_v, leaving_pos = a.global_k[out_rows], a.global_v[out_rows], a.global_pos[out_rows]
        # Entering rows: read from the store (values only for the rows that move), written into the leavers' rows.
        # Offloaded: this device-to-host copy waits for the stream, so the asynchronous reads of the pinned store
        # above are done before the store is written below.
        store_idx = in_idx.to(self.evicted_k.device)
        for flat, store in ((a.global_k, self.evicted_k), (a.global_v, self.evicted_v), (a.global_pos, self.evicted_pos)):
            rows_in = store.gather(2, _expand_like(store_idx, store)).to(device, non_blocking=True)
            flat[out_rows] = rows_in
        column = torch.where(out_valid, in_idx, self.evicted_columns)
        self._write_store(column, leaving_k, leaving_v, leaving_pos)
        _sort_segments(a, g_rows, g_valid)

    def _summarise(self, block, leaving: list[bool]) -> None:
        """Section 5c step 1b for the block leaving each moving window: its keys' per-channel min and max."""
        _, block_k, _ = block
        a = self.active
        b = a.config.block_size
        leaving_block = [window_start(n - 1, b, a.config.window) // b for n in a.seq_lens]  # lo(i - 1) / b, i next
        index = torch.tensor(leaving_block, device=block_k.device)
        need = max(leaving_block) + 1
        if need > self.summaries.shape[2]:  # room for 8 more blocks: growth (a copy) stays rare
            self.summaries = _widened_summaries(self.summaries, need + 8)
        moving = torch.tensor(leaving, device=block_k.device)
        new = _block_summaries(block_k, b)[:, :, 0]  # [B, HKV, 2, D]
        rows = torch.arange(block_k.shape[0], device=block_k.device)
        self.summaries[rows, :, index] = torch.where(moving[:, None, None, None], new, self.summaries[rows, :, index])

    def _chosen_columns(self, qg: torch.Tensor, e_valid: torch.Tensor):
        """Section 5c steps 1a-1e on the store: (columns [B, HKV, P'] of the evicted tokens in the chosen blocks, which
        of them exist), P' <= blocks x b. Reads the store's positions and the summaries, not the store's keys."""
        a = self.active
        b = a.config.block_size
        E = e_valid.shape[-1]
        J = max(window_start(n, b, a.config.window) // b for n in a.seq_lens)  # blocks before the next window
        e_block = torch.where(e_valid, self.evicted_pos[:, :, :E].to(qg.device) // b, J)  # invalid: scratch J
        evicted = torch.zeros(*e_valid.shape[:2], J + 1, dtype=torch.bool, device=qg.device)
        evicted.scatter_(2, e_block, e_valid)  # blocks holding a store token (every write to one block is True)
        summary = self.summaries[:, :, :J].to(qg.dtype)  # [B, HKV, J, 2, D]
        low, high = summary[:, :, None, :, 0], summary[:, :, None, :, 1]  # [B, HKV, 1, J, D]
        q = qg[:, :, :, None]  # [B, HKV, G, 1, D]
        bound = torch.maximum(q * low, q * high).sum(-1).mul(a.scale).amax(2)  # [B, HKV, J]
        bound = bound.masked_fill(~evicted[..., :J], -math.inf)
        top = min(self.blocks, J)
        ranked = bound.sort(dim=-1, descending=True, stable=True).indices[..., :top]  # ties: the smaller block
        chosen = torch.zeros_like(evicted)
        chosen.scatter_(2, ranked, evicted.gather(2, ranked))
        columns = e_valid & chosen.gather(2, e_block)
        return _first_true(columns, min(E, top * b))

    # ------------------------------------------------------------------ the store

    def _write_store(self, column, keys, values, positions) -> None:
        """Store column column[b, h, r] of (b, h) takes keys/values [B, HKV, R, D], positions [B, HKV, R]; the
        scratch column E takes the rows that must not land."""
        target = self.evicted_k.device
        column = column.to(target)
        B, H, R = column.shape
        b_idx = torch.arange(B, device=target)[:, None, None].expand(B, H, R)
        h_idx = torch.arange(H, device=target)[None, :, None].expand(B, H, R)
        # Host-bound copies block: the store is written on the host right after.
        self.evicted_k[b_idx, h_idx, column] = keys.to(target, dtype=self.evicted_k.dtype)
        self.evicted_v[b_idx, h_idx, column] = values.to(target, dtype=self.evicted_v.dtype)
        self.evicted_pos[b_idx, h_idx, column] = positions.to(target)

    def _grow_store(self, need: int) -> None:
        if need <= self.evicted_columns:
            return
        # Room for 8 more leaving blocks: growth (a copy of the store) is rare, and the spare stays small.
        grown = self._widened(need + 8 * self.active.config.block_size)
        layout = _StoreLayout(self.active.device, self.offload)
        self.evicted_k, self.evicted_v, self.evicted_pos = (layout.put(t) for t in grown)

    def _widened(self, E: int):
        """(keys, values, positions) of the store with E columns plus scratch."""
        old = self.evicted_columns
        out = []
        for t in (self.evicted_k, self.evicted_v, self.evicted_pos):
            shape = (*t.shape[:2], E + 1, *t.shape[3:])
            wide = t.new_zeros(shape)
            wide[:, :, :old] = t[:, :, :old]
            out.append(wide)
        return out

    def __repr__(self) -> str:
        return (f"ReselectingCache(every={self.every}, offload={self.offload}, blocks={self.blocks}, steps={self.steps}, "
                f"evicted={self.evicted_len.tolist()}, active={self.active!r})")


class _StoreLayout:
    """Where the store lives: the device, or host memory (pinned for a GPU device, for asynchronous copies)."""

    def __init__(self, device: torch.device, offload: bool) -> None:
        self.target = torch.device("cpu") if offload else device
        self.pin = offload and device.type == "cuda"

    def put(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.target)
        return t.pin_memory() if self.pin else t


def _block_summaries(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Per-channel min and max of the keys of each whole block: k [B, HKV, J b, D] -> [B, HKV, J, 2, D]."""
    B, H, n, D = k.shape
    blocks = k.reshape(B, H, n // block_size, block_size, D)
    return torch.stack([blocks.amin(3), blocks.amax(3)], 3)


def _widened_summaries(summaries: torch.Tensor, J: int) -> torch.Tensor:
    """The summaries with J block columns (new ones zero: unused until their block leaves the window)."""
    wide = summaries.new_zeros(*summaries.shape[:2], J, *summaries.shape[3:])
    wide[:, :, : summaries.shape[2]] = summaries[:, :, :J]
    return wide


def _gather_rows(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [B, HKV, L, D] at positions pos [B, HKV, E] -> [B, HKV, E, D]."""
    return x.gather(2, pos[..., None].expand(-1, -1, -1, x.shape[-1]))


def _pad_column(t: torch.Tensor) -> torch.Tensor:
    """One zero scratch column appended along dim 2."""
    pad = t.new_zeros(*t.shape[:2], 1, *t.shape[3:])
    return torch.cat([t, pad], 2)


def _expand_like(index: torch.Tensor, store: torch.Tensor) -> torch.Tensor:
    return index[..., None].expand(-1, -1, -1, store.shape[-1]) if store.dim() == 4 else index


def _first_true(mask: torch.Tensor, P: int):
    """Indices of the first P true entries along the last dim (ascending) and which of them exist."""
    n = mask.shape[-1]
    keyed = torch.where(mask, torch.arange(n, device=mask.device), n)
    idx = keyed.sort(-1).values[..., :P]
    return idx.clamp_max(n - 1), idx < n


def _sort_segments(active: PackedKVCache, rows: torch.Tensor, valid: torch.Tensor) -> None:
    """Puts each global segment back in position order (the PackedKVCache's invariant) after rows were swapped."""
    key = torch.where(valid, active.global_pos[rows], torch.iinfo(torch.int64).max)
    order = rows.gather(-1, key.argsort(-1))
    target = torch.where(valid, rows, active.global_k.shape[0] - 1)
    for flat in (active.global_k, active.global_v, active.global_pos):
        flat[target] = flat[order]

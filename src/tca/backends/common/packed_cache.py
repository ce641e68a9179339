"""PackedKVCache: the compressed KV cache of docs/semantics.md section 5, ragged per KV head, sync-free decode.

Storage shared by the `torch`, `triton` and `flash` backends and the transformers Cache. Per sequence b and
KV head h it holds exactly the positions Sel_h U [lo(i_b), i_b] (i_b = seq_lens[b] - 1):

* local part, a ring buffer of the window: local_k, local_v [B, HKV, W, D]; position p of sequence b lives
  in slot p % W. W = min(window, the longest sequence planned, rounded up to a block), so a short prompt does
  not allocate a whole window; `reserve` grows it (only before the first wrap, when slot p == p).
* global part, one flat buffer with one contiguous segment per (b, h), in position order:
  global_k, global_v [N + 1, D], global_pos [N + 1] int64; segment (b, h) occupies rows
  global_start[b, h] .. + global_len[b, h] of a capacity global_cap[b, h]. Row N is scratch: predicated
  writes that must not land (a sequence whose window did not move) go there.

Sequences of one batch may have different lengths (left-padded prompts are prefilled one by one and joined):
each has its own position, window and leaving blocks.

Host and device state. Everything a decode step needs lives on the device (global_start/global_len, the
per-sequence positions `positions_t`, the keep counts), so a step issues no host synchronisation and can be
captured in a CUDA graph. The host keeps a mirror of the lengths (`seq_lens`, `global_len_host`): they follow
deterministically from the prefill's counts and the number of steps, so `lengths`, `nbytes` and the capacity
planning of `reserve` never read the device. A captured step replays only the device half: whoever replays it
calls `advance_host()` once per replay.

Shape letters: B batch, HKV key/value heads, W ring slots, N rows of the flat global buffer, T rows appended
per head, D head dim, b block size.
"""

from __future__ import annotations

import torch

from ...config import TCAConfig
from ...devices import to_device as _to_device
from ...geometry import window_start
from . import block_budgets, decode_torch
from .cache_protocol import HoldsPrefillFacts


class PackedKVCache(HoldsPrefillFacts):
    """The compressed KV cache (section 5): a local ring of the window plus ragged global segments per head.

    Implements the cache contract (tca.backends.common.cache_protocol.KVCache) and its capabilities StepDecoding,
    Joinable and GraphCapturable. `kernels` supplies the device work of a decode step (`compress(cache, q)`,
    `attend(cache, q)`): the torch implementation by default, a backend's kernels (e.g. Triton's) when that
    backend decodes.
    """

    backend = None  # any decode backend's kernels decode it

    def __init__(
        self,
        *,
        config: TCAConfig,
        scale: float,
        keep_per_block: torch.Tensor,
        seq_lens: list[int],
        local_k: torch.Tensor,
        local_v: torch.Tensor,
        global_k: torch.Tensor,
        global_v: torch.Tensor,
        global_pos: torch.Tensor,
        global_len_host: torch.Tensor,
        global_cap: torch.Tensor,
        num_query_heads: int | None = None,
        budgets: torch.Tensor | None = None,
        kernels=None,
    ) -> None:
        self.config = config
        self.budgets = budgets  # [HKV, len(K)] the cache was made with, when recorded (streaming chunks reuse them)
        self.scale = float(scale)
        self.keep_host = keep_per_block.to(device="cpu", dtype=torch.int64)  # [HKV] t per leaving block
        self.keep_max = int(self.keep_host.max()) if self.keep_host.numel() else 0
        self.num_query_heads = num_query_heads
        self.kernels = kernels or decode_torch
        self.local_k, self.local_v = local_k, local_v
        self.global_k, self.global_v, self.global_pos = global_k, global_v, global_pos
        self.seq_lens = [int(n) for n in seq_lens]
        self.global_len_host = global_len_host.to(device="cpu", dtype=torch.int64).clone()
        self.global_cap = global_cap.to(device="cpu", dtype=torch.int64).clone()
        device = local_k.device
        self.keep = _to_device(self.keep_host, device)
        self.positions_t = _to_device(torch.tensor(self.seq_lens, dtype=torch.int64), device)  # next position
        self.global_start = _to_device(_exclusive_cumsum(self.global_cap), device)
        self.global_len = _to_device(self.global_len_host, device)
        self.static = False  # True while a captured step is replayed: always run the predicated device work

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_indices(cls, k, v, indices, counts, keep_per_block, config: TCAConfig, scale: float, starts=None, **kwargs):
        """The cache after a prefill of L tokens: the selected positions (global) and [J*b, L) (local ring).

        k, v [B, HKV, L, D] "bhsd"; indices [B, HKV, N] sorted selected positions, valid where < counts [B, HKV]
        (or [1, HKV]), any value after them (they are clamped into [0, L) and never read: the compact form's L,
        or 0); keep_per_block [HKV] int64. Counts and keep counts on the host cost nothing; on the device
        they are read once (a host synchronisation: prefills use from_selected, which has none).
        starts: None, or [B] host ints, a left-padded batch: sequence b is k[b, :, starts[b]:], its indices and
        cached positions relative to its start.
        """
        B, HKV, L, D = k.shape
        device = k.device
        b, w = config.block_size, config.window
        starts = [0] * B if starts is None else [int(s) for s in starts]
        lens = [L - s for s in starts]
        counts_host = counts.to(device="cpu", dtype=torch.int64).expand(B, HKV).contiguous()  # free if on the host
        N = indices.shape[-1]
        pos = indices.to(device=device, dtype=torch.int64).clamp(0, max(L - 1, 0)).flatten()  # (b, h, n) order
        n_total = int(counts_host.sum())
        global_k = k.new_zeros(n_total + 1, D)
        global_v = v.new_zeros(n_total + 1, D)
        global_pos = torch.zeros(n_total + 1, dtype=torch.int64, device=device)
        if n_total:
            # Row r of the flat buffer is entry n = r - start[s] of segment s = (b, h): gathered in one pass, with
            # sizes known on the host (no compaction that would read the device).
            start = _to_device(_exclusive_cumsum(counts_host).flatten(), device)
            r = torch.arange(n_total, device=device)
            seg = torch.searchsorted(start, r, right=True) - 1
            p = pos[seg * N + r - start[seg]]
            b_of, h_of = seg // HKV, seg % HKV
            shift = 0 if not any(starts) else _to_device(torch.tensor(starts), device)[b_of]
            global_k[:n_total] = k[b_of, h_of, p + shift]
            global_v[:n_total] = v[b_of, h_of, p + shift]
            global_pos[:n_total] = p
        W = ring_slots(max(lens), config)
        local_k = k.new_zeros(B, HKV, W, D)
        local_v = v.new_zeros(B, HKV, W, D)
        if not any(starts):
            lo = window_start(L - 1, b, w)
            slots = torch.arange(lo, L, device=device) % W
            local_k[:, :, slots] = k[:, :, lo:L]
            local_v[:, :, slots] = v[:, :, lo:L]
        else:
            # Each sequence's window [lo_b, len_b) in its own positions; the shorter windows repeat their last
            # position (the same value written twice to one slot), so one gather serves the batch.
            n = torch.tensor(lens)
            lo = torch.tensor([window_start(length - 1, b, w) for length in lens])
            held = n - lo  # positions in each window
            rel = lo[:, None] + torch.minimum(torch.arange(int(held.max())), held[:, None] - 1)
            src = _to_device(rel + torch.tensor(starts)[:, None], device)
            slots = _to_device(rel % W, device)
            rows = torch.arange(B, device=device)[:, None]
            local_k[rows, :, slots] = k[rows, :, src]
            local_v[rows, :, slots] = v[rows, :, src]
        return cls(
            config=config, scale=scale, keep_per_block=keep_per_block, seq_lens=lens,
            local_k=local_k, local_v=local_v, global_k=global_k, global_v=global_v, global_pos=global_pos,
            global_len_host=counts_host, global_cap=counts_host, **kwargs,
        )

    @classmethod
    def from_selected(cls, k, v, indices, budgets, config: TCAConfig, scale: float, starts=None,
                      record_budgets: bool = False, **kwargs):
        """from_indices for a prefill's selection made with `budgets` [HKV, len(K)]: the counts come from the
        budgets on the host (block_budgets.selection_sizes), so building the cache never waits for the device.
        starts: as from_indices (each sequence keeps what a prefill of its own length keeps). record_budgets: the
        cache records `budgets` too (later streaming chunks reuse them)."""
        if record_budgets:
            kwargs["budgets"] = budgets
        L = k.shape[2]
        if starts is None:
            counts, keep = block_budgets.selection_sizes(budgets, L, config)
            return cls.from_indices(k, v, indices, counts[None, :], keep, config, scale, **kwargs)
        sizes = [block_budgets.selection_sizes(budgets, L - s, config) for s in starts]
        counts = torch.stack([c for c, _ in sizes])
        return cls.from_indices(k, v, indices, counts, sizes[0][1], config, scale, starts=starts, **kwargs)

    @classmethod
    def from_prefill(cls, k, v, selection, keep_per_block, config: TCAConfig, scale: float, **kwargs):
        """Like from_indices, from a tca.Selection made for L."""
        indices, counts = selection.padded_indices(fill=0)  # entries past counts are ignored: 0 is as good as L
        return cls.from_indices(k, v, indices, counts, keep_per_block, config, scale, **kwargs)

    @classmethod
    def concat(cls, caches: list[PackedKVCache]) -> PackedKVCache:
        """One batch from caches of single sequences (e.g. prompts of different lengths, prefilled one by one)."""
        first = caches[0]
        for other in caches[1:]:
            if (other.config, other.scale, other.num_kv_heads, other.head_dim, other.dtype, other.device) != (
                first.config, first.scale, first.num_kv_heads, first.head_dim, first.dtype, first.device
            ) or not torch.equal(other.keep_host, first.keep_host):
                raise ValueError("caches joined into one batch must share config, scale, keep counts, heads, dtype, device")
        W = max(c.window_slots for c in caches)
        for c in caches:
            c._grow_ring(W)
        used = [c.global_k[: int(c.global_cap.sum())] for c in caches]
        used_v = [c.global_v[: int(c.global_cap.sum())] for c in caches]
        used_pos = [c.global_pos[: int(c.global_cap.sum())] for c in caches]
        return cls(
            config=first.config, scale=first.scale, keep_per_block=first.keep_host,
            seq_lens=[n for c in caches for n in c.seq_lens],
            local_k=torch.cat([c.local_k for c in caches]), local_v=torch.cat([c.local_v for c in caches]),
            global_k=torch.cat([*used, first.global_k[-1:]]), global_v=torch.cat([*used_v, first.global_v[-1:]]),
            global_pos=torch.cat([*used_pos, first.global_pos[-1:]]),
            global_len_host=torch.cat([c.global_len_host for c in caches]),
            global_cap=torch.cat([c.global_cap for c in caches]),
            num_query_heads=first.num_query_heads, kernels=first.kernels,
        )

    # ------------------------------------------------------------------ shape and size

    @property
    def batch_size(self) -> int:
        return self.local_k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.local_k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.local_k.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.local_k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.local_k.dtype

    @property
    def window_slots(self) -> int:
        """W, the ring's number of slots."""
        return self.local_k.shape[2]

    @property
    def seq_len(self) -> int:
        """Tokens seen by the longest sequence (all of them when the batch has one length)."""
        return max(self.seq_lens) if self.seq_lens else 0

    def local_start(self, b: int = 0) -> int:
        """lo(i) of sequence b: the first position in its local ring."""
        n = self.seq_lens[b]
        return window_start(n - 1, self.config.block_size, self.config.window) if n else 0

    @property
    def local_counts(self) -> torch.Tensor:
        """[B] int64 positions in each sequence's local ring (host)."""
        return torch.tensor([n - self.local_start(b) for b, n in enumerate(self.seq_lens)], dtype=torch.int64)

    @property
    def lengths(self) -> torch.Tensor:
        """[B, HKV] int64 cached tokens per sequence and KV head (global + local), on the host: no sync."""
        return self.global_len_host + self.local_counts[:, None]

    @property
    def nbytes(self) -> int:
        """Bytes ALLOCATED for keys and values (local ring + global buffer; positions excluded): the honest memory."""
        return sum(t.numel() * t.element_size() for t in (self.local_k, self.local_v, self.global_k, self.global_v))

    @property
    def used_nbytes(self) -> int:
        """Bytes of keys and values actually holding kept tokens: 2 * sum(lengths) * D * element size."""
        return 2 * int(self.lengths.sum()) * self.head_dim * self.local_k.element_size()

    @property
    def offloaded_nbytes(self) -> int:
        """Bytes of keys and values in host memory: none (everything is on the cache's device)."""
        return 0

    # ------------------------------------------------------------------ reading (tests, inspection)

    def positions_of(self, b: int, h: int) -> torch.Tensor:
        """Sorted int64 positions cached for sequence b and KV head h (global part, then local part)."""
        s, n = int(self.global_start[b, h]), int(self.global_len_host[b, h])
        local = torch.arange(self.local_start(b), self.seq_lens[b], device=self.device)
        return torch.cat([self.global_pos[s : s + n], local])

    def keys_of(self, b: int, h: int) -> torch.Tensor:
        """[n, D] keys of (b, h) in position order."""
        return self._rows_of(self.global_k, self.local_k, b, h)

    def values_of(self, b: int, h: int) -> torch.Tensor:
        """[n, D] values of (b, h) in position order."""
        return self._rows_of(self.global_v, self.local_v, b, h)

    def _rows_of(self, flat, ring, b, h):
        s, n = int(self.global_start[b, h]), int(self.global_len_host[b, h])
        local = torch.arange(self.local_start(b), self.seq_lens[b], device=self.device) % self.window_slots
        return torch.cat([flat[s : s + n], ring[b, h, local]])

    # ------------------------------------------------------------------ the cache contract

    def compress_leaving(self, q: torch.Tensor) -> None:
        """Section 5 step 1 for the next token of every sequence: the block [lo(i-1), lo(i)) leaving its window,
        scored by q [B, HQ, 1, D], keeps its top-t (appended to the global segments). A no-op for sequences whose
        window does not move; skipped without device work when none moves (unless replaying a captured step)."""
        leaving = self._leaving_host()
        if not any(leaving) and not self.static:
            return
        self.reserve(1)
        self.kernels.compress(self, q)
        self._compress_host(leaving)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [B, HKV, 1, D] of each sequence's next position into its ring slot, then advance."""
        self._reserve_ring(self.seq_len + 1)
        decode_torch.ring_write(self, k, v)
        self.positions_t += 1
        self._append_host()

    # ------------------------------------------------------------------ whole chunks (streaming prefill)

    def append_kept(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor) -> None:
        """Append the first counts[b, h] rows of k, v [B, HKV, T, D] (positions [B, HKV, T] int64, ascending and
        after the segment's) to each global segment, growing the capacity when needed (by a quarter more than
        needed, so a long prompt's segments regrow O(log) times). counts: [B, HKV] int64 on the host."""
        counts = counts.to(device="cpu", dtype=torch.int64)
        need = self.global_len_host + counts
        if bool((need > self.global_cap).any()):
            self._regrow_global(torch.where(need > self.global_cap, need + need // 4, self.global_cap))
        T = k.shape[2]
        if T == 0:
            return
        counts_dev = counts.to(self.device)
        offsets = torch.arange(T, device=self.device)
        valid = offsets < counts_dev[..., None]
        scratch = self.global_k.shape[0] - 1
        rows = torch.where(valid, (self.global_start + self.global_len)[..., None] + offsets, scratch)
        self.global_k[rows] = k.to(self.dtype)
        self.global_v[rows] = v.to(self.dtype)
        self.global_pos[rows] = positions
        self.global_len += counts_dev
        self.global_len_host += counts

    def append_chunk(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the next n positions k, v [B, HKV, n, D] of every sequence (all of one length) into the ring and
        advance. Positions before the last W of the chunk are overwritten within it, so they are not written."""
        if len(set(self.seq_lens)) > 1:
            raise ValueError(f"append_chunk needs sequences of one length, got {self.seq_lens}")
        s, n = self.seq_len, k.shape[2]
        e = s + n
        self._reserve_ring(e)
        W = self.window_slots
        first = max(s, e - W)
        slots = torch.arange(first, e, device=self.device) % W
        self.local_k[:, :, slots] = k[:, :, first - s :].to(self.dtype)
        self.local_v[:, :, slots] = v[:, :, first - s :].to(self.dtype)
        self.positions_t += n
        self.seq_lens = [e] * self.batch_size

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """One softmax over everything each (b, h) holds: q [B, HQ, 1, D] -> [B, HQ, 1, D]."""
        return self.kernels.attend(self, q)

    def reset(self) -> None:
        """Forget every token: the cache is empty and must be prefilled again (tca.prefill makes a new one)."""
        B, H = self.batch_size, self.num_kv_heads
        self.seq_lens = [0] * B
        self.positions_t.zero_()
        self.global_len_host.zero_()
        self.global_len.zero_()
        self.global_cap = torch.zeros(B, H, dtype=torch.int64)
        self.global_start.zero_()
        self.global_k, self.global_v = self.global_k[-1:].clone(), self.global_v[-1:].clone()
        self.global_pos = self.global_pos[-1:].clone()
        self.local_k, self.local_v = self.local_k[:, :, :0].clone(), self.local_v[:, :, :0].clone()

    # ------------------------------------------------------------------ host mirror

    def _leaving_host(self) -> list[bool]:
        b, w = self.config.block_size, self.config.window
        return [n > 0 and window_start(n, b, w) > window_start(n - 1, b, w) for n in self.seq_lens]

    def _compress_host(self, leaving: list[bool]) -> None:
        moved = torch.tensor(leaving, dtype=torch.int64)[:, None]
        self.global_len_host += moved * self.keep_host[None, :]

    def _append_host(self) -> None:
        self.seq_lens = [n + 1 for n in self.seq_lens]

    def advance_host(self) -> None:
        """The host half of one decode step, for a replayed CUDA graph (its device half ran in the replay)."""
        self._compress_host(self._leaving_host())
        self._append_host()

    def host_state(self) -> tuple[list[int], torch.Tensor]:
        """The host mirror (sequence lengths, global segment lengths), to undo a capture's bookkeeping."""
        return list(self.seq_lens), self.global_len_host.clone()

    def restore_host_state(self, state: tuple[list[int], torch.Tensor]) -> None:
        """Put back the host mirror that `host_state` returned."""
        self.seq_lens, self.global_len_host = state

    def prepare_capture(self, tokens: int) -> None:
        """Room for `tokens` more decode steps, then static shapes: every step does the predicated device work,
        as a replayed CUDA graph of one step will."""
        self.reserve(tokens)
        self.static = True

    # ------------------------------------------------------------------ capacity

    def blocks_leaving(self, tokens: int) -> torch.Tensor:
        """[B] int64 blocks that leave each sequence's window during the next `tokens` decode steps."""
        b, w = self.config.block_size, self.config.window
        return torch.tensor(
            [(window_start(n + tokens - 1, b, w) - window_start(max(n - 1, 0), b, w)) // b if n else 0
             for n in self.seq_lens],
            dtype=torch.int64,
        )

    def reserve(self, tokens: int, slack_blocks: int = 1) -> None:
        """Make room for `tokens` more decode steps of every sequence (host planning, device copies, no sync).

        A segment that must grow gets room for `slack_blocks` more leaving blocks beyond the need, so growth is
        rare and the spare capacity stays under one block per head. The ring grows to cover the planned length.
        """
        self._reserve_ring(self.seq_len + tokens)
        need = self.global_len_host + self.blocks_leaving(tokens)[:, None] * self.keep_host[None, :]
        if bool((need <= self.global_cap).all()):
            return
        spare = slack_blocks * self.keep_host[None, :]
        new_cap = torch.where(need > self.global_cap, need + spare, self.global_cap)
        self._regrow_global(new_cap)

    def _reserve_ring(self, longest: int) -> None:
        if self.window_slots < min(self.config.window, longest):
            self._grow_ring(ring_slots(longest, self.config))

    def _regrow_global(self, new_cap: torch.Tensor) -> None:
        # Row r of the new buffer belongs to segment s = the last one starting at or before r; it copies row
        # r - new_start[s] of that segment if the segment holds that many rows. All on the device.
        device = self.device
        n_total = int(new_cap.sum())
        new_start = _to_device(_exclusive_cumsum(new_cap), device)
        rows = torch.arange(n_total, device=device)
        seg = torch.searchsorted(new_start.flatten(), rows, right=True) - 1
        within = rows - new_start.flatten()[seg]
        keep = within < self.global_len.flatten()[seg]
        scratch = self.global_k.shape[0] - 1
        src = torch.where(keep, self.global_start.flatten()[seg] + within, scratch)
        D = self.head_dim
        new_k = self.global_k.new_zeros(n_total + 1, D)
        new_v = self.global_v.new_zeros(n_total + 1, D)
        new_pos = self.global_pos.new_zeros(n_total + 1)
        new_k[:n_total] = self.global_k[src]
        new_v[:n_total] = self.global_v[src]
        new_pos[:n_total] = self.global_pos[src]
        self.global_k, self.global_v, self.global_pos = new_k, new_v, new_pos
        self.global_start.copy_(new_start)
        self.global_cap = new_cap.clone()

    def _grow_ring(self, W: int) -> None:
        old = self.window_slots
        if W <= old:
            return
        if any(n > old for n in self.seq_lens):
            raise RuntimeError(f"the ring of {old} slots already wrapped; it cannot grow (reserve before decoding)")
        # Before the first wrap every stored position p < old, so slot p stays p.
        B, H, _, D = self.local_k.shape
        for name in ("local_k", "local_v"):
            t = getattr(self, name)
            grown = t.new_zeros(B, H, W, D)
            grown[:, :, :old] = t
            setattr(self, name, grown)

    def __repr__(self) -> str:
        return (
            f"PackedKVCache(B={self.batch_size}, HKV={self.num_kv_heads}, D={self.head_dim}, "
            f"seq_lens={self.seq_lens}, window_slots={self.window_slots}, "
            f"global_len={self.global_len_host.tolist()}, nbytes={self.nbytes})"
        )


def ring_slots(length: int, config: TCAConfig) -> int:
    """Ring slots for sequences up to `length` tokens: the window, or less for a shorter sequence, rounded up
    to a whole block (the local part of position i never holds more than min(w, i + 1) positions)."""
    b = config.block_size
    return min(config.window, -(-max(length, 1) // b) * b)


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Offsets of consecutive segments of sizes x (row-major over all dims), same shape as x."""
    flat = x.flatten()
    return (torch.cumsum(flat, 0) - flat).view_as(x)

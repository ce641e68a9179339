"""PackedKVCache: the compressed KV cache of docs/semantics.md section 5, ragged per KV head, no padding.

Backend-neutral storage (torch only) shared by the `torch`, `triton` and `flash` backends and the transformers
Cache. Per batch element b and KV head h it holds exactly the positions Sel_h U [lo(i), i] (i = seq_len - 1):

* local part, a ring buffer of the window, the same extent for every head (so it needs no padding):
  local_k, local_v [B, HKV, W, D]; position p lives in slot p % W. W grows (doubling) up to config.window
  while the sequence is shorter than the window, so a short prompt does not allocate a whole window
  (before the first wrap every stored position p < W, so slot p % W == p survives a reallocation).
* global part, one flat buffer with one contiguous segment per (b, h), in position order:
  global_k, global_v [N_cap, D], global_pos [N_cap] int64; segment (b, h) occupies rows
  global_start[b, h] .. global_start[b, h] + global_len[b, h] of a reserved global_cap[b, h].

Decode order for token i = seq_len (section 5): `leaving_block()` -> score it, `append_global()` its top-t ->
`append_local()` (writes slot i % W and advances seq_len) -> attend over `global` segment + local ring.
Slot i % W held position i - W, which always left the window already (i - W < lo(i)).

Design notes (what the interface adds to a plain packed layout):
* `append_local` advances `seq_len` by one (the spec left it open); `leaving_block()` must be called before.
* `local_slots(start, end)` returns an int64 index tensor; `local_slot_range(start, end)` the same as a `slice`
  (a view, since the block is contiguous in the ring).
* extra helpers: `from_indices`, `local_positions`, `local_valid_slots`, `global_padded`, `device`, `dtype`,
  `head_dim`, `local_count`.
* growth of a segment (`reserve_global`) is geometric with factor 1.25 plus room for 4 more blocks, not plain
  doubling: plain doubling would report up to 2x the kept bytes after the first window move. Still amortised
  O(1) per appended row. `nbytes` always reports the allocation.

Shape letters: B batch, HKV key/value heads, W ring slots, N rows of the flat global buffer, T rows appended
per head, D head dim.
"""

from __future__ import annotations

import torch

from .config import TCAConfig
from .geometry import window_start

# Segment growth: new capacity = max(need, ceil(1.25 * cap), len + GROWTH_BLOCKS * extra).
GROWTH_FACTOR = 1.25
GROWTH_BLOCKS = 4


class PackedKVCache:
    """The compressed KV cache (section 5): a local ring of the window plus ragged global segments per head."""

    def __init__(
        self,
        *,
        backend: str,
        config: TCAConfig,
        scale: float,
        seq_len: int,
        keep_per_block: torch.Tensor,
        local_k: torch.Tensor,
        local_v: torch.Tensor,
        global_k: torch.Tensor,
        global_v: torch.Tensor,
        global_pos: torch.Tensor,
        global_start: torch.Tensor,
        global_len: torch.Tensor,
        global_cap: torch.Tensor,
    ) -> None:
        self.backend = backend
        self.config = config
        self.scale = float(scale)
        self.seq_len = int(seq_len)
        self.keep_per_block = keep_per_block
        self.local_k, self.local_v = local_k, local_v
        self.global_k, self.global_v, self.global_pos = global_k, global_v, global_pos
        self.global_start, self.global_len, self.global_cap = global_start, global_len, global_cap

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_prefill(
        cls,
        k: torch.Tensor,
        v: torch.Tensor,
        selection,
        keep_per_block: torch.Tensor,
        config: TCAConfig,
        scale: float,
        backend: str,
    ) -> PackedKVCache:
        """The cache after a prefill of L tokens: Sel (global) and [J*b, L) (local ring).

        k, v: [B, HKV, L, D] "bhsd"; selection: a tca.Selection made for L; keep_per_block: [HKV] int64.
        """
        indices, counts = selection.padded_indices(fill=0)
        return cls.from_indices(k, v, indices, counts, keep_per_block, config, scale, backend)

    @classmethod
    def from_indices(
        cls,
        k: torch.Tensor,
        v: torch.Tensor,
        indices: torch.Tensor,
        counts: torch.Tensor,
        keep_per_block: torch.Tensor,
        config: TCAConfig,
        scale: float,
        backend: str,
    ) -> PackedKVCache:
        """Like from_prefill, from padded sorted selected positions indices [B, HKV, N] (counts [B, HKV] valid)."""
        B, HKV, L, D = k.shape
        device = k.device
        b, w = config.block_size, config.window
        counts = counts.to(device=device, dtype=torch.int64).reshape(B, HKV)
        # Global segments: exactly `counts` rows each, laid out (b, h) row-major.
        cap = counts.clone()
        start = _exclusive_cumsum(cap)
        valid = torch.arange(indices.shape[-1], device=device) < counts[..., None]  # [B, HKV, N]
        pos = indices.to(device=device, dtype=torch.int64).clamp(0, max(L - 1, 0))
        gk = torch.gather(k, 2, pos[..., None].expand(-1, -1, -1, D))[valid]  # [n_total, D], (b, h, n) order
        gv = torch.gather(v, 2, pos[..., None].expand(-1, -1, -1, D))[valid]
        gpos = pos[valid]
        # Local ring: positions lo(L-1) .. L-1, slot p % W; W = min(w, L) until the sequence reaches the window.
        W = min(w, L)
        lo = window_start(L - 1, b, w)
        local_k = k.new_zeros(B, HKV, W, D)
        local_v = v.new_zeros(B, HKV, W, D)
        slots = torch.arange(lo, L, device=device) % W
        local_k[:, :, slots] = k[:, :, lo:L]
        local_v[:, :, slots] = v[:, :, lo:L]
        return cls(
            backend=backend,
            config=config,
            scale=scale,
            seq_len=L,
            keep_per_block=keep_per_block.to(torch.int64).cpu(),
            local_k=local_k,
            local_v=local_v,
            global_k=gk.contiguous(),
            global_v=gv.contiguous(),
            global_pos=gpos.contiguous(),
            global_start=start,
            global_len=counts.clone(),
            global_cap=cap,
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
        """W, the ring's current number of slots (config.window once the sequence reached it)."""
        return self.local_k.shape[2]

    @property
    def local_start(self) -> int:
        """lo(seq_len - 1): the first position in the local ring."""
        return window_start(self.seq_len - 1, self.config.block_size, self.config.window) if self.seq_len else 0

    @property
    def local_count(self) -> int:
        """Positions in the local ring (the same for every head): seq_len - lo(seq_len - 1)."""
        return self.seq_len - self.local_start

    @property
    def lengths(self) -> torch.Tensor:
        """[B, HKV] int64 cached tokens per batch element and KV head (global + local)."""
        return self.global_len + self.local_count

    @property
    def nbytes(self) -> int:
        """Bytes ALLOCATED for keys and values (local ring + global buffer; positions excluded): the honest memory."""
        return sum(t.numel() * t.element_size() for t in (self.local_k, self.local_v, self.global_k, self.global_v))

    @property
    def used_nbytes(self) -> int:
        """Bytes of keys and values actually holding kept tokens: 2 * sum(lengths) * D * element size."""
        return 2 * int(self.lengths.sum()) * self.head_dim * self.local_k.element_size()

    # ------------------------------------------------------------------ reading

    def local_positions(self) -> torch.Tensor:
        """[n_local] int64: positions lo(seq_len-1) .. seq_len-1 held by the ring, ascending."""
        return torch.arange(self.local_start, self.seq_len, device=self.device)

    def local_valid_slots(self) -> torch.Tensor:
        """[W] bool: which ring slots hold a position of the current window."""
        W = self.window_slots
        valid = torch.zeros(W, dtype=torch.bool, device=self.device)
        valid[self.local_positions() % W] = True
        return valid

    def positions_of(self, b: int, h: int) -> torch.Tensor:
        """Sorted int64 positions cached for batch element b and KV head h (global part, then local part)."""
        s, n = int(self.global_start[b, h]), int(self.global_len[b, h])
        return torch.cat([self.global_pos[s : s + n], self.local_positions()])

    def keys_of(self, b: int, h: int) -> torch.Tensor:
        """[n, D] keys of (b, h) in position order."""
        s, n = int(self.global_start[b, h]), int(self.global_len[b, h])
        return torch.cat([self.global_k[s : s + n], self.local_k[b, h, self.local_positions() % self.window_slots]])

    def values_of(self, b: int, h: int) -> torch.Tensor:
        """[n, D] values of (b, h) in position order."""
        s, n = int(self.global_start[b, h]), int(self.global_len[b, h])
        return torch.cat([self.global_v[s : s + n], self.local_v[b, h, self.local_positions() % self.window_slots]])

    def global_padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The global segments gathered into a padded temporary (a copy, for attention over all heads at once).

        Returns k, v [B, HKV, Nmax, D], pos [B, HKV, Nmax] int64 (0 in padding) and valid [B, HKV, Nmax] bool.
        """
        n_max = int(self.global_len.max()) if self.global_len.numel() else 0
        offsets = torch.arange(n_max, device=self.device)
        valid = offsets < self.global_len[..., None]
        rows = torch.where(valid, self.global_start[..., None] + offsets, 0)
        if self.global_k.shape[0] == 0:
            B, H, D = self.batch_size, self.num_kv_heads, self.head_dim
            empty = self.local_k.new_zeros(B, H, n_max, D)
            return empty, empty.clone(), rows, valid
        return self.global_k[rows], self.global_v[rows], torch.where(valid, self.global_pos[rows], 0), valid

    # ------------------------------------------------------------------ decoding steps

    def leaving_block(self) -> tuple[int, int] | None:
        """(start, end) of the block [lo(i-1), lo(i)) that leaves the window when token i = seq_len arrives."""
        i, b, w = self.seq_len, self.config.block_size, self.config.window
        if i == 0:
            return None
        before, now = window_start(i - 1, b, w), window_start(i, b, w)
        return (before, now) if now > before else None

    def local_slot_range(self, start: int, end: int) -> slice:
        """The ring slots of positions [start, end) of one block, as a slice (contiguous: b divides W)."""
        W = self.window_slots
        first = start % W
        if first + (end - start) > W:
            raise ValueError(f"positions [{start}, {end}) are not contiguous in a ring of {W} slots")
        return slice(first, first + (end - start))

    def local_slots(self, start: int, end: int) -> torch.Tensor:
        """[end - start] int64 ring slots of positions [start, end)."""
        return torch.arange(start, end, device=self.device) % self.window_slots

    def reserve_global(self, extra_per_head: torch.Tensor) -> None:
        """Make room for extra_per_head [HKV] (or [B, HKV]) more rows in each segment (host-side reallocation).

        Segments that are too small grow geometrically (see GROWTH_FACTOR); the whole flat buffer is rebuilt once.
        """
        extra = extra_per_head.to(device=self.global_len.device, dtype=torch.int64).expand_as(self.global_len)
        need = self.global_len + extra
        if bool((need <= self.global_cap).all()):
            return
        grown = torch.maximum(
            torch.ceil(self.global_cap.double() * GROWTH_FACTOR).long(), self.global_len + GROWTH_BLOCKS * extra
        )
        new_cap = torch.where(need > self.global_cap, torch.maximum(grown, need), self.global_cap)
        new_start = _exclusive_cumsum(new_cap)
        n_total = int(new_cap.sum())
        D = self.head_dim
        new_k = self.global_k.new_zeros(n_total, D)
        new_v = self.global_v.new_zeros(n_total, D)
        new_pos = self.global_pos.new_zeros(n_total)
        # Move the used rows of every segment: row r of segment s goes from start_old[s] + r to start_new[s] + r.
        lens = self.global_len.flatten()
        if int(lens.sum()):
            seg = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
            within = torch.arange(seg.numel(), device=lens.device) - torch.repeat_interleave(
                _exclusive_cumsum(lens), lens
            )
            src = self.global_start.flatten()[seg] + within
            dst = new_start.flatten()[seg] + within
            new_k[dst] = self.global_k[src]
            new_v[dst] = self.global_v[src]
            new_pos[dst] = self.global_pos[src]
        self.global_k, self.global_v, self.global_pos = new_k, new_v, new_pos
        self.global_start, self.global_cap = new_start, new_cap

    def append_global(self, k_sel: torch.Tensor, v_sel: torch.Tensor, pos: torch.Tensor, counts: torch.Tensor) -> None:
        """Append the first counts[b, h] rows of k_sel/v_sel [B, HKV, T, D] (positions pos [B, HKV, T]) to each
        segment. Rows must come in ascending position, after every position already in the segment."""
        B, H, T, D = k_sel.shape
        counts = counts.to(device=self.global_len.device, dtype=torch.int64).expand(B, H)
        self.reserve_global(counts)
        offsets = torch.arange(T, device=self.global_len.device)
        valid = offsets < counts[..., None]  # [B, HKV, T]
        rows = (self.global_start + self.global_len)[..., None] + offsets
        dst = rows[valid]
        self.global_k[dst] = k_sel[valid].to(self.global_k.dtype)
        self.global_v[dst] = v_sel[valid].to(self.global_v.dtype)
        self.global_pos[dst] = pos.to(torch.int64)[valid]
        self.global_len = self.global_len + counts

    def append_local(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write k_new, v_new [B, HKV, 1, D] of position i = seq_len into slot i % W, then advance seq_len.

        Compress the leaving block (if any) first: slot i % W may hold position i - W, which has left then.
        """
        i = self.seq_len
        if i >= self.window_slots and self.window_slots < self.config.window:
            self._grow_ring(min(self.config.window, max(2 * self.window_slots, i + 1)))
        slot = i % self.window_slots
        self.local_k[:, :, slot] = k_new[:, :, 0]
        self.local_v[:, :, slot] = v_new[:, :, 0]
        self.seq_len = i + 1

    def _grow_ring(self, W: int) -> None:
        # Only before the first wrap: every stored position p < old W, so slot p stays p.
        B, H, old, D = self.local_k.shape
        for name in ("local_k", "local_v"):
            t = getattr(self, name)
            grown = t.new_zeros(B, H, W, D)
            grown[:, :, :old] = t
            setattr(self, name, grown)

    def __repr__(self) -> str:
        return (
            f"PackedKVCache(backend={self.backend!r}, B={self.batch_size}, HKV={self.num_kv_heads}, D={self.head_dim}, "
            f"seq_len={self.seq_len}, window_slots={self.window_slots}, global_len={self.global_len.tolist()}, "
            f"nbytes={self.nbytes})"
        )


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Offsets of consecutive segments of sizes x (row-major over all dims), same shape as x."""
    flat = x.flatten()
    return (torch.cumsum(flat, 0) - flat).view_as(x)

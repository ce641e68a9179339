"""The paged decode step of paged_decode.py in PyTorch (no Triton): what runs on the CPU, and the Triton kernels'
twin in the tests. Same pools, same rules (kernels_paged_decode.py): per row, its state at its first page is
continued only when it covers exactly the tokens before this step; rows without one attend exactly.

Unlike the kernels it reads the device's lengths on the host (the widest row sets the padding), so it is not for
CUDA graphs. Shape letters: R rows, HQ query heads, HKV KV heads, G = HQ / HKV, D head dim, NP pages, P page size,
N kept entries, W window positions, b block size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...dtypes import compute_dtype
from ...geometry import window_start
from .decode_torch import leaving_block_importance


def _read(pages: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """pages [NP, HKV, P, ...] at per-row, per-head sequence positions [R, HKV, N] (>= 0) -> [R, HKV, N, ...]."""
    R, HKV, N = positions.shape
    P = pages.shape[2]
    page = block_table.long().gather(1, (positions // P).reshape(R, HKV * N)).reshape(R, HKV, N)
    head = torch.arange(HKV, device=positions.device)[None, :, None]
    return pages[page, head, positions % P]


def paged_decode_torch(query: torch.Tensor, key_pages: torch.Tensor, value_pages: torch.Tensor,
                       block_table: torch.Tensor, seq_lens: torch.Tensor, positions: torch.Tensor,
                       counts: torch.Tensor, covered: torch.Tensor, keep: torch.Tensor, usage: torch.Tensor,
                       block_size: int, window: int, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """paged_decode.paged_decode's contract (arguments, pools advanced, counters added, out [R, HQ, D])."""
    R, HQ, D = query.shape
    HKV, P = key_pages.shape[1], key_pages.shape[2]
    G = HQ // HKV
    device = query.device
    if out is None:
        out = torch.empty_like(query)
    if R == 0:
        return out
    seq = seq_lens.to(device, torch.long)
    i = seq - 1
    live = seq > 0
    table = block_table.long()
    owner = table[:, 0]
    count = counts[owner].long()  # [R, HKV]
    stateful = live & (covered[owner].long() == i) & (count[:, 0] >= 0)  # [R]
    count = torch.where(stateful[:, None], count, -1)
    q = query.to(compute_dtype(query.dtype)).reshape(R, HKV, G, D)
    start, lo = window_start(i - 1, block_size, window), window_start(i, block_size, window)
    keep_t = keep.to(device, torch.long)
    moving = (stateful & (lo > start)).nonzero().flatten()
    if moving.numel() and int(keep_t.max()) > 0:  # section 5 step 1: the leaving block keeps its best tokens
        block = (start[moving, None] + torch.arange(block_size, device=device))[:, None].expand(-1, HKV, -1)
        keys = _read(key_pages, table[moving], block)  # [R', HKV, b, D]
        scores = leaving_block_importance(q[moving], keys, scale)  # [R', HKV, b]
        width = int(keep_t.max())
        top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :width]  # ties: smaller position
        valid = torch.arange(width, device=device) < keep_t[:, None]  # [HKV, T]
        top = torch.where(valid, top, block_size).sort(dim=-1).values  # kept offsets ascending, the invalid last
        kept = start[moving, None, None] + top  # [R', HKV, T]
        entry = count[moving][..., None] + torch.arange(width, device=device)
        entry = torch.where(valid, entry, 0)
        page = table[moving].gather(1, (entry // P).flatten(1)).view_as(entry)
        head = torch.arange(HKV, device=device)[None, :, None].expand_as(entry)
        hit = valid.expand_as(entry)
        positions[page[hit], head[hit], (entry % P)[hit]] = kept[hit].to(positions.dtype)
        count[moving] += keep_t
        counts[owner[moving]] = count[moving].to(counts.dtype)
    # section 5 step 3: one softmax over the kept entries and the window (everything, for rows with no state)
    n_glob = count.clamp_min(0)  # [R, HKV]
    first = torch.where(stateful, lo, 0)
    n_loc = torch.where(live, i - first + 1, 0)  # [R]
    N, W = int(n_glob.max()), int(n_loc.max())
    entries = torch.arange(N, device=device)
    glob_ok = entries < n_glob[..., None]  # [R, HKV, N]
    entry = torch.where(glob_ok, entries, 0)
    glob = _read(positions, table, entry.reshape(R, HKV, N)).long() if N else entry  # [R, HKV, N]
    local = first[:, None] + torch.arange(W, device=device)  # [R, W]
    local_ok = (torch.arange(W, device=device) < n_loc[:, None])[:, None].expand(R, HKV, W)
    where = torch.cat([torch.where(glob_ok, glob, 0), torch.where(local_ok, local[:, None], 0)], dim=-1)
    ok = torch.cat([glob_ok, local_ok], dim=-1)  # [R, HKV, N + W]
    keys, values = _read(key_pages, table, where), _read(value_pages, table, where)
    at = q.dtype
    attended = F.scaled_dot_product_attention(q, keys.to(at), values.to(at), attn_mask=ok[:, :, None], scale=scale)
    attended = torch.where(ok.any(-1)[..., None, None], attended, 0.0)  # padding rows: zeros, as the kernels
    out.copy_(attended.reshape(R, HQ, D).to(out.dtype))
    token_bytes = 2 * D * key_pages.element_size()
    rows = stateful.nonzero().flatten()
    if rows.numel():
        usage[0] += rows.numel()
        usage[1] += int(seq[rows].sum()) * HKV * token_bytes
        usage[2] += int((n_glob[rows].sum(-1) + HKV * n_loc[rows]).sum()) * token_bytes
        covered[owner[rows]] = seq[rows].to(covered.dtype)
    return out


def store_state(positions: torch.Tensor, counts: torch.Tensor, covered: torch.Tensor, block_table_row: torch.Tensor,
                kept: torch.Tensor, kept_counts: torch.Tensor, seq_len: int) -> None:
    """Write one sequence's state into the pools (after its prefill of seq_len tokens): kept [HKV, N] its kept
    global positions per head, ascending, any value past kept_counts [HKV]; block_table_row [pages] its pages.
    Eager (not captured), and without reading the device: the N entries are written whole (those past a head's
    count land in the sequence's own pages, where nothing reads them; N <= seq_len, so the pages exist)."""
    HKV, N = kept.shape
    P = positions.shape[2]
    owner = block_table_row[:1].long()
    if N:
        entry = torch.arange(N, device=kept.device)
        page = block_table_row.to(kept.device).long()[entry // P][None, :].expand(HKV, N)
        head = torch.arange(HKV, device=kept.device)[:, None].expand(HKV, N)
        positions[page, head, (entry % P)[None, :].expand(HKV, N)] = kept.to(torch.int32)
    counts.index_copy_(0, owner, kept_counts.to(counts.device, torch.int32)[None])
    covered.index_fill_(0, owner, seq_len)

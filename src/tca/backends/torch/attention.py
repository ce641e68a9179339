"""TCA attention given the selected global tokens (docs/semantics.md section 4, Eq. 2), chunked: no L x L tensor.

The queries are processed in chunks of whole query blocks (all rows of one block share lo). A chunk whose
first row has window start lo0 attends, in one softmax:
  * the selected global keys before lo0: a prefix of each head's ascending selected list (gathered once), and
  * the contiguous key range [lo0, chunk end), masked per row: key p is visible to row i when p <= i and
    (p >= lo(i), the local band, or p is selected and p < lo(i), a global key that lies inside the range).
Memory per chunk: [B, HQ, R, n + w + R] logits (R rows per chunk), never L x L. Accumulation in fp32 (fp64 stays
fp64); GQA by viewing the G query heads of a KV head as extra rows of one matmul.

Shape letters: B batch, HQ query heads, HKV key/value heads, G = HQ / HKV, L keys, LQ queries, D head dim,
R rows of a chunk, C keys of a chunk's contiguous range, N selected tokens per head (padded).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...dtypes import compute_dtype
from ...geometry import window_start

# Rows per chunk: at least one block; about this many rows otherwise. Measured on 2 CPU cores (SmolLM2 heads,
# L = 2K-8K, b = 64/128): 64-128 rows beat 256 by 10-30%: the [G*R, n + w + R] fp32 logits tile of a smaller
# chunk stays in cache for the masking and softmax passes; below one block the per-chunk Python overhead grows.
TARGET_CHUNK_ROWS = 128


def chunk_rows(block_size: int, window: int) -> int:
    """R: whole blocks, about TARGET_CHUNK_ROWS rows, and no more than half the window (bounded waste)."""
    blocks = max(1, min(TARGET_CHUNK_ROWS, window // 2) // block_size)
    return blocks * block_size


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense causal attention with queries aligned to the end (only LQ == L or LQ == 1: no mask tensor needed)."""
    LQ, L = q.shape[2], k.shape[2]
    G = q.shape[1] // k.shape[1]
    if G > 1:  # enable_gqa is not on every device's fused path; repeating K/V is cheap next to attention
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=LQ == L and L > 1, scale=scale)


def attend_indices(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    selected: torch.Tensor,
    block_size: int,
    window: int,
    scale: float,
    return_lse: bool = False,
):
    """Eq. 2 for every query row, chunk by chunk.

    q [B, HQ, LQ, D] (row r at position L - LQ + r), k, v [B, HKV, L, D];
    indices [B, HKV, N] ascending selected positions, then padding >= L (the compact form's L, or any larger
    value), counts [B, HKV];
    selected [B, HKV, P] bool, the selection mask over the first P (= J*b) positions.
    Returns out [B, HQ, LQ, D] in q's dtype (and lse [B, HQ, LQ] fp32/fp64).
    """
    B, HQ, LQ, D = q.shape
    HKV, L = k.shape[1], k.shape[2]
    dt = compute_dtype(q.dtype)
    b = block_size
    offset = L - LQ
    indices = indices.contiguous()
    n_sel = indices.shape[-1]
    if n_sel:
        rows = indices.long().clamp_max(L - 1)[..., None].expand(-1, -1, -1, D)
        k_sel, v_sel = k.gather(2, rows), v.gather(2, rows)  # [B, HKV, N, D]
    # [choice: non-finite] a NaN/Inf key or value must reach only the rows that keep it. SDPA's boolean mask
    # does not hide a NaN logit, and a masked column weighs 0 but 0 * NaN is NaN: with such keys or values
    # (one check) every chunk takes the explicit path, which masks logits by replacement and zeroes bad values.
    finite_values = bool(torch.isfinite(k).all()) and bool(torch.isfinite(v).all())
    out = torch.empty(B, HQ, LQ, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, HQ, LQ, dtype=dt, device=q.device) if return_lse else None
    R = chunk_rows(b, window)
    first = offset - offset % b  # position of the first block that holds a query
    if offset == 0 and not return_lse and finite_values:
        # Rows before the window first moves (lo(i) = 0) are plain causal attention: the fused SDPA kernel.
        head = min(L, window)
        out[:, :, :head] = causal_sdpa(q[:, :, :head], k[:, :, :head], v[:, :, :head], scale)
        first = head
    starts = list(range(first, L, R))
    if not starts:
        return (out, lse) if return_lse else out
    chunk_lo = [window_start(max(s, offset), b, window) for s in starts]
    # Global keys of a chunk = the selected positions < lo0, a prefix of each sorted list: its length per head,
    # for every chunk in one call (one host sync, not one per chunk).
    if n_sel:
        bounds = torch.tensor(chunk_lo, dtype=indices.dtype, device=q.device).expand(B, HKV, -1).contiguous()
        prefix_all = torch.searchsorted(indices, bounds)  # [B, HKV, chunks]
        prefix_max = prefix_all.amax(dim=(0, 1)).tolist()
        prefix_equal = (prefix_all.amin(dim=(0, 1)) == prefix_all.amax(dim=(0, 1))).tolist()
    for c, (start, lo0) in enumerate(zip(starts, chunk_lo, strict=True)):
        p0, p1 = max(start, offset), min(start + R, L)  # query positions [p0, p1)
        n = prefix_max[c] if n_sel else 0
        valid = None  # [B, HKV, n], only where some head has fewer global keys than n
        if n and not prefix_equal[c]:
            valid = torch.arange(n, device=q.device) < prefix_all[:, :, c, None]
        rows = slice(p0 - offset, p1 - offset)
        chunk_out, chunk_lse = _attend_chunk(
            q[:, :, rows],
            k,
            v,
            k_sel[:, :, :n] if n else None,
            v_sel[:, :, :n] if n else None,
            valid,
            selected,
            p0,
            p1,
            lo0,
            b,
            window,
            scale,
            return_lse,
            finite_values,
        )
        out[:, :, rows] = chunk_out.to(q.dtype)
        if return_lse:
            lse[:, :, rows] = chunk_lse
    return (out, lse) if return_lse else out


def _attend_chunk(q, k, v, k_glob, v_glob, valid, selected, p0, p1, lo0, b, window, scale, return_lse, finite_values):
    """Rows [p0, p1) (one or more whole blocks, all with window start >= lo0) in one softmax.

    q [B, HQ, R, D]; keys: n global ones (k_glob [B, HKV, n, D] or None; valid [B, HKV, n] marks the real ones
    when heads have fewer than n, else None) followed by
    the contiguous range [lo0, p1). Returns out [B, HQ, R, D] in the compute dtype (and lse [B, HQ, R]).
    Only the columns that some row of the chunk cannot see are masked (why: masking is a memory-bound pass
    over the whole logits tile, as expensive as the softmax; most columns are visible to every row).
    """
    B, HQ, R, D = q.shape
    HKV = k.shape[1]
    G = HQ // HKV
    dt = compute_dtype(q.dtype)
    device = q.device
    keys, values = k[:, :, lo0:p1], v[:, :, lo0:p1]
    n = 0 if k_glob is None else k_glob.shape[2]
    if n:
        keys, values = torch.cat([k_glob, keys], dim=2), torch.cat([v_glob, values], dim=2)
    if not return_lse and finite_values:
        return _attend_chunk_sdpa(q, keys, values, valid, selected, p0, p1, lo0, b, window, scale), None
    # The scale is folded into the R x D queries rather than applied to the R x (n + C) logits.
    qc = (q.to(dt) * scale).reshape(B, HKV, G * R, D)
    logits = torch.matmul(qc, keys.to(dt).transpose(-1, -2)).view(B, HKV, G, R, n + p1 - lo0)
    if valid is not None:
        logits[..., :n].masked_fill_(~valid[:, :, None, None], -math.inf)  # padding of the shorter heads
    # Local range: every row sees [lo_last, c0 * b) (lo_last = the largest window start in the chunk, c0 * b the
    # start of the first row's block, both causal for every row); mask the columns before and after that span.
    lo_last = window_start(p1 - 1, b, window)
    full_end = max(lo_last, (p0 // b) * b)
    positions = torch.arange(p0, p1, device=device)[:, None]  # [R, 1]
    lo = window_start(positions, b, window)
    for span, (first, last) in enumerate(((lo0, lo_last), (full_end, p1))):
        if first >= last:
            continue
        keys_pos = torch.arange(first, last, device=device)
        visible = (keys_pos <= positions) & (keys_pos >= lo)  # the local band [R, cols]
        if span == 0 and first < selected.shape[-1]:
            # Selected keys inside [lo0, lo(i)) are global for row i (blocks that left the window mid-chunk).
            inside = selected[..., first : min(selected.shape[-1], last)]
            sel = torch.zeros(B, HKV, 1, last - first, dtype=torch.bool, device=device)
            sel[..., 0, : inside.shape[-1]] = inside
            visible = visible | (sel & (keys_pos < lo))  # [B, HKV, R, cols]
        mask = visible if visible.dim() == 4 else visible[None, None]
        logits[..., n + first - lo0 : n + last - lo0].masked_fill_(~mask[:, :, None], -math.inf)
    values = values.to(dt)
    hit = None
    if not finite_values:
        values, hit = _split_nonfinite(values, (logits != -math.inf).view(B, HKV, G * R, -1))
    row_lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    # In place where no backward needs the logits (logsumexp saves them); out of place when gradients flow.
    weights = torch.exp(logits - row_lse if logits.requires_grad else logits.sub_(row_lse))
    out = torch.matmul(weights.view(B, HKV, G * R, -1), values)
    if hit is not None:
        out = out.masked_fill(hit, math.nan)
    return out.view(B, HQ, R, D), row_lse.view(B, HQ, R)


def _split_nonfinite(values: torch.Tensor, visible: torch.Tensor):
    """values [B, HKV, S, D] with the non-finite entries zeroed, and hit [B, HKV, M, D]: the (row, d) whose
    visible keys (visible [B|1, HKV|1, M, S] bool) hold a non-finite value: those outputs become NaN."""
    bad = ~torch.isfinite(values)
    hit = torch.matmul(visible.to(values.dtype), bad.to(values.dtype)) > 0
    return values.masked_fill(bad, 0), hit


def _attend_chunk_sdpa(q, keys, values, valid, selected, p0, p1, lo0, b, window, scale):
    """The chunk through the fused SDPA kernel with a boolean mask (no LSE): q [B, HQ, R, D], keys/values
    [B, HKV, n + C, D] (n global keys, then [lo0, p1)) -> [B, HQ, R, D].

    Why: on CPU it is one parallel region instead of four (matmul, mask, softmax, matmul); with the 2 cores
    shared with other processes each region waits for a descheduled thread, and the fused kernel was measured
    2.5x faster there (equal on an idle machine).
    """
    B, HQ, R, D = q.shape
    HKV, S = keys.shape[1], keys.shape[2]
    device = q.device
    n = S - (p1 - lo0)
    positions = torch.arange(p0, p1, device=device)[:, None]  # [R, 1]
    lo = window_start(positions, b, window)
    keys_pos = torch.arange(lo0, p1, device=device)
    visible = (keys_pos <= positions) & (keys_pos >= lo)  # [R, C]
    lo_last = window_start(p1 - 1, b, window)
    if lo_last > lo0 and lo0 < selected.shape[-1]:
        # Selected keys inside [lo0, lo(i)) are global for row i (blocks that left the window mid-chunk).
        inside = selected[..., lo0 : min(selected.shape[-1], lo_last)]
        sel = torch.zeros(B, HKV, 1, p1 - lo0, dtype=torch.bool, device=device)
        sel[..., 0, : inside.shape[-1]] = inside
        visible = visible | (sel & (keys_pos < lo))  # [B, HKV, R, C]
    if visible.dim() == 2:
        visible = visible[None, None]
    if n:
        glob = valid[:, :, None, :] if valid is not None else torch.ones(1, 1, 1, n, dtype=torch.bool, device=device)
        lead = torch.broadcast_shapes(glob.shape[:2], visible.shape[:2])
        visible = torch.cat([glob.expand(*lead, R, n), visible.expand(*lead, R, -1)], dim=-1)  # [*, *, R, S]
    if visible.shape[1] > 1 and HQ > HKV:
        # One mask per KV head, repeated over its G query heads (enable_gqa pairs query head h with KV head h // G).
        visible = visible[:, :, None].expand(-1, -1, HQ // HKV, -1, -1).reshape(visible.shape[0], HQ, R, S)
    dt = compute_dtype(q.dtype)
    return F.scaled_dot_product_attention(
        q.to(dt), keys.to(dt), values.to(dt), attn_mask=visible, scale=scale, enable_gqa=HQ > HKV
    )

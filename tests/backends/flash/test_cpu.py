"""The flash backend on CPU, without FlashAttention: recording stand-ins for the three flash modules.

The stand-ins record every argument and compute *real* attention (fp64 softmax over the key rows they are
told to read, with FA's bottom-right causal and window rules), so what is asserted is either what tca sent
to flash (segments, offsets, flags, windows) or tca's end result against the reference oracle; never a value
the stand-in invented.

Shape letters: B batch, HQ query heads, HKV key/value heads, L keys, LQ query rows, D head dim, S sequences,
TQ packed query rows, TK packed key rows, H heads of a packed call.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from helpers import make_qkv, random_budgets
from tca import TCAConfig, reference
from tca.backends.common import compact
from tca.backends.flash import fa2, fa3, fa4
from tca.backends.flash import impl as flash_impl
from tca.backends.flash.merge import merge_two
from tca.backends.flash.segments import (
    global_prefix_counts,
    global_segments,
    local_segments,
    query_blocks,
    rows_with_keys,
)
from tca.testing import assert_close

# ----------------------------------------------------------------------------------------- the stand-ins


def true_varlen(q, k, v, cu_q, starts, lens, causal, scale, left=None, right=None):
    """FA's varlen semantics in fp64: sequence s = rows cu_q[s]..cu_q[s+1] of q, keys starts[s] + [0, lens[s]).

    Row r of m rows with n keys sees key j iff (not causal or j <= r + n - m) and the window
    [r + n - m - left, r + n - m + right] (None = unlimited). Returns out [TQ, H, D] (q's dtype), lse [H, TQ].
    """
    TQ, H, D = q.shape
    HK = k.shape[1]
    out = torch.zeros(TQ, H, D, dtype=torch.float64)
    lse = torch.full((H, TQ), float("-inf"), dtype=torch.float64)
    for s in range(len(starts)):
        q0, q1 = int(cu_q[s]), int(cu_q[s + 1])
        k0, n = int(starts[s]), int(lens[s])
        m = q1 - q0
        if m == 0 or n == 0:
            continue
        rows = torch.arange(m)[:, None] + n - m
        cols = torch.arange(n)[None, :]
        keep = torch.ones(m, n, dtype=torch.bool)
        if causal:
            keep &= cols <= rows
        if left is not None:
            keep &= cols >= rows - left
        if right is not None:
            keep &= cols <= rows + right
        for h in range(H):
            kh = h // (H // HK)
            logits = scale * q[q0:q1, h].double() @ k[k0 : k0 + n, kh].double().T
            logits = logits.masked_fill(~keep, float("-inf"))
            lse[h, q0:q1] = logits.logsumexp(-1)
            out[q0:q1, h] = torch.nan_to_num(logits.softmax(-1)) @ v[k0 : k0 + n, kh].double()
    return out.to(q.dtype), lse.float()


def _unlimited(x, none_value):
    return None if x == none_value else x


class FA4StandIn(types.ModuleType):
    """flash_attn.cute: keyword API, cu_seqlens_k offsets + seqused_k lengths, window None = unlimited."""

    def __init__(self):
        super().__init__("flash_attn.cute")
        self.calls = []

    def flash_attn_varlen_func(self, q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               seqused_k=None, softmax_scale, causal, window_size, return_lse):
        if seqused_k is None:  # plain varlen: contiguous segments
            seqused_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
        self.calls.append(dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q.clone(), cu_seqlens_k=cu_seqlens_k.clone(),
                               seqused_k=seqused_k.clone(), max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                               scale=softmax_scale, causal=causal, window_size=window_size, return_lse=return_lse))
        left, right = window_size
        return true_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k[:-1], seqused_k, causal, softmax_scale, left, right)


class FA3StandIn(types.ModuleType):
    """flash_attn_interface: positional cu_seqlens/max_seqlen, seqused_k, window -1 = unlimited."""

    def __init__(self):
        super().__init__("flash_attn_interface")
        self.calls = []

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               seqused_q=None, seqused_k=None, softmax_scale=None, causal=False,
                               window_size=(-1, -1), return_attn_probs=False):
        self.calls.append(dict(cu_seqlens_k=cu_seqlens_k.clone(), seqused_k=seqused_k.clone(), causal=causal,
                               window_size=window_size, return_attn_probs=return_attn_probs, max_seqlen_k=max_seqlen_k))
        left, right = (_unlimited(x, -1) for x in window_size)
        return true_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k[:-1], seqused_k, causal, softmax_scale, left, right)


class FA2StandIn(types.ModuleType):
    """flash_attn 2.x: no seqused_k, so keys are contiguous per cu_seqlens_k; returns (out, lse, S_dmask)."""

    def __init__(self):
        super().__init__("flash_attn")
        self.calls = []

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), return_attn_probs=False):
        self.calls.append(dict(k=k, cu_seqlens_q=cu_seqlens_q.clone(), cu_seqlens_k=cu_seqlens_k.clone(),
                               causal=causal, window_size=window_size, dropout_p=dropout_p))
        left, right = (_unlimited(x, -1) for x in window_size)
        lens = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
        out, lse = true_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k[:-1], lens, causal, softmax_scale, left, right)
        return out, lse, None


ADAPTERS = {
    "fa4": (fa4.FA4Adapter, FA4StandIn),
    "fa3": (fa3.FA3Adapter, FA3StandIn),
    "fa2": (fa2.FA2Adapter, FA2StandIn),
}


def packed_problem(seed=0, H=2, HK=1, D=8, dtype=torch.float16):
    """Three sequences whose key segments overlap (as consecutive windows do), one of them empty."""
    gen = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0, 3, 7, 9], dtype=torch.int32)
    starts = torch.tensor([0, 2, 5], dtype=torch.int32)
    lens = torch.tensor([5, 6, 0], dtype=torch.int32)
    q = torch.randn(9, H, D, generator=gen).to(dtype)
    k = torch.randn(12, HK, D, generator=gen).to(dtype)
    v = torch.randn(12, HK, D, generator=gen).to(dtype)
    return q, k, v, cu_q, starts, lens


# ----------------------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("generation", ["fa4", "fa3", "fa2"])
@pytest.mark.parametrize("causal", [True, False])
def test_adapter_result_is_attention_over_the_requested_segments(generation, causal):
    adapter_cls, standin_cls = ADAPTERS[generation]
    adapter = adapter_cls(module=standin_cls())
    q, k, v, cu_q, starts, lens = packed_problem(seed=1)
    res = adapter.varlen(q, k, v, cu_q, starts, lens, 4, 6, causal, 0.3)
    # Independent check: plain fp64 attention of each sequence over its own key rows.
    for s, (q0, q1, k0, n) in enumerate([(0, 3, 0, 5), (3, 7, 2, 6)]):
        logits = 0.3 * torch.einsum("ihd,jd->hij", q[q0:q1].double(), k[k0 : k0 + n, 0].double())
        if causal:
            m = q1 - q0
            logits = logits.masked_fill(torch.arange(n)[None] > torch.arange(m)[:, None] + n - m, float("-inf"))
        expected = torch.einsum("hij,jd->ihd", logits.softmax(-1), v[k0 : k0 + n, 0].double())
        assert not torch.isnan(res.out).any()
        torch.testing.assert_close(res.out[q0:q1].double(), expected, atol=2e-3, rtol=2e-3, msg=f"sequence {s}")
        torch.testing.assert_close(res.lse[q0:q1].double(), logits.logsumexp(-1).T, atol=1e-4, rtol=1e-4)
    assert res.lse.shape == (9, 2) and res.lse.dtype == torch.float32  # normalised to [TQ, H]
    assert torch.isneginf(res.lse[7:]).all()  # the empty sequence


@pytest.mark.parametrize("generation", ["fa4", "fa3"])
def test_in_place_generations_get_offsets_and_lengths(generation):
    adapter_cls, standin_cls = ADAPTERS[generation]
    standin = standin_cls()
    q, k, v, cu_q, starts, lens = packed_problem()
    adapter_cls(module=standin).varlen(q, k, v, cu_q, starts, lens, 4, 6, True, 0.5)
    (call,) = standin.calls
    assert call["cu_seqlens_k"].tolist() == [0, 2, 5, 12]  # offsets, then the buffer end
    assert call["seqused_k"].tolist() == [5, 6, 0]
    assert call["cu_seqlens_k"].dtype == torch.int32 and call["seqused_k"].dtype == torch.int32
    assert call["causal"] is True and call["max_seqlen_k"] == 6
    assert call["window_size"] == ((None, None) if generation == "fa4" else (-1, -1))
    if generation == "fa4":
        assert call["return_lse"] is True and call["k"] is k  # read in place: no copy of the keys
    else:
        assert call["return_attn_probs"] is True


def test_fa2_copies_segments_out_and_chunks_them():
    standin = FA2StandIn()
    q, k, v, cu_q, starts, lens = packed_problem()
    whole = fa2.FA2Adapter(module=FA2StandIn()).varlen(q, k, v, cu_q, starts, lens, 4, 6, True, 0.5)
    chunked = fa2.FA2Adapter(module=standin, max_packed_keys=6).varlen(q, k, v, cu_q, starts, lens, 4, 6, True, 0.5)
    # Chunks: sequence 0 (5 keys), then sequences 1-2 (6 + 0 keys): each its own packed copy.
    assert [c["cu_seqlens_k"].tolist() for c in standin.calls] == [[0, 5], [0, 6, 6]]
    assert [c["cu_seqlens_q"].tolist() for c in standin.calls] == [[0, 3], [0, 4, 6]]
    torch.testing.assert_close(standin.calls[0]["k"], k[0:5])
    torch.testing.assert_close(standin.calls[1]["k"], k[2:8])
    assert all(c["window_size"] == (-1, -1) and c["dropout_p"] == 0.0 for c in standin.calls)
    torch.testing.assert_close(chunked.out, whole.out)
    torch.testing.assert_close(chunked.lse, whole.lse)


def test_fa4_copy_mode_sends_contiguous_copies_with_the_same_result():
    standin = FA4StandIn()
    q, k, v, cu_q, starts, lens = packed_problem(seed=2)
    copied = fa4.FA4Adapter(module=standin, copy_kv=True).varlen(q, k, v, cu_q, starts, lens, 4, 6, True, 0.5)
    in_place = fa4.FA4Adapter(module=FA4StandIn(), copy_kv=False).varlen(q, k, v, cu_q, starts, lens, 4, 6, True, 0.5)
    (call,) = standin.calls
    assert call["cu_seqlens_k"].tolist() == [0, 5, 11, 11]
    torch.testing.assert_close(call["k"], torch.cat([k[0:5], k[2:8]]))
    torch.testing.assert_close(copied.out, in_place.out)
    torch.testing.assert_close(copied.lse, in_place.lse)


@pytest.mark.parametrize("generation", ["fa4", "fa3", "fa2"])
def test_window_convention_is_normalised(generation):
    adapter_cls, standin_cls = ADAPTERS[generation]
    standin = standin_cls()
    q, k, v, cu_q, starts, lens = packed_problem()
    res = adapter_cls(module=standin).varlen(q, k, v, cu_q, starts, lens, 4, 6, True, 0.5, window=(2, None))
    unlimited = None if generation == "fa4" else -1
    assert standin.calls[0]["window_size"] == (2, unlimited)
    ref = FA4StandIn().flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=torch.tensor([0, 2, 5, 12]),
                                              max_seqlen_q=4, max_seqlen_k=6, seqused_k=lens, softmax_scale=0.5,
                                              causal=True, window_size=(2, None), return_lse=True)
    torch.testing.assert_close(res.out, ref[0])


def test_adapter_imports_the_module_from_sys_modules(monkeypatch):
    standin = FA3StandIn()
    monkeypatch.setitem(sys.modules, "flash_attn_interface", standin)
    assert fa3.FA3Adapter().fa is standin


def test_old_fa2_lse_layout_is_refused():
    from tca.backends.flash.adapter import lse_rows_first

    with pytest.raises(RuntimeError, match="upgrade flash-attn"):
        lse_rows_first(torch.zeros(2, 3, 4), total_q=5, heads=3)


# ----------------------------------------------------------------------------------------- the plan


def covered_keys(seg, key_positions, B, HQ, LQ, L):
    """[B, HQ, LQ, L] bool: which key positions each query row reads through a Segments plan.

    key_positions: [TK] position of each row of the call's key buffer; the buffer is per (batch, KV head).
    """
    mask = torch.zeros(B * HQ * LQ, L, dtype=torch.bool)
    for s in range(len(seg.k_lens)):
        q0, q1 = int(seg.cu_seqlens_q[s]), int(seg.cu_seqlens_q[s + 1])
        k0, n = int(seg.k_starts[s]), int(seg.k_lens[s])
        m = q1 - q0
        for r in range(m):
            last = r + n - m if seg.causal else n - 1
            for j in range(0, last + 1):
                pos = int(key_positions[k0 + j])
                assert not mask[q0 + r, pos], "a key is read twice by one row"
                mask[q0 + r, pos] = True
    return mask.view(B, HQ, LQ, L)


@pytest.mark.parametrize("L,LQ,HQ,HKV", [(37, 37, 4, 2), (37, 5, 2, 2), (40, 40, 3, 1), (9, 9, 2, 1), (33, 1, 2, 2)])
def test_plan_reads_exactly_the_kept_set_without_overlap(L, LQ, HQ, HKV):
    """The union of the local and global segments is S(i) of semantics.md section 4 (block-aligned lo), and a key
    is never read by both parts."""
    B, b, w = 2, 4, 12
    gen = torch.Generator().manual_seed(L + LQ)
    J = max(0, ((L - 1) // b + 1) - w // b)
    mask = torch.rand(B, HKV, J * b, generator=gen) < 0.4
    from tca.selection import Selection

    selection = Selection.from_indices(*_mask_to_padded(mask), block_size=b, window=w, seq_len=L)
    expected = reference.kept_key_mask(selection, torch.arange(L - LQ, L))  # [B, HKV, LQ, L]
    expected = expected.repeat_interleave(HQ // HKV, dim=1)

    local = local_segments(B, HQ, HKV, L, LQ, b, w, "cpu")
    local_mask = covered_keys(local, torch.arange(B * HKV * L) % L, B, HQ, LQ, L)
    indices, counts = compact.from_selection(selection)
    N = indices.shape[-1]
    seen = local_mask
    if N:
        prefix = global_prefix_counts(indices, query_blocks(L, LQ, b, w, "cpu").lo)
        glob = global_segments(prefix, B, HQ, HKV, LQ, L, b, w, N, "cpu")
        global_mask = covered_keys(glob, indices.clamp_max(L - 1).reshape(-1), B, HQ, LQ, L)
        assert not (global_mask & local_mask).any(), "local and global parts overlap"
        seen = local_mask | global_mask
        assert glob.causal is False and glob.max_seqlen_k == int(prefix.max())
    assert local.causal is True and local.max_seqlen_k <= w
    assert torch.equal(seen, expected)


def _mask_to_padded(mask):
    return compact.from_mask(mask, mask.shape[-1])


def test_global_prefix_counts_match_a_count():
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 3, 64, generator=gen) < 0.3
    indices, counts = _mask_to_padded(mask)  # padded with L = 64
    lo = torch.tensor([0, 0, 8, 16, 40, 64])
    got = global_prefix_counts(indices, lo)
    want = torch.stack([mask[..., :x].sum(-1) for x in lo.tolist()], dim=-1)
    assert torch.equal(got, want)


def test_plan_memory_is_linear_in_keys_and_selected():
    """At a 128K-token geometry the plan reads keys in place: the local call's buffer is K itself and the
    global call's buffer is the N gathered tokens; only the int32 plan grows with the number of blocks."""
    B, HQ, HKV, L, b, w = 1, 32, 8, 131072, 128, 4096
    local = local_segments(B, HQ, HKV, L, L, b, w, "cpu")
    S = B * HQ * (L // b)
    assert local.k_lens.numel() == S and int(local.k_lens.max()) == w
    assert int(local.k_starts.max()) + w <= B * HKV * L  # every segment lies inside K: no copy needed
    assert int(local.cu_seqlens_q[-1]) == B * HQ * L


def test_rows_with_keys_expands_per_sequence():
    prefix = torch.tensor([[[0, 2, 3]]])
    glob = global_segments(prefix, 1, 1, 1, 9, 9, 4, 4, 3, "cpu")
    assert rows_with_keys(glob, 9).tolist() == [False] * 4 + [True] * 5


# ----------------------------------------------------------------------------------------- the merge


def test_merge_of_real_softmax_pieces_is_the_softmax_over_the_union():
    gen = torch.Generator().manual_seed(5)
    T, H, N, D = 6, 2, 20, 4
    logits = torch.randn(T, H, N, generator=gen, dtype=torch.float64) * 4
    values = torch.randn(N, D, generator=gen, dtype=torch.float64)
    part = torch.rand(T, H, N, generator=gen) < 0.5
    part[..., 0], part[..., 1] = True, False  # both parts non-empty

    def piece(sel):
        x = logits.masked_fill(~sel, float("-inf"))
        return x.softmax(-1) @ values, x.logsumexp(-1)

    o1, l1 = piece(part)
    o2, l2 = piece(~part)
    out, lse = merge_two(o1, l1, o2, l2, torch.ones(T, dtype=torch.bool), torch.float64)
    torch.testing.assert_close(out, logits.softmax(-1) @ values, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse.double(), logits.logsumexp(-1), atol=1e-5, rtol=1e-5)


def test_merge_ignores_what_an_empty_part_holds():
    gen = torch.Generator().manual_seed(6)
    o1 = torch.randn(4, 2, 3, generator=gen)
    l1 = torch.randn(4, 2, generator=gen)
    garbage = torch.full((4, 2, 3), float("nan"))
    has = torch.tensor([False, False, False, False])
    out, lse = merge_two(o1, l1, garbage, torch.full((4, 2), float("nan")), has)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, o1)
    torch.testing.assert_close(lse, l1)


# ----------------------------------------------------------------------------------------- end to end on CPU


class StandInAdapter(fa4.FA4Adapter):
    """The real FA4 adapter over the recording stand-in (its output dtype is q's, as FA4's)."""

    def __init__(self):
        super().__init__(module=FA4StandIn())


@pytest.fixture
def standin_adapter(monkeypatch):
    adapter = StandInAdapter()
    monkeypatch.setattr(flash_impl, "get_adapter", lambda generation=None: adapter)
    return adapter


@pytest.mark.parametrize("L,LQ,HQ,HKV", [(140, 140, 4, 2), (140, 19, 2, 2), (90, 90, 3, 1)])
def test_attend_given_a_selection_matches_the_reference(standin_adapter, L, LQ, HQ, HKV):
    """Layer 2 on CPU: the same selection to the reference and to the flash plan + merge (fp16 in, as FA)."""
    config = TCAConfig(block_size=16, window=48)
    q, k, v = make_qkv(2, HQ, HKV, L, 16, LQ=LQ, dtype=torch.float16, seed=L + LQ)
    budgets = random_budgets(HKV, 16, seed=1)
    scale = 16**-0.5
    selection = reference.select(q.float(), k.float(), budgets, config, scale)
    out, lse = flash_impl.FlashBackend.attend(q, k, v, selection, scale, return_lse=True)
    ref_out, ref_lse = reference.attend(q.float(), k.float(), v.float(), selection, scale, return_lse=True)
    assert out.dtype == torch.float16 and out.shape == q.shape
    assert_close(out, ref_out, dtype=torch.float16, msg="out")
    assert_close(lse, ref_lse, dtype=torch.float16, lse=True, msg="lse")
    assert len(standin_adapter.fa.calls) == 2  # local + global


def test_attention_and_decode_match_the_reference(standin_adapter):
    """Layer 4 on CPU: selection (torch backend), prefill and decode steps crossing block boundaries."""
    config = TCAConfig(block_size=16, window=32)
    HQ, HKV, L, D, steps = 4, 2, 81, 16, 24
    q, k, v = make_qkv(1, HQ, HKV, L + steps, D, dtype=torch.float16, seed=7)
    budgets = random_budgets(HKV, 16, seed=2)
    scale = D**-0.5
    out, cache = flash_impl.FlashBackend.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], budgets, config, scale)
    ref_out, ref_cache = reference.prefill(q[:, :, :L].float(), k[:, :, :L].float(), v[:, :, :L].float(), budgets,
                                           config, scale)
    assert_close(out, ref_out, dtype=torch.float16, msg="prefill")
    for t in range(L, L + steps):
        s = slice(t, t + 1)
        got = flash_impl.FlashBackend.decode(q[:, :, s], k[:, :, s], v[:, :, s], cache)
        want = reference.decode(q[:, :, s].float(), k[:, :, s].float(), v[:, :, s].float(), ref_cache)
        assert_close(got, want, dtype=torch.float16, msg=f"decode step at position {t}")
        for h in range(HKV):
            assert cache.positions_of(0, h).tolist() == ref_cache.positions[0][h].tolist(), f"cache of head {h}"
    attn = flash_impl.FlashBackend.attention(q, k, v, budgets, config, scale)
    assert_close(attn, reference.attention(q.float(), k.float(), v.float(), budgets, config, scale),
                 dtype=torch.float16, msg="attention")


def test_decode_reads_exactly_the_cache_in_split_chunks(standin_adapter):
    """One decode step: the chunks sent to flash (ring ranges, wrapping, and global segments) cover every
    position the cache holds for each (batch, KV head) exactly once, and nothing else."""
    config = TCAConfig(block_size=16, window=48)
    B, HQ, HKV, L, D = 2, 4, 2, 100, 16
    q, k, v = make_qkv(B, HQ, HKV, L + 1, D, dtype=torch.float16, seed=11)
    budgets = random_budgets(HKV, 16, seed=3)
    _, cache = flash_impl.FlashBackend.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], budgets, config, D**-0.5)
    calls = standin_adapter.fa.calls
    calls.clear()
    s = slice(L, L + 1)
    flash_impl.FlashBackend.decode(q[:, :, s], k[:, :, s], v[:, :, s], cache)
    W = cache.window_slots
    ring_pos = torch.full((B * HKV * W,), -1, dtype=torch.long)
    for p in range(cache.local_start(0), cache.seq_lens[0]):  # one length: every sequence's window is the same
        ring_pos.view(B * HKV, W)[:, p % W] = p
    read = [[] for _ in range(B * HKV)]
    for call in calls:
        is_ring = call["k"].data_ptr() == cache.local_k.data_ptr()
        parts = (call["cu_seqlens_q"].numel() - 1) // (B * HKV)
        for seq, (start, n) in enumerate(zip(call["cu_seqlens_k"][:-1].tolist(), call["seqused_k"].tolist(), strict=True)):
            rows = range(start, start + n)
            read[seq // parts] += [int(ring_pos[r]) if is_ring else int(cache.global_pos[r]) for r in rows]
        assert call["causal"] is False and call["max_seqlen_q"] == 1
    for bh in range(B * HKV):
        assert sorted(read[bh]) == cache.positions_of(bh // HKV, bh % HKV).tolist(), f"(batch, KV head) {bh}"

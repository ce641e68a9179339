"""PackedKVCache (src/tca/packed_cache.py): layout and bookkeeping against docs/semantics.md section 5.

The cache is driven here by the reference's own decisions (tca.reference.prefill / decode_step): after each
reference step we append to the packed cache exactly the positions the reference kept of the leaving block,
so these tests check the storage (segments, ring, growth, sizes), not the scoring (test_torch_backend does).

Shape letters: B batch, HQ query heads, HKV key/value heads, L keys, D head dim, W ring slots.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_qkv, random_budgets
from tca import TCAConfig, reference
from tca.budgets import block_keep_count
from tca.geometry import window_start
from tca.packed_cache import PackedKVCache

SCALE = 0.125


def _prefill(B, HQ, HKV, L, D, config, seed, budgets=None, dtype=torch.float64):
    q, k, v = make_qkv(B, HQ, HKV, L, D, dtype=dtype, seed=seed)
    budgets = random_budgets(HKV, config.block_size, seed) if budgets is None else budgets
    _, ref_cache = reference.prefill(q, k, v, budgets, config, SCALE)
    selection = reference.select(q, k, budgets, config, SCALE)
    cache = PackedKVCache.from_prefill(k, v, selection, block_keep_count(budgets), config, SCALE, backend="torch")
    return cache, ref_cache


def _assert_same_content(cache: PackedKVCache, ref_cache) -> None:
    """Positions, keys and values per (b, h) equal the reference cache's; lengths and used bytes match."""
    B, H = cache.batch_size, cache.num_kv_heads
    for b in range(B):
        for h in range(H):
            assert cache.positions_of(b, h).tolist() == ref_cache.positions[b][h].tolist(), (b, h)
            torch.testing.assert_close(cache.keys_of(b, h), ref_cache.keys[b][h], atol=0, rtol=0)
            torch.testing.assert_close(cache.values_of(b, h), ref_cache.values[b][h], atol=0, rtol=0)
    assert torch.equal(cache.lengths.cpu(), ref_cache.lengths)
    assert cache.used_nbytes == ref_cache.nbytes
    assert cache.seq_len == ref_cache.seq_len


def _allocated_bytes(cache: PackedKVCache) -> int:
    """What nbytes must say: 2 (K and V) x (ring slots of every head + global capacity) x D x element size."""
    B, H, D, e = cache.batch_size, cache.num_kv_heads, cache.head_dim, cache.local_k.element_size()
    return 2 * (B * H * cache.window_slots + int(cache.global_cap.sum())) * D * e


@pytest.mark.parametrize(
    "L, b, w",
    [(40, 16, 32), (64, 16, 32), (100, 16, 48), (20, 16, 64), (64, 16, 64), (129, 32, 64)],
)
def test_from_prefill_holds_selected_and_local_positions(L, b, w):
    config = TCAConfig(block_size=b, window=w)
    cache, ref_cache = _prefill(2, 4, 2, L, 8, config, seed=L + b)
    _assert_same_content(cache, ref_cache)
    lo = window_start(L - 1, b, w)
    assert cache.local_start == lo and cache.local_count == L - lo
    assert cache.window_slots == min(w, L)
    # Global segments are exact after a prefill (no spare capacity) and tile the flat buffer in (b, h) order.
    assert torch.equal(cache.global_cap, cache.global_len)
    assert (
        cache.global_start.flatten().tolist()
        == (torch.cumsum(cache.global_len.flatten(), 0) - cache.global_len.flatten()).tolist()
    )
    assert cache.nbytes == _allocated_bytes(cache)
    assert cache.used_nbytes <= cache.nbytes


def _follow_reference_step(cache: PackedKVCache, ref_cache, q, k, v) -> None:
    """One decode step: the reference decides; the packed cache stores the same kept positions."""
    block = cache.leaving_block()
    before = [[set(p.tolist()) for p in row] for row in ref_cache.positions]
    reference.decode_step(q, k, v, ref_cache)
    if block is not None:
        start, end = block
        B, H = cache.batch_size, cache.num_kv_heads
        kept = [
            [sorted(p for p in ref_cache.positions[bi][h].tolist() if start <= p < end) for h in range(H)]
            for bi in range(B)
        ]
        for bi in range(B):
            for h in range(H):
                assert set(kept[bi][h]) <= before[bi][h]
        T = max(len(x) for row in kept for x in row)
        pos = torch.zeros(B, H, T, dtype=torch.int64)
        counts = torch.zeros(B, H, dtype=torch.int64)
        for bi in range(B):
            for h in range(H):
                pos[bi, h, : len(kept[bi][h])] = torch.tensor(kept[bi][h], dtype=torch.int64)
                counts[bi, h] = len(kept[bi][h])
        slots = pos % cache.window_slots
        ring = cache.local_slots(start, end)
        assert ring.tolist() == list(range(start % cache.window_slots, start % cache.window_slots + end - start))
        index = slots[..., None].expand(-1, -1, -1, cache.head_dim)
        cache.append_global(cache.local_k.gather(2, index), cache.local_v.gather(2, index), pos, counts)
    cache.append_local(k, v)


@pytest.mark.parametrize(
    "L, steps, b, w",
    [(40, 70, 16, 32), (20, 90, 16, 64), (64, 40, 16, 64), (33, 50, 16, 16)],
)
def test_decode_bookkeeping_follows_reference(L, steps, b, w):
    """Across several window moves (ring wraparound, growth of the ring and of the segments): content, lengths,
    used and allocated bytes after every step."""
    config = TCAConfig(block_size=b, window=w)
    B, HQ, HKV, D = 2, 4, 2, 8
    cache, ref_cache = _prefill(B, HQ, HKV, L, D, config, seed=steps)
    gen = torch.Generator().manual_seed(steps)
    moves = 0
    for _ in range(steps):
        q = torch.randn(B, HQ, 1, D, generator=gen, dtype=torch.float64)
        k = torch.randn(B, HKV, 1, D, generator=gen, dtype=torch.float64)
        v = torch.randn(B, HKV, 1, D, generator=gen, dtype=torch.float64)
        moves += cache.leaving_block() is not None
        _follow_reference_step(cache, ref_cache, q, k, v)
        _assert_same_content(cache, ref_cache)
        assert cache.nbytes == _allocated_bytes(cache)
        assert bool((cache.global_len <= cache.global_cap).all())
        assert cache.window_slots <= w
    assert moves >= 2, "the test must cross several block boundaries"
    assert cache.seq_len > w and cache.window_slots == w  # the ring wrapped around


def test_leaving_block_is_the_block_before_the_new_window():
    config = TCAConfig(block_size=16, window=32)
    cache, _ = _prefill(1, 2, 1, 40, 4, config, seed=3)
    # lo(39) = 16, lo(40) = 16: no move; lo(47)=16, lo(48)=32: the block [16, 32) leaves when 48 arrives.
    assert cache.leaving_block() is None
    for _ in range(8):
        cache.append_local(torch.zeros(1, 1, 1, 4, dtype=torch.float64), torch.zeros(1, 1, 1, 4, dtype=torch.float64))
    assert cache.seq_len == 48 and cache.leaving_block() == (16, 32)
    assert cache.local_slot_range(16, 32) == slice(16, 32)


def test_reserve_global_grows_and_keeps_rows():
    config = TCAConfig(block_size=16, window=32)
    cache, ref_cache = _prefill(2, 2, 2, 80, 4, config, seed=5)
    old_cap = cache.global_cap.clone()
    cache.reserve_global(torch.tensor([3, 0]))
    assert bool((cache.global_cap[:, 0] >= cache.global_len[:, 0] + 3).all())
    assert torch.equal(cache.global_cap[:, 1], old_cap[:, 1])  # no growth needed there
    _assert_same_content(cache, ref_cache)  # rows moved, content intact
    assert cache.nbytes == _allocated_bytes(cache)
    # Enough room already: nothing is reallocated.
    buffer = cache.global_k
    cache.reserve_global(torch.tensor([1, 0]))
    assert cache.global_k is buffer


def test_global_padded_gathers_each_segment():
    config = TCAConfig(block_size=16, window=32)
    budgets = torch.stack([random_budgets(1, 16, 1)[0], torch.tensor([0.0, 0, 0, 0, 1.0], dtype=torch.float64)])
    cache, ref_cache = _prefill(2, 4, 2, 96, 4, config, seed=9, budgets=budgets)
    k, v, pos, valid = cache.global_padded()
    assert k.shape[:3] == pos.shape == valid.shape
    for b in range(2):
        for h in range(2):
            n = int(cache.global_len[b, h])
            assert valid[b, h].sum() == n and bool(valid[b, h, :n].all())
            assert pos[b, h, :n].tolist() == cache.positions_of(b, h)[:n].tolist()
            torch.testing.assert_close(k[b, h, :n], ref_cache.keys[b][h][:n], atol=0, rtol=0)


def test_short_prompt_allocates_only_its_length_then_grows_to_the_window():
    config = TCAConfig(block_size=16, window=64)
    cache, _ = _prefill(1, 2, 1, 10, 4, config, seed=2, dtype=torch.float32)
    assert cache.window_slots == 10 and int(cache.global_cap.sum()) == 0
    assert cache.nbytes == 2 * 10 * 4 * 4
    for _ in range(60):
        cache.append_local(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))
    assert cache.window_slots == 64 and cache.seq_len == 70 - 0 and cache.local_count == 70 - window_start(69, 16, 64)

"""PackedKVCache (tca.backends.common.packed_cache): layout, bookkeeping and the torch decode step against the
reference's stateful decode (docs/semantics.md section 5).

After every step the cache must hold, per (sequence, KV head), exactly the reference's positions, keys and values;
its host mirror (lengths, seq_lens) must equal the device state; allocation must stay within one block of what
the kept tokens need. Sequences of one batch may have different lengths (joined with PackedKVCache.concat).

Shape letters: B batch, HQ query heads, HKV key/value heads, L keys, D head dim, W ring slots.
"""

from __future__ import annotations

import pytest
import torch

from helpers import make_qkv, random_budgets
from tca import TCAConfig, reference
from tca.backends.common import decode_torch
from tca.backends.common.cache_protocol import KVCache, decode_on_cache
from tca.backends.common.packed_cache import PackedKVCache, ring_slots
from tca.budgets import block_keep_count

SCALE = 0.125


def _prefill(B, HQ, HKV, L, D, config, seed, budgets=None, dtype=torch.float64):
    q, k, v = make_qkv(B, HQ, HKV, L, D, dtype=dtype, seed=seed)
    budgets = random_budgets(HKV, config.block_size, seed) if budgets is None else budgets
    _, ref_cache = reference.prefill(q, k, v, budgets, config, SCALE)
    selection = reference.select(q, k, budgets, config, SCALE)
    cache = PackedKVCache.from_prefill(k, v, selection, block_keep_count(budgets), config, SCALE)
    return cache, ref_cache


def _assert_same_content(cache: PackedKVCache, ref_caches, rows=None) -> None:
    """Positions, keys and values per (b, h) equal the reference caches' (one per sequence, batch 1 each)."""
    for b, (ref, rb) in enumerate(ref_caches):
        for h in range(cache.num_kv_heads):
            assert cache.positions_of(b, h).tolist() == ref.positions[rb][h].tolist(), (b, h)
            torch.testing.assert_close(cache.keys_of(b, h), ref.keys[rb][h], atol=0, rtol=0)
            torch.testing.assert_close(cache.values_of(b, h), ref.values[rb][h], atol=0, rtol=0)
        assert cache.seq_lens[b] == ref.seq_len
    assert torch.equal(cache.global_len.cpu(), cache.global_len_host)  # the host mirror never drifts
    assert torch.equal(cache.positions_t.cpu(), torch.tensor(cache.seq_lens))


def _allocated_bytes(cache: PackedKVCache) -> int:
    """What nbytes must say: 2 (K and V) x (ring slots + global capacity + the scratch row) x D x element size."""
    B, H, D, e = cache.batch_size, cache.num_kv_heads, cache.head_dim, cache.local_k.element_size()
    return 2 * (B * H * cache.window_slots + int(cache.global_cap.sum()) + 1) * D * e


def test_the_cache_follows_the_contract():
    cache, _ = _prefill(1, 2, 1, 40, 4, TCAConfig(block_size=16, window=32), seed=1)
    assert isinstance(cache, KVCache)


@pytest.mark.parametrize("L, b, w", [(40, 16, 32), (64, 16, 32), (100, 16, 48), (20, 16, 64), (129, 32, 64)])
def test_from_prefill_holds_selected_and_local_positions(L, b, w):
    config = TCAConfig(block_size=b, window=w)
    cache, ref_cache = _prefill(2, 4, 2, L, 8, config, seed=L + b)
    _assert_same_content(cache, [(ref_cache, 0), (ref_cache, 1)])
    assert cache.window_slots == ring_slots(L, config) and cache.window_slots < min(w, L) + b
    assert torch.equal(cache.global_cap, cache.global_len_host)  # exact after a prefill
    assert cache.nbytes == _allocated_bytes(cache)
    assert torch.equal(cache.lengths, ref_cache.lengths)


@pytest.mark.parametrize("L, steps, b, w", [(40, 70, 16, 32), (20, 90, 16, 64), (64, 40, 16, 64), (33, 50, 16, 16)])
def test_decode_follows_the_reference_step_by_step(L, steps, b, w):
    """Across several window moves (ring wraparound, growth of the ring and of the segments): outputs, content,
    lengths, allocated bytes within one block per head of what is kept."""
    config = TCAConfig(block_size=b, window=w)
    B, HQ, HKV, D = 2, 4, 2, 8
    cache, ref_cache = _prefill(B, HQ, HKV, L, D, config, seed=steps)
    gen = torch.Generator().manual_seed(steps)
    for _ in range(steps):
        q, k, v = (torch.randn(B, H, 1, D, generator=gen, dtype=torch.float64) for H in (HQ, HKV, HKV))
        want = reference.decode(q, k, v, ref_cache)
        got = decode_on_cache(cache, q, k, v)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        _assert_same_content(cache, [(ref_cache, 0), (ref_cache, 1)])
        assert cache.nbytes == _allocated_bytes(cache)
        spare = cache.global_cap - cache.global_len_host
        assert bool((spare <= cache.keep_host[None, :]).all())  # at most one block's keep count per head
    assert cache.seq_len > w and cache.window_slots == w  # the ring wrapped around


def test_sequences_of_different_lengths_decode_at_their_own_positions():
    """A batch joined from prompts of different lengths equals each prompt decoded alone."""
    config = TCAConfig(block_size=16, window=32)
    HQ, HKV, D = 4, 2, 8
    alone = [_prefill(1, HQ, HKV, L, D, config, seed=L, budgets=random_budgets(HKV, 16, 3)) for L in (70, 33, 100)]
    cache = PackedKVCache.concat([c for c, _ in alone])
    refs = [(r, 0) for _, r in alone]
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        q, k, v = (torch.randn(3, H, 1, D, generator=gen, dtype=torch.float64) for H in (HQ, HKV, HKV))
        got = decode_on_cache(cache, q, k, v)
        for b, (ref, _) in enumerate(refs):
            want = reference.decode(q[b : b + 1], k[b : b + 1], v[b : b + 1], ref)
            torch.testing.assert_close(got[b : b + 1], want, atol=1e-12, rtol=1e-12)
        _assert_same_content(cache, refs)


def test_static_mode_runs_the_predicated_step_with_the_same_result():
    """With `static` (a replayed CUDA graph), compression runs every step, predicated on the device: same cache."""
    config = TCAConfig(block_size=16, window=32)
    eager, ref_cache = _prefill(1, 4, 2, 50, 8, config, seed=4)
    static, _ = _prefill(1, 4, 2, 50, 8, config, seed=4)
    static.reserve(40)
    static.static = True
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        q, k, v = (torch.randn(1, H, 1, 8, generator=gen, dtype=torch.float64) for H in (4, 2, 2))
        torch.testing.assert_close(decode_on_cache(static, q, k, v), decode_on_cache(eager, q, k, v), atol=1e-12, rtol=1e-12)
        assert static.positions_of(0, 1).tolist() == eager.positions_of(0, 1).tolist()


def test_advance_host_replays_the_bookkeeping_of_a_step():
    """The host half of a step (what a graph replay leaves to Python) matches what an eager step records."""
    config = TCAConfig(block_size=16, window=32)
    cache, _ = _prefill(2, 2, 1, 47, 4, config, seed=2)
    mirror, _ = _prefill(2, 2, 1, 47, 4, config, seed=2)
    for _ in range(20):
        decode_on_cache(cache, torch.randn(2, 2, 1, 4, dtype=torch.float64), torch.randn(2, 1, 1, 4, dtype=torch.float64),
                    torch.randn(2, 1, 1, 4, dtype=torch.float64))
        mirror.advance_host()
        assert mirror.seq_lens == cache.seq_lens and torch.equal(mirror.global_len_host, cache.global_len_host)


def test_reserve_grows_segments_and_keeps_rows():
    config = TCAConfig(block_size=16, window=32)
    cache, ref_cache = _prefill(2, 2, 2, 80, 4, config, seed=5)
    cache.reserve(64)
    assert bool((cache.global_cap >= cache.global_len_host + 4 * cache.keep_host).all())
    _assert_same_content(cache, [(ref_cache, 0), (ref_cache, 1)])  # rows moved, content intact
    assert cache.nbytes == _allocated_bytes(cache)
    buffer = cache.global_k
    cache.reserve(16)  # enough room already: nothing is reallocated
    assert cache.global_k is buffer


def test_short_prompt_allocates_its_length_within_a_block():
    config = TCAConfig(block_size=16, window=64)
    cache, _ = _prefill(1, 2, 1, 10, 4, config, seed=2, dtype=torch.float32)
    assert cache.window_slots == 16 and int(cache.global_cap.sum()) == 0
    dense = 2 * 10 * 4 * 4
    assert cache.nbytes < dense + 2 * (16 + 1) * 4 * 4  # within one block (+ the scratch row) of a dense cache
    for _ in range(60):
        decode_on_cache(cache, torch.ones(1, 2, 1, 4), torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))
    assert cache.window_slots == 64 and cache.seq_len == 70


def test_reset_empties_the_cache():
    cache, _ = _prefill(1, 2, 1, 80, 4, TCAConfig(block_size=16, window=32), seed=2)
    cache.reset()
    assert int(cache.lengths.sum()) == 0 and cache.seq_len == 0 and cache.window_slots == 0


def test_decode_torch_local_valid_marks_the_window():
    cache, _ = _prefill(1, 2, 1, 70, 4, TCAConfig(block_size=16, window=32), seed=2)
    valid = decode_torch.local_valid(cache)[0]
    lo = cache.local_start(0)
    assert valid.sum() == 70 - lo
    assert sorted((torch.arange(lo, 70) % cache.window_slots).tolist()) == valid.nonzero().squeeze(-1).tolist()

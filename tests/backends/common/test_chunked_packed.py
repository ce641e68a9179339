"""Chunked and streaming prefill on the PackedKVCache (torch backend) against the reference (section 5b).

Chunk by chunk for several chunk sizes and both modes (float64: same kept positions, outputs to rounding),
the streaming memory bound, continuing a PackedKVCache, and the errors a packed cache adds.
Shape letters: B, HQ, HKV, L, D as in the package.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import tca
from helpers import make_qkv, random_budgets
from tca.backends.common.packed_cache import PackedKVCache
from tca.geometry import window_start
from tca.reference.cache import cached_positions

CONFIG = tca.TCAConfig(block_size=16, window=32)
B, HQ, HKV, D = 2, 4, 2, 8
TOL = {"rtol": 1e-10, "atol": 1e-10}


def packed_positions(cache: PackedKVCache):
    return [[cache.positions_of(b, h).tolist() for h in range(cache.num_kv_heads)] for b in range(cache.batch_size)]


def run(backend, mode, size, q, k, v, budgets, after_chunk=None):
    state = tca.start_prefill(mode=mode, budgets=budgets, config=CONFIG, backend=backend)
    outs = []
    for s in range(0, k.shape[2], size):
        e = min(k.shape[2], s + size)
        outs.append(tca.prefill_chunk(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], state, position=s))
        if after_chunk is not None:
            after_chunk(e, state)
    return outs, tca.finish_prefill(state)


@pytest.mark.parametrize(
    "mode,size", [("exact", 1), ("exact", 7), ("exact", 16), ("exact", 41), ("exact", 150)]
    + [("streaming", 16), ("streaming", 32), ("streaming", 48), ("streaming", 160)],
)
def test_torch_matches_the_reference_chunk_by_chunk(mode, size):
    q, k, v = make_qkv(B, HQ, HKV, 150, D, seed=size)
    budgets = random_budgets(HKV, CONFIG.block_size, seed=size)
    got, cache = run("torch", mode, size, q, k, v, budgets)
    want, ref_cache = run("reference", mode, size, q, k, v, budgets)
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, i=index: f"{mode} chunk {i} of {size} tokens: {m}")
    assert isinstance(cache, PackedKVCache)
    assert packed_positions(cache) == cached_positions(ref_cache)
    for b in range(B):
        for h in range(HKV):
            torch.testing.assert_close(cache.keys_of(b, h), ref_cache.keys[b][h], rtol=0, atol=0)
            torch.testing.assert_close(cache.values_of(b, h), ref_cache.values[b][h], rtol=0, atol=0)
    for i in range(3):  # decoding goes on identically
        x = make_qkv(B, HQ, HKV, 1, D, seed=100 + i)
        torch.testing.assert_close(tca.decode(*x, cache, backend="torch"), tca.decode(*x, ref_cache), **TOL)


def test_exact_finish_is_the_one_shot_packed_cache():
    q, k, v = make_qkv(B, HQ, HKV, 120, D, seed=3)
    _, chunked = run("torch", "exact", 25, q, k, v, None)
    _, one_shot = tca.prefill(q, k, v, config=CONFIG, backend="torch")
    assert packed_positions(chunked) == packed_positions(one_shot)
    assert chunked.nbytes == one_shot.nbytes


def test_streaming_memory_stays_at_window_plus_kept_tokens():
    q, k, v = make_qkv(1, HQ, HKV, 400, D, seed=4)
    budgets = random_budgets(HKV, CONFIG.block_size, seed=4)
    element = 2 * D * q.element_size()  # bytes of one token's key and value
    _, ref_cache = run("reference", "streaming", 32, q, k, v, budgets)
    seen = []

    def check(e, state):
        cache = state._state
        window = e - window_start(e - 1, CONFIG.block_size, CONFIG.window)
        kept = cache.global_len_host  # [1, HKV] kept tokens of compressed blocks
        assert torch.equal(cache.lengths, kept + window)
        assert cache.used_nbytes == int(cache.lengths.sum()) * element
        # Allocated: the ring (at most the window) and the segments' capacity, at most a quarter over the kept
        # tokens plus one chunk's worth of them (room made when they grow), and the scratch row.
        chunk_kept = 32 // CONFIG.block_size * int(cache.keep_host.max())
        assert cache.window_slots <= CONFIG.window
        assert int(cache.global_cap.sum()) <= int(kept.sum() * 1.25) + HKV * chunk_kept
        seen.append(e)

    _, cache = run("torch", "streaming", 32, q, k, v, budgets, after_chunk=check)
    assert len(seen) == 13 and packed_positions(cache) == cached_positions(ref_cache)
    assert cache.nbytes < 400 * HKV * element  # below the dense KV of the prompt


def test_continuing_a_packed_cache_in_streaming_mode():
    q, k, v = make_qkv(B, HQ, HKV, 130, D, seed=5)
    budgets = random_budgets(HKV, CONFIG.block_size, seed=5)
    caches = {}
    for backend in ("torch", "reference"):
        _, cache = tca.prefill(q[:, :, :64], k[:, :, :64], v[:, :, :64], budgets=budgets, config=CONFIG, backend=backend)
        tca.decode(q[:, :, 64:65], k[:, :, 64:65], v[:, :, 64:65], cache)
        state = tca.start_prefill(mode="streaming", cache=cache, budgets=budgets, backend=backend)
        assert state.backend == backend and state.seq_len == 65
        out1 = tca.prefill_chunk(q[:, :, 65:96], k[:, :, 65:96], v[:, :, 65:96], state, position=65)
        out2 = tca.prefill_chunk(q[:, :, 96:], k[:, :, 96:], v[:, :, 96:], state, position=96)
        assert tca.finish_prefill(state) is cache
        caches[backend] = (out1, out2, cache)
    for a, b in zip(caches["torch"][:2], caches["reference"][:2], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert packed_positions(caches["torch"][2]) == cached_positions(caches["reference"][2])
    # A finished streaming prefill records its budgets: the next continuation needs none.
    assert tca.start_prefill(mode="streaming", cache=caches["torch"][2], backend="torch").seq_len == 130


def test_a_packed_cache_continues_on_a_backend_that_can():
    q, k, v = make_qkv(1, HQ, HKV, 48, D, seed=6)
    budgets = tca.default_budgets(16)
    _, cache = tca.prefill(q, k, v, config=CONFIG, backend="torch")
    with pytest.raises(tca.BackendUnavailableError, match="backend 'reference' cannot continue this cache"):
        tca.start_prefill(mode="streaming", cache=cache, budgets=budgets, backend="reference")
    with pytest.raises(tca.BackendUnavailableError, match="chunked prefill is not implemented"):
        tca.start_prefill(mode="streaming", cache=cache, budgets=budgets, backend="flash")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tca.BackendChoiceWarning)
        state = tca.start_prefill(mode="streaming", cache=cache, budgets=budgets)
    assert state.backend not in (None, "reference")


def test_a_left_padded_cache_cannot_take_streaming_chunks():
    budgets = tca.default_budgets(16)
    parts = []
    for L in (40, 56):
        q, k, v = make_qkv(1, HQ, HKV, L, D, seed=L)
        parts.append(tca.prefill(q, k, v, config=CONFIG, backend="torch")[1])
    cache = PackedKVCache.concat(parts)
    state = tca.start_prefill(mode="streaming", cache=cache, budgets=budgets, backend="torch")
    q, k, v = make_qkv(2, HQ, HKV, 16, D, seed=7)
    with pytest.raises(ValueError, match=r"sequences of different lengths \[40, 56\]"):
        tca.prefill_chunk(q, k, v, state)
    assert cache.seq_lens == [40, 56] and state.seq_len == 56

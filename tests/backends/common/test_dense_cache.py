"""The dense path's cache (backend="auto" below the crossover): every token in one contiguous buffer, exact
dense decode, the bytes of a dense cache (at most one block of spare room per head), the cache contract, padded
batches, and the packed copy that graph decoding captures."""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import dense_causal, force_crossover, make_qkv
from tca.backends.common.cache_protocol import KVCache
from tca.backends.common.dense_cache import DenseKVCache
from tca.backends.common.packed_cache import PackedKVCache

CONFIG = tca.TCAConfig(block_size=16, window=32)


@pytest.fixture
def dense_below_200(monkeypatch):
    force_crossover(monkeypatch, 200)


def test_auto_below_the_crossover_makes_a_dense_cache_of_dense_bytes(dense_below_200):
    B, HKV, D, L = 2, 2, 16, 150
    q, k, v = make_qkv(B, 4, HKV, 190, D, dtype=torch.float32, seed=4)
    _, cache = tca.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], config=CONFIG)
    assert isinstance(cache, DenseKVCache) and isinstance(cache, KVCache)
    for i in range(L, 190):
        tca.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache)
        held = i + 1
        capacity = -(-held // CONFIG.block_size) * CONFIG.block_size  # whole blocks, never more than one spare
        assert cache.nbytes == 2 * B * HKV * capacity * D * 4
        assert cache.used_nbytes == 2 * B * HKV * held * D * 4
    assert cache.lengths.tolist() == [[190, 190]] * B


def test_a_reselecting_policy_on_the_dense_path_keeps_the_dense_cache(dense_below_200):
    q, k, v = make_qkv(1, 4, 2, 100, 16, dtype=torch.float32, seed=5)
    _, cache = tca.prefill(q, k, v, config=CONFIG, policy=tca.Reselect(every=1))
    assert isinstance(cache, DenseKVCache)  # every token is attended: nothing to re-select


def _decode_all(cache, q, k, v, start):
    return torch.cat([tca.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache)
                      for i in range(start, q.shape[2])], dim=2)


def test_sequences_of_different_lengths_join_right_aligned_and_decode_as_alone(dense_below_200):
    lengths, new = (120, 37, 64), 30
    qkvs = [make_qkv(1, 4, 2, L + new, 16, dtype=torch.float32, seed=10 + L) for L in lengths]
    caches = [tca.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], config=CONFIG)[1] for (q, k, v), L in zip(qkvs, lengths, strict=True)]
    joined = DenseKVCache.concat(caches)
    assert joined.seq_lens == list(lengths) and joined.pads == [0, 120 - 37, 120 - 64]
    for step in range(new):
        q = torch.cat([q[:, :, L + step : L + step + 1] for (q, _, _), L in zip(qkvs, lengths, strict=True)])
        k = torch.cat([k[:, :, L + step : L + step + 1] for (_, k, _), L in zip(qkvs, lengths, strict=True)])
        v = torch.cat([v[:, :, L + step : L + step + 1] for (_, _, v), L in zip(qkvs, lengths, strict=True)])
        out = tca.decode(q, k, v, joined)
        for b, ((qa, ka, va), L) in enumerate(zip(qkvs, lengths, strict=True)):
            n = L + step + 1
            want = dense_causal(qa[:, :, :n], ka[:, :, :n], va[:, :, :n], 0.25)[:, :, -1:]
            torch.testing.assert_close(out[b : b + 1], want, atol=1e-5, rtol=1e-5)
    assert joined.seq_lens == [L + new for L in lengths]


@pytest.mark.parametrize("padded", [False, True])
def test_the_packed_copy_decodes_like_the_dense_cache(dense_below_200, padded):
    """Graph decoding captures the packed copy (dense budgets): the same tokens, the same outputs."""
    lengths = (90, 60) if padded else (90, 90)
    qkvs = [make_qkv(1, 4, 2, L + 40, 16, dtype=torch.float32, seed=20 + L + i) for i, L in enumerate(lengths)]
    caches = [tca.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], config=CONFIG)[1] for (q, k, v), L in zip(qkvs, lengths, strict=True)]
    dense_cache = DenseKVCache.concat(caches)
    packed = dense_cache.to_packed()
    assert isinstance(packed, PackedKVCache) and packed.seq_lens == list(lengths)
    assert torch.equal(packed.lengths, dense_cache.lengths)
    for step in range(40):
        pick = [slice(L + step, L + step + 1) for L in lengths]
        q, k, v = (torch.cat([t[i][:, :, s] for t, s in zip(qkvs, pick, strict=True)]) for i in range(3))
        torch.testing.assert_close(tca.decode(q, k, v, packed, backend="torch"), tca.decode(q, k, v, dense_cache),
                                   atol=1e-5, rtol=1e-5)
    assert torch.equal(packed.lengths, dense_cache.lengths)  # every token kept by both


def test_reset_empties_the_cache(dense_below_200):
    q, k, v = make_qkv(1, 4, 2, 50, 16, dtype=torch.float32, seed=6)
    _, cache = tca.prefill(q, k, v, config=CONFIG)
    cache.reset()
    assert cache.nbytes == 0 and cache.seq_len == 0 and int(cache.lengths.sum()) == 0


def test_a_streaming_prefill_continues_the_dense_cache_as_packed(dense_below_200):
    q, k, v = make_qkv(1, 4, 2, 96, 16, dtype=torch.float32, seed=7)
    _, cache = tca.prefill(q[:, :, :64], k[:, :, :64], v[:, :, :64], config=CONFIG)
    budgets = tca.default_budgets(CONFIG.block_size)
    state = tca.start_prefill(mode="streaming", cache=cache, budgets=budgets, backend="torch")
    tca.prefill_chunk(q[:, :, 64:], k[:, :, 64:], v[:, :, 64:], state)
    continued = tca.finish_prefill(state)
    assert isinstance(continued, PackedKVCache) and continued.seq_len == 96

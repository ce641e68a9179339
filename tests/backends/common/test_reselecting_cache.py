"""The torch ReselectingCache (semantics.md section 5c) against the reference, on the device and offloaded.

Shape letters: B batch, HQ query heads, HKV KV heads, L prompt length, D head dim, b, w.
"""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import make_qkv, random_budgets
from tca.backends.common.reselecting_cache import ReselectingCache
from tca.reference.reselect import ReselectingReferenceCache


def decode_both(L0, steps, b, w, heads, every, offload, seed, B=2, D=16, budgets=None, blocks=None):
    HQ, HKV = heads
    q, k, v = make_qkv(B, HQ, HKV, L0 + steps, D, seed=seed)
    budgets = random_budgets(HKV, b, seed=seed) if budgets is None else budgets
    config = tca.TCAConfig(block_size=b, window=w)
    policy = tca.Reselect(every=every, offload=offload, blocks=blocks)
    prompt = [t[:, :, :L0] for t in (q, k, v)]
    _, ref = tca.prefill(*prompt, budgets=budgets, config=config, backend="reference", policy=policy)
    _, fast = tca.prefill(*prompt, budgets=budgets, config=config, backend="torch", policy=policy)
    assert isinstance(ref, ReselectingReferenceCache) and isinstance(fast, ReselectingCache)
    check_same(fast, ref)
    for i in range(L0, L0 + steps):
        new = [t[:, :, i : i + 1] for t in (q, k, v)]
        expected = tca.decode(*new, ref)
        got = tca.decode(*new, fast, backend="torch")
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
        check_same(fast, ref)
    return fast, ref


def check_same(fast: ReselectingCache, ref: ReselectingReferenceCache):
    assert torch.equal(fast.lengths, ref.lengths)
    assert torch.equal(fast.evicted_lengths, ref.evicted_lengths)
    for b in range(ref.batch_size):
        for h in range(ref.num_kv_heads):
            assert fast.positions_of(b, h).tolist() == ref.active.positions[b][h].tolist()
            torch.testing.assert_close(fast.active.keys_of(b, h), ref.active.keys[b][h], atol=0, rtol=0)
            torch.testing.assert_close(fast.active.values_of(b, h), ref.active.values[b][h], atol=0, rtol=0)
            assert fast.evicted_positions_of(b, h).tolist() == ref.evicted_positions[b][h].tolist()


@pytest.mark.parametrize("every", [1, 4, 16])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("L0,steps,b,w,heads", [(50, 60, 16, 32, (4, 2)), (100, 40, 32, 64, (3, 1)), (20, 50, 16, 32, (2, 2))])
def test_torch_cache_equals_reference(every, offload, L0, steps, b, w, heads):
    fast, _ = decode_both(L0, steps, b, w, heads, every, offload, seed=L0 + every)
    assert fast.steps == steps and int(fast.evicted_lengths.sum()) > 0
    assert fast.offloaded_nbytes == (fast.evicted_nbytes if offload else 0)
    assert fast.device_nbytes + fast.offloaded_nbytes == fast.nbytes


@pytest.mark.parametrize("blocks", [1, 2, 5])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("L0,steps,b,w,heads", [(120, 60, 16, 32, (4, 2)), (200, 40, 32, 64, (3, 1))])
def test_candidate_blocks_equal_the_reference(blocks, offload, L0, steps, b, w, heads):
    """Section 5c with blocks=M: the same chosen blocks, active sets and stores as the oracle, step by step."""
    fast, _ = decode_both(L0, steps, b, w, heads, 1, offload, seed=L0 + blocks, blocks=blocks)
    assert fast.blocks == blocks and int(fast.evicted_lengths.sum()) > 0


def test_dense_budgets_store_nothing_and_equal_the_plain_cache():
    b, HKV = 16, 2
    fast, _ = decode_both(50, 40, b, 32, (4, HKV), 1, False, seed=2, budgets=tca.dense_budgets(b).expand(HKV, -1))
    assert int(fast.evicted_lengths.sum()) == 0


def test_every_zero_gives_the_plain_cache():
    q, k, v = make_qkv(1, 2, 1, 40, 8)
    config = tca.TCAConfig(block_size=16, window=16)
    _, cache = tca.prefill(q, k, v, config=config, backend="torch", policy=tca.Reselect(every=0))
    assert type(cache).__name__ == "PackedKVCache"


@pytest.mark.parametrize("blocks", [None, 2])
def test_joined_batch_decodes_like_each_sequence_alone(blocks):
    """Prompts of different lengths prefilled one by one and joined (what a padded TCACache batch does)."""
    b, w, steps = 16, 32, 40
    config = tca.TCAConfig(block_size=b, window=w)
    budgets = random_budgets(2, b, seed=5)
    policy = tca.Reselect(every=3, blocks=blocks)
    lengths = (45, 110)
    inputs = [make_qkv(1, 4, 2, L + steps, 16, seed=L) for L in lengths]
    alone, parts = [], []
    for (q, k, v), L in zip(inputs, lengths, strict=True):
        prompt = [t[:, :, :L] for t in (q, k, v)]
        alone.append(tca.prefill(*prompt, budgets=budgets, config=config, backend="torch", policy=policy)[1])
        parts.append(tca.prefill(*prompt, budgets=budgets, config=config, backend="torch", policy=policy)[1])
    joined = ReselectingCache.concat(parts)
    for s in range(steps):
        new = [torch.cat([x[i][:, :, L + s : L + s + 1] for i, L in enumerate(lengths)]) for x in zip(*inputs, strict=True)]
        out = tca.decode(*new, joined, backend="torch")
        for r, cache in enumerate(alone):
            one = tca.decode(*(t[r : r + 1] for t in new), cache, backend="torch")
            torch.testing.assert_close(out[r : r + 1], one, atol=1e-12, rtol=1e-12)
    for r, cache in enumerate(alone):
        for h in range(2):
            assert joined.positions_of(r, h).tolist() == cache.positions_of(0, h).tolist()


def test_policy_errors():
    with pytest.raises(ValueError, match="every must be >= 0"):
        tca.Reselect(every=-1)
    with pytest.raises(TypeError, match="every must be an int"):
        tca.Reselect(every=1.5)
    with pytest.raises(TypeError, match="offload must be a bool"):
        tca.Reselect(every=1, offload="yes")
    with pytest.raises(ValueError, match="blocks must be >= 1"):
        tca.Reselect(every=1, blocks=0)
    with pytest.raises(TypeError, match="blocks must be None or an int"):
        tca.Reselect(every=1, blocks=2.0)
    q, k, v = make_qkv(1, 2, 1, 40, 8)
    with pytest.raises(TypeError, match="policy must be None"):
        tca.prefill(q, k, v, policy="reselect")
    for backend in ("torch", "reference"):
        _, cache = tca.prefill(q, k, v, config=tca.TCAConfig(16, 16), backend=backend, policy=tca.Reselect(every=2))
        with pytest.raises(ValueError, match="cannot continue a streaming prefill"):
            tca.start_prefill(mode="streaming", cache=cache)

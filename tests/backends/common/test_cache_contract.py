"""The cache contract (tca.backends.common.cache_protocol): every cache class meets KVCache, its shape members agree
with its tensors, and each capability is held by exactly the classes that implement it.

Shape letters: B batch, HQ query heads, HKV KV heads, L prompt length, D head dim.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import tca
from helpers import make_qkv, random_budgets
from tca.backends.common import dense_cache
from tca.backends.common.cache_protocol import (
    GraphCapturable,
    Joinable,
    KVCache,
    Packable,
    Reselecting,
    StepDecoding,
)
from tca.backends.common.dense_cache import DenseKVCache
from tca.backends.common.packed_cache import PackedKVCache
from tca.backends.common.reselecting_cache import ReselectingCache
from tca.reference.cache import ReferenceKVCache
from tca.reference.reselect import ReselectingReferenceCache

B, HQ, HKV, L, D = 2, 4, 2, 80, 16
CONFIG = tca.TCAConfig(block_size=16, window=32)


def make(kind: str):
    """A cache of the given kind after a prefill of L tokens, and the prompt's k."""
    q, k, v = make_qkv(B, HQ, HKV, L + 1, D, seed=3)
    q, k, v = (t[:, :, :L] for t in (q, k, v))
    budgets = random_budgets(HKV, CONFIG.block_size, seed=3)
    if kind == "dense":
        return dense_cache.prefill(q, k, v, CONFIG, D**-0.5)[1], k
    backend, policy = {
        "packed": ("torch", None),
        "reselecting": ("torch", tca.Reselect(every=2)),
        "reference": ("reference", None),
        "reselecting-reference": ("reference", tca.Reselect(every=2)),
    }[kind]
    return tca.prefill(q, k, v, budgets=budgets, config=CONFIG, backend=backend, policy=policy)[1], k


KINDS = {
    "packed": PackedKVCache,
    "dense": DenseKVCache,
    "reselecting": ReselectingCache,
    "reference": ReferenceKVCache,
    "reselecting-reference": ReselectingReferenceCache,
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_cache_meets_the_contract_and_its_shapes_agree_with_its_tensors(kind):
    cache, k = make(kind)
    assert type(cache) is KINDS[kind]
    assert isinstance(cache, KVCache)
    assert (cache.batch_size, cache.num_kv_heads, cache.head_dim) == tuple(k.shape[i] for i in (0, 1, 3))
    assert cache.num_query_heads == HQ
    assert (cache.dtype, cache.device) == (k.dtype, k.device)
    assert cache.seq_len == L and list(cache.seq_lens) == [L] * B
    assert cache.lengths.shape == (B, HKV) and cache.lengths.dtype == torch.int64
    assert bool((cache.lengths > 0).all()) and bool((cache.lengths <= L).all())
    assert 0 < cache.used_nbytes <= cache.nbytes
    assert cache.offloaded_nbytes == 0
    assert cache.config == CONFIG and cache.scale == pytest.approx(D**-0.5)
    assert cache.budgets is None  # a one-shot prefill records none
    assert cache.backend == ("reference" if "reference" in kind else None)
    # One decode step moves every length on by one.
    q1, k1, v1 = (t[:, :, L:] for t in make_qkv(B, HQ, HKV, L + 1, D, seed=3))
    tca.decode(q1, k1, v1, cache)
    assert cache.seq_len == L + 1 and list(cache.seq_lens) == [L + 1] * B


@pytest.mark.parametrize("kind", KINDS)
def test_every_member_of_the_contract_is_found_statically(kind):
    """Python 3.12's isinstance on a runtime protocol looks members up statically (no __getattr__): each member of
    every protocol a cache holds must be defined on its class or the instance."""
    cache = make(kind)[0]
    for protocol in (KVCache, StepDecoding, Joinable, GraphCapturable, Reselecting, Packable):
        if not isinstance(cache, protocol):
            continue
        members = {n for n in [*dir(protocol), *protocol.__annotations__] if not n.startswith("_")} - set(dir(object))
        for name in sorted(members):
            inspect.getattr_static(cache, name)  # raises AttributeError where only __getattr__ would answer


@pytest.mark.parametrize("kind", KINDS)
def test_record_sets_what_it_is_given_and_keeps_the_rest(kind):
    cache, _ = make(kind)
    budgets = random_budgets(HKV, CONFIG.block_size, seed=5)
    cache.record(budgets=budgets)
    assert cache.num_query_heads == HQ and torch.equal(cache.budgets, budgets)
    cache.record(num_query_heads=HKV)
    assert cache.num_query_heads == HKV and torch.equal(cache.budgets, budgets)


def test_each_capability_is_held_by_the_classes_that_implement_it():
    caches = {kind: make(kind)[0] for kind in KINDS}

    def holding(capability):
        return {kind for kind, cache in caches.items() if isinstance(cache, capability)}

    assert holding(StepDecoding) == {"packed", "dense", "reselecting"}  # the oracle decodes with its own functions
    assert holding(Joinable) == {"packed", "dense", "reselecting"}
    assert holding(GraphCapturable) == {"packed"}
    assert holding(Reselecting) == {"reselecting", "reselecting-reference"}
    assert holding(Packable) == {"dense"}


def test_decode_takes_any_cache_of_the_contract_and_refuses_anything_else():
    q, k, v = (t[:, :, L:] for t in make_qkv(B, HQ, HKV, L + 1, D, seed=3))
    with pytest.raises(TypeError, match="cache must be a cache returned by tca.prefill, got dict"):
        tca.decode(q, k, v, {"seq_len": L})
    with pytest.raises(TypeError, match="cache must be a cache made by tca.prefill or tca.finish_prefill, got dict"):
        tca.start_prefill(mode="streaming", cache={"seq_len": L})


def test_the_packed_cache_gives_back_its_host_mirror():
    cache, _ = make("packed")
    saved = cache.host_state()
    lengths = cache.lengths.clone()
    q1, k1, v1 = (t[:, :, L:] for t in make_qkv(B, HQ, HKV, L + 1, D, seed=3))
    tca.decode(q1, k1, v1, cache)
    assert cache.seq_lens != saved[0]
    cache.restore_host_state(saved)
    assert cache.seq_lens == [L] * B and torch.equal(cache.lengths, lengths)

"""Graph decoding takes exactly the caches with the CUDA-graph capability (cache_protocol.GraphCapturable), and the
dense path's cache as its packed copy; any other cache is refused before anything is captured or changed.

Shape letters: B batch, HQ query heads, HKV KV heads, L prompt length, D head dim.
"""

from __future__ import annotations

import pytest

import tca
from helpers import make_qkv

pytest.importorskip("transformers")
from tca.backends.common import dense_cache  # noqa: E402
from tca.backends.common.cache_protocol import GraphCapturable  # noqa: E402
from tca.models import TCACache  # noqa: E402
from tca.models.graphs import prepare_static  # noqa: E402

CONFIG = tca.TCAConfig(block_size=16, window=32)


def filled(kind: str) -> TCACache:
    """A one-layer TCACache whose layer holds a cache of `kind` after a prefill of 80 tokens."""
    q, k, v = make_qkv(1, 2, 1, 80, 16, seed=1)
    if kind == "dense":
        state = dense_cache.prefill(q, k, v, CONFIG, 0.25)[1]
    else:
        backend, policy = {"packed": ("torch", None), "reselecting": ("torch", tca.Reselect(every=2)),
                           "reference": ("reference", None),
                           "reselecting-reference": ("reference", tca.Reselect(every=2))}[kind]
        state = tca.prefill(q, k, v, config=CONFIG, backend=backend, policy=policy)[1]
    cache = TCACache(num_layers=1)
    cache.layers[0].state = state
    return cache


@pytest.mark.parametrize("kind", ["packed", "dense"])
def test_a_capturable_cache_is_prepared_for_capture(kind):
    cache = filled(kind)
    prepare_static(cache, 8)
    state = cache.layers[0].state
    assert isinstance(state, GraphCapturable) and state.static
    assert state.seq_len == 80


@pytest.mark.parametrize(
    "kind, name",
    [("reselecting", "ReselectingCache"), ("reference", "ReferenceKVCache"),
     ("reselecting-reference", "ReselectingReferenceCache")],
)
def test_a_cache_without_the_capability_is_refused_before_capture(kind, name):
    cache = filled(kind)
    state = cache.layers[0].state
    assert not isinstance(state, GraphCapturable)
    with pytest.raises(ValueError, match=f"layer 0 holds a {name}, which cannot be captured; call generate without"):
        prepare_static(cache, 8)
    assert cache.layers[0].state is state and state.seq_len == 80

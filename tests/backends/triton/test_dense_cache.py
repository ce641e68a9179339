"""The dense path's cache decoded by the Triton split-K kernel (one flat buffer, every (b, h) one segment, no
local window): equal to exact attention, also for a right-aligned padded batch and across capacity growth."""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import dense_causal, force_crossover, make_qkv, require_triton
from tca.backends.common.dense_cache import DenseKVCache

pytestmark = pytest.mark.triton
DEVICE = require_triton()
CONFIG = tca.TCAConfig(block_size=16, window=32)


@pytest.fixture(autouse=True)
def dense_below_1000(monkeypatch):
    force_crossover(monkeypatch, 1000)


def _exact_last(q, k, v, n):
    return dense_causal(q[:, :, :n].float(), k[:, :, :n].float(), v[:, :, :n].float(), 0.125)[:, :, -1:]


@pytest.mark.parametrize("lengths", [(70, 70), (100, 41)])
def test_triton_decodes_the_dense_cache_exactly(lengths):
    new = 2 * CONFIG.block_size + 3  # the capacity grows twice
    qkvs = [make_qkv(1, 6, 2, L + new, 64, dtype=torch.float32, device=DEVICE, seed=L + i) for i, L in enumerate(lengths)]
    if lengths[0] == lengths[1]:  # one prefill of the batch
        L = lengths[0]
        q, k, v = (torch.cat([t[i] for t in qkvs]) for i in range(3))
        cache = tca.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], config=CONFIG)[1]
    else:  # each sequence alone, joined right-aligned (a left-padded batch)
        cache = DenseKVCache.concat([tca.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], config=CONFIG)[1]
                                     for (q, k, v), L in zip(qkvs, lengths, strict=True)])
    assert isinstance(cache, DenseKVCache)
    for step in range(new):
        q, k, v = (torch.cat([t[i][:, :, L + step : L + step + 1] for t, L in zip(qkvs, lengths, strict=True)])
                   for i in range(3))
        out = tca.decode(q, k, v, cache, backend="triton")
        for b, (t, L) in enumerate(zip(qkvs, lengths, strict=True)):
            torch.testing.assert_close(out[b : b + 1].float(), _exact_last(*t, L + step + 1), atol=2e-5, rtol=2e-5)
    assert cache.seq_lens == [L + new for L in lengths]

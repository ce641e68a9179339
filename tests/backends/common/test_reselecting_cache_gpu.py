"""The ReselectingCache on a GPU (semantics.md section 5c): on the device and offloaded to pinned host memory,
against the reference on the CPU, in float64 (so top-k near-ties break alike). Marked `gpu`; skips without CUDA.

Shape letters: B batch, HQ query heads, HKV KV heads, L prompt length, D head dim, b, w.
"""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import make_qkv, random_budgets

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.mark.parametrize("blocks", [None, 3])
@pytest.mark.parametrize("offload", [False, True])
def test_gpu_cache_equals_reference(offload, blocks):
    L0, steps, b, w, HQ, HKV, D = 300, 200, 32, 128, 8, 2, 64
    q, k, v = make_qkv(2, HQ, HKV, L0 + steps, D, seed=1)
    config = tca.TCAConfig(block_size=b, window=w)
    budgets = random_budgets(HKV, b, seed=2)
    policy = tca.Reselect(every=8 if blocks is None else 1, offload=offload, blocks=blocks)
    prompt = [t[:, :, :L0] for t in (q, k, v)]
    _, ref = tca.prefill(*prompt, budgets=budgets, config=config, backend="reference", policy=policy)
    _, fast = tca.prefill(*(t.cuda() for t in prompt), budgets=budgets, config=config, backend="torch", policy=policy)
    assert fast.evicted_k.is_cuda != offload and (not offload or fast.evicted_k.is_pinned())
    for i in range(L0, L0 + steps):
        new = [t[:, :, i : i + 1] for t in (q, k, v)]
        expected = tca.decode(*new, ref)
        got = tca.decode(*(t.cuda() for t in new), fast, backend="torch")
        torch.testing.assert_close(got.cpu(), expected, atol=1e-10, rtol=1e-10)
    for bi in range(2):
        for h in range(HKV):
            assert fast.positions_of(bi, h).tolist() == ref.active.positions[bi][h].tolist()
    assert fast.offloaded_nbytes == (fast.evicted_nbytes if offload else 0)

"""Layer 4: the triton backend end to end (selection + attention, prefill + decode) against the reference.

Sequence lengths that do and do not divide b, L <= w and L > w, GQA and MHA; decode sequences against the
reference's stateful decode. CPU interpreter: float32, D=64, b=16/32, w=64..128, L <= ~300.
Shape letters: B, HQ, HKV, L, D, b block size, w window.
"""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import make_qkv, require_triton
from tca import reference
from tca.budgets import default_budgets
from tca.config import TCAConfig
from tca.testing import assert_close, selection_difference

pytestmark = pytest.mark.triton
DEVICE = require_triton()
CUDA = DEVICE == "cuda"
from tca.backends.triton import ops  # noqa: E402

CASES = [
    # B, HQ, HKV, L, D, b, w
    (1, 4, 2, 300, 64, 32, 64),  # GQA, L % b != 0, L > w
    (1, 2, 2, 256, 64, 32, 128),  # MHA, L % b == 0
    (2, 4, 1, 50, 64, 16, 64),  # L <= w: exact dense causal
    (1, 3, 1, 129, 64, 16, 64),  # G = 3, L = 8b + 1
    (1, 4, 2, 150, 32, 16, 64),  # head dim 32
    (1, 2, 1, 100, 16, 16, 32),  # head dim 16
]
if CUDA:
    CASES += [(1, 32, 8, 2500, 128, 128, 1024), (1, 9, 3, 1100, 64, 64, 256)]


def make(B, HQ, HKV, L, D, seed):
    return make_qkv(B, HQ, HKV, L, D, dtype=torch.float32, seed=seed, device=DEVICE)


@pytest.mark.parametrize("B,HQ,HKV,L,D,b,w", CASES)
def test_attention_end_to_end(B, HQ, HKV, L, D, b, w):
    config = TCAConfig(block_size=b, window=w)
    q, k, v = make(B, HQ, HKV, L, D, seed=L)
    p = default_budgets(b).to(DEVICE).expand(HKV, -1).contiguous()
    mine = ops.TritonBackend.select(q, k, p, config, D**-0.5)
    ref_sel = reference.select(q, k, p, config, D**-0.5)
    assert torch.equal(mine.mask, ref_sel.mask), selection_difference(mine, ref_sel)
    out, lse = tca.attention(q, k, v, config=config, backend="triton", return_lse=True)
    ref, ref_lse = reference.attend(q.double(), k.double(), v.double(), ref_sel, D**-0.5, return_lse=True)
    assert not torch.isnan(out).any()
    assert_close(out, ref, torch.float32)
    assert_close(lse, ref_lse, torch.float32, lse=True)


@pytest.mark.parametrize("B,HQ,HKV,L,D,b,w", CASES[:4])
def test_prefill_then_decode_matches_reference(B, HQ, HKV, L, D, b, w):
    """Decode 2 blocks + 3 tokens past the prompt: crosses window moves (compression) for L > w - 2b."""
    config = TCAConfig(block_size=b, window=w)
    steps = 2 * b + 3
    q, k, v = make(B, HQ, HKV, L + steps, D, seed=L + 1)
    out, cache = tca.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], config=config, backend="triton")
    ref_out, ref_cache = tca.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], config=config, backend="reference")
    from tca.backends.triton.ops import CacheKernels

    assert cache.kernels is CacheKernels  # decode runs on the Triton kernels (the fastest decode here)
    assert_close(out, ref_out, torch.float32)
    for i in range(L, L + steps):
        sl = slice(i, i + 1)
        got = tca.decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], cache, backend="triton")
        want = tca.decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], ref_cache)
        assert_close(got, want, torch.float32, msg=f"step {i}")
    for bi in range(B):
        for h in range(HKV):
            assert cache.positions_of(bi, h).tolist() == ref_cache.positions[bi][h].tolist()


def test_registry_reports_triton():
    row = next(r for r in tca.backends.registry.report() if r["name"] == "triton")
    assert row["usable"], row["reasons"]
    assert row["priority"] == 30

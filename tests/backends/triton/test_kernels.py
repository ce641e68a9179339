"""Layer 2: each Triton kernel against the reference given the SAME selection (no top-k in the comparison).

Runs on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1 (float32 and small shapes there).
Shape letters: B, HQ, HKV, L, LQ, D, b block size, w window.
"""

from __future__ import annotations

import pytest
import torch

from helpers import make_qkv, require_triton
from tca import reference
from tca.config import TCAConfig
from tca.selection import Selection
from tca.testing import assert_close

pytestmark = pytest.mark.triton
DEVICE = require_triton()
CUDA = DEVICE == "cuda"
from tca.backends.common import selection_triton  # noqa: E402
from tca.backends.triton import ops  # noqa: E402


def make(B, HQ, HKV, L, D, LQ=None, dtype=torch.float32, seed=0):
    return make_qkv(B, HQ, HKV, L, D, LQ=LQ, dtype=dtype, seed=seed, device=DEVICE)


def random_selection(B, HKV, L, b, w, seed=0) -> Selection:
    """A random selection (each budgeted block keeps a random number of random tokens, maybe none)."""
    gen = torch.Generator().manual_seed(seed)
    J = max(0, (L - 1) // b + 1 - w // b)
    mask = torch.rand(B, HKV, J * b, generator=gen) < torch.rand(B, HKV, J, generator=gen).repeat_interleave(b, -1)
    return Selection(mask.to(DEVICE), mask.view(B, HKV, J, b).sum(-1).to(DEVICE), b, w, L)


@pytest.mark.parametrize(
    "B,HQ,HKV,L,LQ,D,b,w",
    [
        (1, 4, 2, 300, 300, 64, 32, 64),  # GQA, L not a multiple of b
        (2, 2, 2, 256, 256, 64, 32, 96),  # MHA, L a multiple of b
        (1, 3, 1, 200, 200, 64, 16, 64),  # G = 3 (padded rows)
        (1, 4, 2, 60, 60, 64, 16, 64),  # L <= w: dense causal
        (1, 4, 2, 300, 37, 64, 32, 64),  # LQ < L, bottom-right
        (1, 4, 2, 300, 1, 64, 32, 64),  # one query row
    ],
)
def test_sparse_attention_matches_reference_given_selection(B, HQ, HKV, L, LQ, D, b, w):
    q, k, v = make(B, HQ, HKV, L, D, LQ, seed=L + LQ)
    selection = random_selection(B, HKV, L, b, w, seed=L)
    out, lse = ops.TritonBackend.attend(q, k, v, selection, D**-0.5, return_lse=True)
    ref, ref_lse = reference.attend(q.double(), k.double(), v.double(), selection, D**-0.5, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close(out, ref, torch.float32, msg="out")
    assert_close(lse, ref_lse, torch.float32, lse=True, msg="lse")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="low precision needs a CUDA GPU (bf16 is wrong in the interpreter)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("HQ,HKV,D", [(32, 8, 128), (9, 3, 64), (4, 4, 128)])
def test_sparse_attention_low_precision_gpu(dtype, HQ, HKV, D):
    L, b, w = 3000, 128, 1024
    q, k, v = make(1, HQ, HKV, L, D, dtype=dtype, seed=HQ)
    selection = random_selection(1, HKV, L, b, w, seed=D)
    out, lse = ops.TritonBackend.attend(q, k, v, selection, D**-0.5, return_lse=True)
    ref, ref_lse = reference.attend(q.double(), k.double(), v.double(), selection, D**-0.5, return_lse=True)
    assert not torch.isnan(out).any()
    # flash-attention's rule: at most 2x the error of the reference computed from the same low-precision
    # inputs with its output rounded to the same dtype, plus the table's tolerance
    plain = reference.attend(q, k, v, selection, D**-0.5)
    bound = 2 * (plain.double() - ref).abs().max() + 1e-3
    assert (out.double() - ref).abs().max() <= bound
    assert_close(lse, ref_lse.float(), dtype, lse=True, msg="lse")


def test_importance_logits_match_reference():
    q, k, _ = make(2, 6, 2, 333, 64, seed=3)
    scale = 64**-0.5
    logits, row_max, row_sum = selection_triton.last_query_importance_logits(q[:, :, -1], k, scale)
    s = (torch.exp2(logits - row_max[..., None]) / row_sum[..., None]).mean(2)
    ref = reference.selection.last_query_importance(q[:, :, -1].double(), k.double(), scale)
    assert not torch.isnan(s).any()
    torch.testing.assert_close(s.double(), ref, atol=1e-6, rtol=1e-5)


def _built_cache(B, HQ, HKV, L, D, config, density, keep, seed):
    from tca.backends.common.packed_cache import PackedKVCache

    q, k, v = make(B, HQ, HKV, L + 1, D, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    J = max(0, (L - 1) // config.block_size + 1 - config.window // config.block_size)
    mask = torch.rand(B, HKV, J * config.block_size, generator=gen) < density
    counts = mask.sum(-1)
    indices = torch.where(mask, torch.arange(J * config.block_size), J * config.block_size).sort(-1).values
    cache = PackedKVCache.from_indices(k[:, :, :L], v[:, :, :L], indices.to(DEVICE), counts.to(DEVICE),
                                       torch.tensor(keep), config, D**-0.5, kernels=ops.CacheKernels)
    return q, k, v, cache


def test_decode_attention_over_built_cache():
    """Split-K decode kernel vs a direct fp64 softmax over the cache's own tokens (cache built by hand)."""
    B, HQ, HKV, L, D = 2, 4, 2, 260, 64
    q, k, v, cache = _built_cache(B, HQ, HKV, L, D, TCAConfig(block_size=32, window=64), 0.3, [4, 4], seed=9)
    cache.append(k[:, :, L:], v[:, :, L:])
    out = cache.attend(q[:, :, L:])
    assert not torch.isnan(out).any()
    for bi in range(B):
        for h in range(HKV):
            kk, vv = cache.keys_of(bi, h).double(), cache.values_of(bi, h).double()
            qq = q[bi, 2 * h : 2 * h + 2, L].double()
            ref = torch.softmax(qq @ kk.T * D**-0.5, -1) @ vv
            assert_close(out[bi, 2 * h : 2 * h + 2, 0], ref, torch.float32)


def test_decode_kernels_equal_the_torch_step_on_sequences_of_different_lengths():
    """compress + attend of the Triton kernels vs the torch step, over a batch joined from prompts of different
    lengths (each sequence at its own position; its window moves at its own steps)."""
    from tca.backends.common import decode_torch
    from tca.backends.common.packed_cache import PackedKVCache

    config = TCAConfig(block_size=16, window=64)
    parts = [_built_cache(1, 4, 2, L, 64, config, 0.4, [3, 5], seed=L) for L in (150, 97, 64)]
    triton_cache = PackedKVCache.concat([c for *_, c in parts])
    torch_parts = [_built_cache(1, 4, 2, L, 64, config, 0.4, [3, 5], seed=L)[3] for L in (150, 97, 64)]
    torch_cache = PackedKVCache.concat(torch_parts)
    torch_cache.kernels = decode_torch
    gen = torch.Generator().manual_seed(0)
    for step in range(40):
        q, k, v = (torch.randn(3, H, 1, 64, generator=gen).to(DEVICE) for H in (4, 2, 2))
        got = tca_decode_step(triton_cache, q, k, v)
        want = tca_decode_step(torch_cache, q, k, v)
        assert_close(got, want, torch.float32, msg=f"step {step}")
        for b in range(3):
            for h in range(2):
                assert triton_cache.positions_of(b, h).tolist() == torch_cache.positions_of(b, h).tolist()
        assert torch.equal(triton_cache.global_len.cpu(), triton_cache.global_len_host)


def tca_decode_step(cache, q, k, v):
    from tca.backends.common.cache_protocol import decode_on_cache

    return decode_on_cache(cache, q, k, v)


def test_compress_block_kernel_matches_reference_rule():
    """The leaving block's top-t by the current query's group-mean softmax, ties to the smaller position."""
    B, HQ, HKV, L, D, b, w = 1, 4, 2, 128, 64, 32, 128
    q, k, v, cache = _built_cache(B, HQ, HKV, L, D, TCAConfig(block_size=b, window=w), 0.0, [3, 7], seed=4)
    start = 0  # lo(127) = 0, lo(128) = 32: the block [0, 32) leaves when 128 arrives
    cache.compress_leaving(q[:, :, L:])
    for h in range(HKV):
        block = k[0, h, start : start + b].double()
        scores = torch.softmax(q[0, 2 * h : 2 * h + 2, L].double() @ block.T * D**-0.5, -1).mean(0)
        keep = [3, 7][h]
        want = (scores.sort(descending=True, stable=True).indices[:keep] + start).sort().values
        s = int(cache.global_start[0, h])
        got = cache.global_pos[s : s + int(cache.global_len[0, h])]
        assert got.tolist() == want.tolist()
        assert torch.equal(cache.global_k[s : s + keep], k[0, h, want])

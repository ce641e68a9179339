"""The flash backend on a real GPU with a real FlashAttention (FA4 on the project's H100), against the reference.

Layer 2: the same selection to the reference and to the flash calls (no top-k in the comparison).
Layer 4: end to end (selection included) and prefill + decode steps, across lengths that do and do not divide
the block size, w < L and w > L, GQA and MHA, head dims 64 and 128.
Skipped, with the registry's reasons, where the backend cannot run (no GPU, no FlashAttention package).
Shape letters: B, HQ, HKV, L, LQ, D, b block size, w window.
"""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import make_qkv
from tca import TCAConfig, reference
from tca.backends import registry
from tca.testing import assert_close, selection_difference

pytestmark = [pytest.mark.flash, pytest.mark.gpu]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
_REASONS = registry.get("flash").environment_reasons()
if _REASONS:
    pytest.skip("flash backend unavailable: " + "; ".join(_REASONS), allow_module_level=True)

from tca.backends.flash import chosen_generation  # noqa: E402
from tca.backends.flash.impl import FlashBackend  # noqa: E402

CONFIG = TCAConfig(block_size=64, window=256)


def make(B, HQ, HKV, L, D, LQ=None, dtype=torch.bfloat16, seed=0):
    return make_qkv(B, HQ, HKV, L, D, LQ=LQ, dtype=dtype, seed=seed, device="cuda")


def budgets_for(HKV, b, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(HKV, b.bit_length(), generator=gen, dtype=torch.float64) ** 2
    return (p / p.sum(-1, keepdim=True)).cuda()


def test_report_generation():
    """Which FlashAttention generation these tests exercise (printed with -s, and must be known)."""
    generation = chosen_generation()
    print(f"flash backend runs {generation}")
    assert generation in ("fa2", "fa3", "fa4")


@pytest.mark.parametrize(
    "B,HQ,HKV,L,LQ,D,dtype",
    [
        (1, 8, 2, 200, 200, 128, torch.bfloat16),  # L < w: exact dense causal
        (2, 8, 2, 1000, 1000, 128, torch.bfloat16),
        (1, 4, 4, 2113, 2113, 64, torch.bfloat16),  # MHA, L not a multiple of b
        (1, 8, 2, 2113, 77, 128, torch.bfloat16),  # LQ < L, first query block partial
        (1, 6, 2, 1500, 1, 128, torch.float16),  # one-shot decode row, fp16
    ],
)
def test_attend_given_the_same_selection(B, HQ, HKV, L, LQ, D, dtype):
    q, k, v = make(B, HQ, HKV, L, D, LQ=LQ, dtype=dtype, seed=L + LQ)
    scale = D**-0.5
    selection = reference.select(q.float(), k.float(), budgets_for(HKV, CONFIG.block_size, L), CONFIG, scale)
    out, lse = FlashBackend.attend(q, k, v, selection, scale, return_lse=True)
    ref_out, ref_lse = reference.attend(q.float(), k.float(), v.float(), selection, scale, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref_out, dtype=dtype, msg="out")
    assert_close(lse, ref_lse, dtype=dtype, lse=True, msg="lse")


@pytest.mark.parametrize("HQ,HKV,L,D", [(8, 2, 700, 128), (4, 4, 3001, 64), (8, 1, 6000, 128)])
def test_attention_end_to_end(HQ, HKV, L, D):
    q, k, v = make(1, HQ, HKV, L, D, seed=L)
    scale = D**-0.5
    budgets = budgets_for(HKV, CONFIG.block_size, L + 1)
    mine = FlashBackend.select(q, k, budgets, CONFIG, scale)
    ref_sel = reference.select(q, k, budgets, CONFIG, scale)
    assert torch.equal(mine.mask, ref_sel.mask), selection_difference(mine, ref_sel)
    out = tca.attention(q, k, v, budgets=budgets, config=CONFIG, backend="flash")
    ref = reference.attention(q.float(), k.float(), v.float(), budgets, CONFIG, scale)
    assert_close(out, ref, dtype=q.dtype, msg="attention")


@pytest.mark.parametrize("HQ,HKV,D", [(8, 2, 128), (4, 4, 64)])
def test_prefill_then_decode_steps(HQ, HKV, D):
    L, steps = 1100, 140  # crosses two block boundaries: the window moves and blocks are compressed twice
    q, k, v = make(1, HQ, HKV, L + steps, D, seed=D)
    scale = D**-0.5
    budgets = budgets_for(HKV, CONFIG.block_size, 5)
    p = slice(0, L)
    out, cache = tca.prefill(q[:, :, p], k[:, :, p], v[:, :, p], budgets=budgets, config=CONFIG, backend="flash")
    ref_out, ref_cache = reference.prefill(q[:, :, p], k[:, :, p], v[:, :, p], budgets, CONFIG, scale)
    assert_close(out, ref_out.to(out.dtype).float(), dtype=q.dtype, msg="prefill")
    for t in range(L, L + steps):
        s = slice(t, t + 1)
        got = tca.decode(q[:, :, s], k[:, :, s], v[:, :, s], cache)
        want = reference.decode(q[:, :, s], k[:, :, s], v[:, :, s], ref_cache)
        assert_close(got.float(), want.float(), dtype=q.dtype, msg=f"decode at position {t}")
    for h in range(HKV):
        assert cache.positions_of(0, h).tolist() == ref_cache.positions[0][h].tolist(), f"cache of KV head {h}"


def test_fp32_is_refused_with_a_reason():
    q, k, v = make(1, 2, 2, 64, 64, dtype=torch.float32)
    with pytest.raises(tca.BackendUnavailableError, match="dtype float32"):
        tca.attention(q, k, v, backend="flash")

"""The fused Triton LSE merge of the flash backend against the torch merge, on real softmax pieces.

Runs on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1 (float32 there).
Shape letters: T rows, H heads, N keys, D head dim.
"""

from __future__ import annotations

import pytest
import torch

from helpers import require_triton

pytestmark = pytest.mark.triton
DEVICE = require_triton()
CUDA = DEVICE == "cuda"
from tca.backends.flash import merge, merge_triton  # noqa: E402


def pieces(T, H, N, D, seed):
    """Two attention results over a random split of N keys (both parts non-empty), their LSEs as [H, T].T views
    (the layout FA returns), and the exact result over the union."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, H, N, generator=gen, dtype=torch.float64) * 3
    values = torch.randn(N, D, generator=gen, dtype=torch.float64)
    part = torch.rand(T, H, N, generator=gen) < 0.5
    part[..., 0], part[..., 1] = True, False

    def piece(sel):
        x = logits.masked_fill(~sel, float("-inf"))
        lse = x.logsumexp(-1).float().T.contiguous().T  # [T, H] with strides (1, T), as FA's [H, T] transposed
        return (x.softmax(-1) @ values).float().to(DEVICE), lse.to(DEVICE)

    return (*piece(part), *piece(~part)), (logits.softmax(-1) @ values, logits.logsumexp(-1))


@pytest.mark.parametrize("T,H,D", [(37, 1, 64), (10, 3, 96)])
def test_fused_merge_equals_the_union_and_the_torch_merge(T, H, D):
    (o1, l1, o2, l2), (exact_out, exact_lse) = pieces(T, H, 24, D, seed=T + D)
    has = torch.ones(T, dtype=torch.bool, device=DEVICE)
    out, lse = merge_triton.merge_two(o1, l1, o2, l2, has, torch.float32)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.cpu().double(), exact_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), exact_lse, atol=1e-5, rtol=1e-5)
    ref_out, ref_lse = merge.merge_two(o1, l1, o2, l2, has, torch.float32)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-6)


def test_fused_merge_ignores_an_empty_part_even_if_it_holds_nan():
    (o1, l1, _, _), _ = pieces(12, 2, 16, 64, seed=3)
    nan = torch.full_like(o1, float("nan"))
    has = torch.zeros(12, 2, dtype=torch.bool, device=DEVICE)
    has[::2, 0] = True  # some rows merge a NaN part that is *marked* present: those must be NaN, the rest not
    out, lse = merge_triton.merge_two(o1, l1, nan, torch.full_like(l1, float("nan")), has, torch.float32)
    absent = ~has
    assert not torch.isnan(out[absent]).any()
    torch.testing.assert_close(out[absent], o1[absent])
    torch.testing.assert_close(lse[absent], l1[absent])
    assert torch.isnan(out[has]).all()

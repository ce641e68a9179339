"""The layout guard (docs/semantics.md section 9): [B, L, H, D] tensors passed without layout= are refused when
the head axis is implausibly long, with both fixes named; naming the layout always goes through.

Shape letters: B batch, H heads, L keys, D head dim.
"""

from __future__ import annotations

import pytest
import torch

import tca

CONFIG = tca.TCAConfig(block_size=16, window=32)


def bshd(L: int, H: int = 2, D: int = 16):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, L, H, D, generator=gen) for _ in range(3))


@pytest.mark.parametrize("call", ["attention", "prefill"])
def test_bshd_tensors_without_layout_are_refused_with_the_fix(call):
    q, k, v = bshd(L=300)
    with pytest.raises(ValueError, match=r"300 entries on the head axis.*layout='bshd'.*layout='bhsd'"):
        getattr(tca, call)(q, k, v, config=CONFIG, backend="torch")


def test_named_layouts_go_through():
    q, k, v = bshd(L=300)
    out = tca.attention(q, k, v, config=CONFIG, layout="bshd", backend="torch")
    want = tca.attention(*(t.transpose(1, 2) for t in (q, k, v)), config=CONFIG, backend="torch")
    torch.testing.assert_close(out, want.transpose(1, 2))
    # a caller who really has 300 heads of 2 tokens says so, and the call runs
    many_heads = tca.attention(q, k, v, config=CONFIG, layout="bhsd", backend="torch")
    assert many_heads.shape == q.shape


def test_sdpa_layout_calls_are_untouched():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 32, 300, 16, generator=gen)  # 32 query heads, 300 tokens, GQA
    k, v = torch.randn(1, 8, 300, 16, generator=gen), torch.randn(1, 8, 300, 16, generator=gen)
    out = tca.attention(q, k, v, config=CONFIG, backend="torch")
    assert out.shape == q.shape
    short = tca.attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], config=CONFIG, backend="torch")  # heads > tokens
    assert short.shape == (1, 32, 4, 16)

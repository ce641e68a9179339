"""The compressed KV cache and stateful decoding (semantics.md section 5), checked step by step.

After a prefill of L tokens the cache of KV head g holds Sel_g U [J*b, L). Each decode step at position i
appends the token; when lo(i) > lo(i-1) the block [lo(i-1), lo(i)) is compressed to its t = max(1,
floor(E[p_g])) most important positions (mean over the group of the softmax over the block of the current
query's logits, ties to the smaller position); then the step attends over everything cached.

Shape letters: B batch, HQ query heads, HKV KV heads, G = HQ / HKV, L prompt length, D head dim, b, w.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tca
from helpers import make_qkv, random_budgets
from tca import reference


def lo(i, b, w):
    return max(0, (i // b + 1) * b - w)


def expected_keep(p: torch.Tensor) -> int:
    """t = max(1, floor(E[p])), E[p] = sum_k k p[k] with K = 1, 2, 4, ..."""
    return max(1, math.floor(sum(2**x * float(p[x]) for x in range(len(p)))))


def compress(positions, q_i, k_seq, start, end, t, scale):
    """The spec's step 2 for one KV head: keep the t best of [start, end) by the group's mean block softmax."""
    block = [j for j in positions if start <= j < end]
    logits = torch.stack([scale * (k_seq[block] @ qh) for qh in q_i])  # [G, n]
    importance = logits.softmax(-1).mean(0).tolist()
    best = sorted(range(len(block)), key=lambda n: (-importance[n], n))[:t]
    keep = {block[n] for n in best}
    return [j for j in positions if not (start <= j < end) or j in keep]


def run_decode(HQ, HKV, L0, steps, b, w, budgets, seed, B=2, D=16):
    """Prefill L0 tokens, decode `steps` more; check the cache after each step against a Python simulation."""
    G = HQ // HKV
    q, k, v = make_qkv(B, HQ, HKV, L0 + steps, D, seed=seed)
    config = tca.TCAConfig(block_size=b, window=w)
    scale = D**-0.5
    out, cache = tca.prefill(q[:, :, :L0], k[:, :, :L0], v[:, :, :L0], budgets=budgets, config=config,
                             backend="reference")
    assert not torch.isnan(out).any()
    selection = reference.select(q[:, :, :L0], k[:, :, :L0], budgets, config, scale)
    J = selection.num_blocks
    # Prefill: exactly Sel_g U [J*b, L0), ascending (global part, then local part).
    expected = [
        [selection.mask[bi, g].nonzero().squeeze(-1).tolist() + list(range(J * b, L0)) for g in range(HKV)]
        for bi in range(B)
    ]
    keep = [expected_keep(budgets[g]) for g in range(HKV)]
    check_cache(cache, expected, k, v)
    assert cache.lengths.tolist() == [[int(selection.mask[bi, g].sum()) + L0 - J * b for g in range(HKV)]
                                      for bi in range(B)]
    compressed = 0
    outputs = []
    for i in range(L0, L0 + steps):
        step = tca.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache)
        assert step.shape == (B, HQ, 1, D) and not torch.isnan(step).any()
        moved = lo(i, b, w) > lo(i - 1, b, w)
        compressed += moved
        for bi in range(B):
            for g in range(HKV):
                positions = expected[bi][g] + [i]
                if moved:
                    q_i = q[bi, g * G : (g + 1) * G, i]
                    positions = compress(positions, q_i, k[bi, g], lo(i - 1, b, w), lo(i, b, w), keep[g], scale)
                expected[bi][g] = positions
                # Step 3: one softmax over everything cached for g.
                kept = torch.tensor(positions)
                for h in range(g * G, (g + 1) * G):
                    weights = (scale * (k[bi, g, kept] @ q[bi, h, i])).softmax(0)
                    torch.testing.assert_close(step[bi, h, 0], weights @ v[bi, g, kept], atol=1e-12, rtol=1e-12)
                # Sizes: the prefill size, plus one per step, minus what each compressed block dropped.
                size = int(selection.mask[bi, g].sum()) + (L0 - J * b) + (i + 1 - L0) - compressed * (b - keep[g])
                assert cache.lengths[bi, g] == size
        check_cache(cache, expected, k, v)
        assert cache.seq_len == i + 1
        outputs.append(step)
    return torch.cat(outputs, dim=2), q, k, v, cache, compressed


def check_cache(cache, expected, k, v):
    for bi, row in enumerate(expected):
        for g, positions in enumerate(row):
            assert cache.positions[bi][g].tolist() == positions
            assert torch.equal(cache.keys[bi][g], k[bi, g, positions])
            assert torch.equal(cache.values[bi][g], v[bi, g, positions])
    D, itemsize = k.shape[-1], k.element_size()
    assert cache.nbytes == 2 * sum(len(p) for row in expected for p in row) * D * itemsize


@pytest.mark.parametrize(
    "L0,steps,b,w",
    [
        (20, 60, 16, 32),  # L <= w at prefill: nothing compressed until the window first moves (at 32)
        (32, 40, 16, 32),  # L == w: the very first decode step moves the window
        (50, 50, 16, 32),  # L > w at prefill (J = 2), boundaries at 64, 80, 96
        (70, 70, 32, 64),
    ],
)
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
def test_dense_budgets_decode_equals_dense_attention(L0, steps, b, w, heads):
    HQ, HKV = heads
    budgets = tca.dense_budgets(b)
    out, q, k, v, cache, compressed = run_decode(HQ, HKV, L0, steps, b, w, budgets.expand(HKV, -1), seed=L0)
    assert compressed >= 2, "the test must cross several block boundaries"
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[:, :, L0:]
    torch.testing.assert_close(out, dense, atol=1e-12, rtol=1e-12)
    assert cache.lengths.tolist() == [[L0 + steps] * HKV] * 2  # the dense configuration keeps everything


@pytest.mark.parametrize(
    "L0,steps,b,w",
    [(20, 60, 16, 32), (50, 50, 16, 32), (100, 45, 16, 48), (70, 70, 32, 64)],
)
@pytest.mark.parametrize("heads", [(4, 2), (3, 1)])
def test_sparse_budgets_cache_follows_section_5(L0, steps, b, w, heads):
    HQ, HKV = heads
    budgets = random_budgets(HKV, b, seed=L0 + steps)
    _, _, _, _, _, compressed = run_decode(HQ, HKV, L0, steps, b, w, budgets, seed=L0 + 1)
    assert compressed >= 2


def test_smallest_budgets_keep_one_token_per_leaving_block():
    """All mass on k = 1: E[p] = 1, each block that leaves the window shrinks to a single token."""
    p = torch.zeros(2, 5, dtype=torch.float64)
    p[:, 0] = 1
    _, _, _, _, cache, compressed = run_decode(4, 2, 40, 60, 16, 32, p, seed=9)
    # 40 prompt tokens: J = 1 block budgeted (1 token), [16, 40) local; 60 steps, `compressed` blocks of 16 -> 1.
    assert cache.lengths.tolist() == [[1 + 24 + 60 - compressed * 15] * 2] * 2


def test_decode_accepts_bshd_layout():
    q, k, v = make_qkv(1, 4, 2, 41, 16, seed=3)
    config = tca.TCAConfig(block_size=16, window=32)
    _, c1 = tca.prefill(q[:, :, :40], k[:, :, :40], v[:, :, :40], config=config, backend="reference")
    _, c2 = tca.prefill(q[:, :, :40].transpose(1, 2), k[:, :, :40].transpose(1, 2), v[:, :, :40].transpose(1, 2),
                        config=config, layout="bshd", backend="reference")
    a = tca.decode(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], c1)
    b = tca.decode(q[:, :, 40:].transpose(1, 2), k[:, :, 40:].transpose(1, 2), v[:, :, 40:].transpose(1, 2), c2,
                   layout="bshd")
    assert b.shape == (1, 1, 4, 16)
    torch.testing.assert_close(b.transpose(1, 2), a, atol=0, rtol=0)


def test_prefill_output_equals_stateless_attention():
    q, k, v = make_qkv(1, 4, 2, 90, 16, seed=4)
    config = tca.TCAConfig(block_size=16, window=32)
    budgets = random_budgets(2, 16, 4)
    out, _ = tca.prefill(q, k, v, budgets=budgets, config=config, backend="reference")
    torch.testing.assert_close(out, tca.attention(q, k, v, budgets=budgets, config=config, backend="reference"),
                               atol=0, rtol=0)

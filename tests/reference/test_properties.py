"""Property tests (hypothesis) of the reference over shapes, b, w, GQA and dtypes (float32/float64, CPU).

Bounded by the "tca-ci" profile of conftest.py (few examples, no deadline, derandomized).
Shape letters: B batch, HQ query heads, HKV KV heads, G group size, L keys, LQ queries, D head dim, J blocks.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import tca
from tca import reference
from tca.geometry import num_budgeted_blocks, window_start


@st.composite
def problems(draw):
    b = draw(st.sampled_from([16, 32]))
    w = b * draw(st.integers(1, 3))
    L = draw(st.integers(1, w + 5 * b))
    LQ = draw(st.integers(1, L))
    HKV = draw(st.integers(1, 2))
    G = draw(st.integers(1, 3))
    D = draw(st.sampled_from([4, 8]))
    B = draw(st.integers(1, 2))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    n = b.bit_length()
    # Budgets: random, sometimes with exact zeros (a retain count never used).
    p = torch.rand(HKV, n, generator=gen, dtype=torch.float64) * (torch.rand(HKV, n, generator=gen) > 0.3)
    p[:, -1] += 1e-3
    p = p / p.sum(-1, keepdim=True)
    sharp = draw(st.sampled_from([0.0, 1.0, 5.0]))  # zero queries: all ties
    q = sharp * torch.randn(B, HKV * G, LQ, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, HKV, L, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, HKV, L, D, generator=gen, dtype=torch.float64)
    config = tca.TCAConfig(
        block_size=b,
        window=w,
        alpha=draw(st.sampled_from([0.0, 0.5, 1.0])),
        mass_scale=draw(st.sampled_from(["mean", "none"])),
    )
    return q.to(dtype), k.to(dtype), v.to(dtype), p, config


@given(problems())
def test_output_is_finite_with_the_right_shape(problem):
    q, k, v, p, config = problem
    out, lse = tca.attention(q, k, v, budgets=p, config=config, backend="reference", return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3]
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@given(problems())
def test_selection_sizes_follow_the_budgets(problem):
    q, k, _, p, config = problem
    b, L = config.block_size, k.shape[2]
    J = num_budgeted_blocks(L, b, config.window)
    selection = reference.select(q, k, p, config, q.shape[-1] ** -0.5)
    assert selection.num_blocks == J
    counts = reference.budget_counts(p, J)  # [HKV, len(K)]
    K = torch.tensor(config.retain_counts)
    for h in range(k.shape[1]):
        psi = reference.psi(counts[h], b)
        assert len(psi) == J  # Psi has one budget per budgeted block
        assert int(counts[h].sum()) == J
        # Per head: |Sel| = sum_k k n_k, and the per-block budgets are a permutation of Psi.
        assert (selection.counts[:, h] == int((K * counts[h]).sum())).all()
        for batch in range(q.shape[0]):
            assert sorted(selection.block_budgets[batch, h].tolist(), reverse=True) == psi.tolist()
    # Each block holds exactly its t_j selected tokens.
    per_block = selection.mask.reshape(*selection.mask.shape[:2], J, b).sum(-1)
    assert torch.equal(per_block, selection.block_budgets)


@given(problems())
def test_local_and_global_parts_never_overlap(problem):
    q, k, _, p, config = problem
    b, w, L, LQ = config.block_size, config.window, k.shape[2], q.shape[2]
    selection = reference.select(q, k, p, config, q.shape[-1] ** -0.5)
    positions = torch.arange(L - LQ, L)
    keys = torch.arange(L)
    lo = window_start(positions, b, w)[:, None]
    local = (keys >= lo) & (keys <= positions[:, None])  # [LQ, L]
    global_ = selection.full_mask()[:, :, None, :] & (keys < lo)  # [B, HKV, LQ, L]
    assert not (global_ & local).any()
    # Every selected key lies wholly before the last query's window: budgeted blocks end at J*b = lo(L-1).
    assert selection.mask.shape[-1] == window_start(L - 1, b, w)
    kept = reference.kept_key_mask(selection, positions)
    assert torch.equal(kept, global_ | local)
    assert not (kept & (keys > positions[:, None])).any()  # causal
    assert kept[..., torch.arange(LQ), positions].all()  # each row sees its own key

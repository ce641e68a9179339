"""Decode with re-selection (semantics.md section 5c) in the reference, against a loop simulation.

The simulation keeps the dense keys and, per sequence and KV head, only the set of active positions; every step
it applies the three rules of section 5c to that set by hand (Python lists, sorted tuples for ties), and attends
over the active positions with the dense keys and values. The reference keeps real stores and moves rows.

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
from tca.reference import reselect


def lo(i, b, w):
    return max(0, (i // b + 1) * b - w)


def keep_count(p: torch.Tensor) -> int:
    return max(1, math.floor(sum(2**x * float(p[x]) for x in range(len(p)))))


def group_scores(q_i, keys):
    """The group's mean over query heads of a softmax over `keys` [n, D] (q_i [G, D])."""
    scale = q_i.shape[-1] ** -0.5
    return torch.stack([(scale * (keys @ qh)).softmax(0) for qh in q_i]).mean(0).tolist()


def block_bound(q_i, block_keys):
    """Section 5c step 1c by hand: max over the group's heads of scale * sum_d max(q_d min_d, q_d max_d)."""
    scale = q_i.shape[-1] ** -0.5
    low, high = block_keys.min(0).values, block_keys.max(0).values
    return max(float(scale * sum(max(qh[d] * low[d], qh[d] * high[d]) for d in range(len(qh)))) for qh in q_i)


def simulate_step(active, i, q_i, k_seq, b, w, t, reselect_now, blocks=None):
    """Section 5c on a list of active positions of one head; returns the new list (sorted)."""
    active = active + [i]
    if lo(i, b, w) > lo(i - 1, b, w):
        block = [j for j in active if lo(i - 1, b, w) <= j < lo(i, b, w)]
        scores = group_scores(q_i, k_seq[block])
        best = {block[n] for n in sorted(range(len(block)), key=lambda n: (-scores[n], n))[:t]}
        active = [j for j in active if j not in block or j in best]
    if reselect_now:
        held_before = [j for j in active if j < lo(i, b, w)]
        candidates = list(range(lo(i, b, w)))  # held or evicted: nothing before the window is ever lost
        if blocks is not None:  # steps 1a-1e: only the evicted tokens of the chosen blocks
            evicted = [j for j in candidates if j not in held_before]
            evicted_blocks = sorted({j // b for j in evicted})
            bounds = {c: block_bound(q_i, k_seq[c * b : (c + 1) * b]) for c in evicted_blocks}
            chosen = set(sorted(evicted_blocks, key=lambda c: (-bounds[c], c))[:blocks])
            candidates = sorted(set(held_before) | {j for j in evicted if j // b in chosen})
        scores = group_scores(q_i, k_seq[candidates])
        best = sorted(range(len(candidates)), key=lambda n: (-scores[n], n))[: len(held_before)]
        active = sorted(candidates[n] for n in best) + [j for j in active if j >= lo(i, b, w)]
    return active


def run(HQ, HKV, L0, steps, b, w, budgets, every, seed, B=2, D=16, blocks=None):
    G = HQ // HKV
    q, k, v = make_qkv(B, HQ, HKV, L0 + steps, D, seed=seed)
    config = tca.TCAConfig(block_size=b, window=w)
    scale = D**-0.5
    out0, cache = reselect.prefill(q[:, :, :L0], k[:, :, :L0], v[:, :, :L0], budgets, config, scale, every, blocks)
    plain_out, _ = reference.prefill(q[:, :, :L0], k[:, :, :L0], v[:, :, :L0], budgets, config, scale)
    torch.testing.assert_close(out0, plain_out, atol=0, rtol=0)
    active = [[cache.active.positions[bi][g].tolist() for g in range(HKV)] for bi in range(B)]
    keep = [keep_count(budgets[g]) for g in range(HKV)]
    outs, reselected = [], 0
    for s, i in enumerate(range(L0, L0 + steps)):
        step = reselect.decode_and_reselect(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache)
        now = every > 0 and s % every == 0
        reselected += now
        for bi in range(B):
            for g in range(HKV):
                q_i = q[bi, g * G : (g + 1) * G, i]
                active[bi][g] = simulate_step(active[bi][g], i, q_i, k[bi, g], b, w, keep[g], now, blocks)
                kept = active[bi][g]
                assert cache.active.positions[bi][g].tolist() == kept
                assert torch.equal(cache.active.keys[bi][g], k[bi, g, kept])
                assert torch.equal(cache.active.values[bi][g], v[bi, g, kept])
                # The store holds exactly the rest of the past: nothing is lost.
                evicted = cache.evicted_positions[bi][g].tolist()
                assert evicted == sorted(set(range(i + 1)) - set(kept))
                assert torch.equal(cache.evicted_keys[bi][g], k[bi, g, evicted])
                for h in range(g * G, (g + 1) * G):
                    weights = (scale * (k[bi, g, kept] @ q[bi, h, i])).softmax(0)
                    torch.testing.assert_close(step[bi, h, 0], weights @ v[bi, g, kept], atol=1e-12, rtol=1e-12)
        outs.append(step)
    return torch.cat(outs, dim=2), q, k, v, cache, reselected


@pytest.mark.parametrize("every", [1, 3, 16])
@pytest.mark.parametrize("L0,steps,b,w,heads", [(50, 50, 16, 32, (4, 2)), (70, 40, 32, 64, (3, 1)), (20, 40, 16, 32, (2, 2))])
def test_reselection_follows_section_5c(every, L0, steps, b, w, heads):
    HQ, HKV = heads
    budgets = random_budgets(HKV, b, seed=L0 + every)
    _, _, _, _, cache, reselected = run(HQ, HKV, L0, steps, b, w, budgets, every, seed=L0 + steps)
    assert reselected == -(-steps // every) and cache.steps == steps


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("every", [1, 5])
@pytest.mark.parametrize("L0,steps,b,w,heads", [(120, 40, 16, 32, (4, 2)), (150, 40, 32, 64, (3, 1))])
def test_candidate_blocks_follow_section_5c(blocks, every, L0, steps, b, w, heads):
    """blocks=M: only the evicted tokens of the M blocks of largest bound compete (steps 1a-1e, by hand)."""
    HQ, HKV = heads
    budgets = random_budgets(HKV, b, seed=L0 + blocks)
    _, _, _, _, cache, _ = run(HQ, HKV, L0, steps, b, w, budgets, every, seed=L0 + every, blocks=blocks)
    assert cache.blocks == blocks


def test_enough_candidate_blocks_equal_every_block_and_fewer_change_the_choice():
    L0, steps, b, w, HQ, HKV = 200, 30, 16, 32, 4, 2
    budgets = random_budgets(HKV, b, seed=9)
    every_block = run(HQ, HKV, L0, steps, b, w, budgets, 1, seed=5)[0]
    all_blocks = run(HQ, HKV, L0, steps, b, w, budgets, 1, seed=5, blocks=(L0 + steps) // b)[0]
    torch.testing.assert_close(all_blocks, every_block, atol=0, rtol=0)
    one_block = run(HQ, HKV, L0, steps, b, w, budgets, 1, seed=5, blocks=1)[0]
    assert not torch.equal(one_block, every_block)


def test_a_block_bound_is_at_least_every_logit_of_the_block():
    q, k, _ = make_qkv(1, 4, 1, 64, 16, seed=12)
    q_i = q[0, :, -1]
    for c in range(4):
        block = k[0, 0, c * 16 : (c + 1) * 16]
        logits = (16**-0.5) * (block @ q_i.T)  # [16 tokens, 4 heads]
        assert block_bound(q_i, block) >= float(logits.max()) - 1e-12


def test_reselection_changes_the_active_set():
    """A token the prefill dropped comes back when a later query looks for it (the point of section 5c)."""
    b, w, L0 = 16, 32, 64
    q, k, v = make_qkv(1, 1, 1, L0 + 1, 8, seed=3)
    p = torch.zeros(1, 5, dtype=torch.float64)
    p[:, 0] = 1  # one token per budgeted block
    k[0, 0, 5] = 10 * q[0, 0, L0]  # position 5: what the decode query L0 attends to
    q[0, 0, L0 - 1] = -q[0, 0, L0]  # the prompt's last query looks the other way: 5 is dropped at prefill
    config = tca.TCAConfig(block_size=b, window=w)
    _, cache = reselect.prefill(q[:, :, :L0], k[:, :, :L0], v[:, :, :L0], p, config, 8**-0.5, every=1)
    assert 5 not in cache.active.positions[0][0].tolist()
    reselect.decode_and_reselect(q[:, :, L0:], k[:, :, L0:], v[:, :, L0:], cache)
    assert 5 in cache.active.positions[0][0].tolist()


@pytest.mark.parametrize("L0,steps,b,w", [(50, 50, 16, 32), (70, 45, 32, 64)])
def test_every_zero_is_section_5(L0, steps, b, w):
    """tca.Reselect(every=0) is the paper's rule: the same outputs and cache as no policy."""
    q, k, v = make_qkv(2, 4, 2, L0 + steps, 16, seed=L0)
    budgets = random_budgets(2, b, seed=1)
    config = tca.TCAConfig(block_size=b, window=w)
    args = dict(budgets=budgets, config=config, backend="reference")
    _, plain = tca.prefill(q[:, :, :L0], k[:, :, :L0], v[:, :, :L0], **args)
    _, zero = tca.prefill(q[:, :, :L0], k[:, :, :L0], v[:, :, :L0], **args, policy=tca.Reselect(every=0))
    for i in range(L0, L0 + steps):
        new = [t[:, :, i : i + 1] for t in (q, k, v)]
        torch.testing.assert_close(tca.decode(*new, zero), tca.decode(*new, plain), atol=0, rtol=0)
    assert reference.cache.cached_positions(zero) == reference.cache.cached_positions(plain)


@pytest.mark.parametrize("every", [1, 7])
def test_dense_budgets_equal_dense_attention(every):
    """With the dense configuration nothing is evicted and re-selection keeps everything: dense attention."""
    L0, steps, b, w, HQ, HKV = 50, 50, 16, 32, 4, 2
    out, q, k, v, cache, _ = run(HQ, HKV, L0, steps, b, w, tca.dense_budgets(b).expand(HKV, -1), every, seed=4)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[:, :, L0:]
    torch.testing.assert_close(out, dense, atol=1e-12, rtol=1e-12)
    assert cache.evicted_lengths.sum() == 0

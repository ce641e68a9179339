"""Chunked and streaming prefill in the reference (docs/semantics.md section 5b).

Exact chunks against one-shot stateless attention on each prefix; the finished cache against a one-shot
prefill's; streaming against a one-shot prefill (one chunk), against a loop-by-loop simulation of its three
steps, its memory bound, dense budgets, and decoding after it. float64, tiny shapes (b = 16, w = 32).
Shape letters: B, HQ, HKV, L, D as in the package.
"""

from __future__ import annotations

import math

import pytest
import torch

import tca
from helpers import make_qkv, random_budgets
from tca.geometry import window_start
from tca.reference import (
    attention,
    budget_counts,
    decode,
    dense_causal_attention,
    empty_cache,
    exact_chunk,
    exact_finish,
    prefill,
    psi,
    streaming_chunk,
)
from tca.reference.cache import cached_positions

CONFIG = tca.TCAConfig(block_size=16, window=32)
B, HQ, HKV, D = 2, 4, 2, 8
SCALE = D**-0.5


def chunks(L: int, size: int):
    return [(s, min(L, s + size)) for s in range(0, L, size)]


def run_exact(q, k, v, budgets, size):
    state, outs = None, []
    for s, e in chunks(k.shape[2], size):
        out, state = exact_chunk(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], state, budgets, CONFIG, SCALE)
        outs.append(out)
    return outs, state


def run_streaming(q, k, v, budgets, size, after_chunk=None):
    cache = empty_cache(q.shape[0], k.shape[1], D, q.dtype, q.device, budgets, CONFIG, SCALE)
    outs = []
    for s, e in chunks(k.shape[2], size):
        outs.append(streaming_chunk(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], cache, budgets))
        if after_chunk is not None:
            after_chunk(s, e, cache)
    return outs, cache


def assert_same_cache(a, b):
    assert cached_positions(a) == cached_positions(b)
    assert a.seq_len == b.seq_len
    assert torch.equal(a.keep_per_block, b.keep_per_block)
    for rows_a, rows_b in ((a.keys, b.keys), (a.values, b.values)):
        for row_a, row_b in zip(rows_a, rows_b, strict=True):
            for x, y in zip(row_a, row_b, strict=True):
                torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("size", [1, 5, 16, 23, 48, 97])
def test_exact_chunks_equal_one_shot_attention_on_each_prefix(size):
    L = 97
    q, k, v = make_qkv(B, HQ, HKV, L, D, seed=size)
    budgets = random_budgets(HKV, 16, seed=size)
    outs, _ = run_exact(q, k, v, budgets, size)
    for (s, e), out in zip(chunks(L, size), outs, strict=True):
        # The prefix's own one-shot call (LQ = L = e), its last rows: another code path than LQ < L.
        prefix = attention(q[:, :, :e], k[:, :, :e], v[:, :, :e], budgets, CONFIG, SCALE)
        torch.testing.assert_close(out, prefix[:, :, s:e], rtol=1e-12, atol=1e-12)
    one_shot, _ = prefill(q, k, v, budgets, CONFIG, SCALE)
    s, e = chunks(L, size)[-1]
    torch.testing.assert_close(outs[-1], one_shot[:, :, s:e], rtol=1e-12, atol=1e-12)


def test_exact_chunks_other_than_the_last_differ_from_the_one_shot_rows():
    # Earlier chunks select from their own last query, not from the prompt's: their rows are not the
    # one-shot prefill's (otherwise the rule would need future tokens).
    q, k, v = make_qkv(1, HQ, HKV, 96, D, seed=3)
    budgets = tca.default_budgets(16).expand(HKV, -1)
    outs, _ = run_exact(q, k, v, budgets, 48)
    one_shot, _ = prefill(q, k, v, budgets, CONFIG, SCALE)
    assert not torch.allclose(outs[0][:, :, -1], one_shot[:, :, 47])


@pytest.mark.parametrize("size", [7, 16, 40])
@pytest.mark.parametrize("L", [30, 64, 101])
def test_exact_finish_gives_the_one_shot_cache_and_the_same_decoding(size, L):
    q, k, v = make_qkv(B, HQ, HKV, L + 20, D, seed=L + size)
    budgets = random_budgets(HKV, 16, seed=L)
    _, state = run_exact(q[:, :, :L], k[:, :, :L], v[:, :, :L], budgets, size)
    assert state.seq_len == L and state.nbytes == 2 * k[:, :, :L].numel() * 8  # dense until finishing
    chunked = exact_finish(state)
    _, one_shot = prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], budgets, CONFIG, SCALE)
    assert_same_cache(chunked, one_shot)
    for i in range(L, L + 20):  # crosses a block boundary: the window moves and a block is compressed
        step = (t[:, :, i : i + 1] for t in (q, k, v))
        a = decode(*step, chunked)
        step = (t[:, :, i : i + 1] for t in (q, k, v))
        torch.testing.assert_close(a, decode(*step, one_shot), rtol=0, atol=0)
    assert_same_cache(chunked, one_shot)


@pytest.mark.parametrize("L", [20, 32, 33, 64, 100])
def test_streaming_with_one_chunk_is_a_one_shot_prefill(L):
    q, k, v = make_qkv(B, HQ, HKV, L, D, seed=L)
    budgets = random_budgets(HKV, 16, seed=L)
    outs, cache = run_streaming(q, k, v, budgets, L)
    one_shot_out, one_shot_cache = prefill(q, k, v, budgets, CONFIG, SCALE)
    torch.testing.assert_close(outs[0], one_shot_out, rtol=1e-12, atol=1e-12)
    assert_same_cache(cache, one_shot_cache)


def simulate_streaming(q, k, v, budgets, size):
    """Section 5b.2 step by step with Python sets and loops, on the dense tensors (which the test has).

    Returns the outputs [B, HQ, L, D] and the held positions per [b][h] after each chunk.
    """
    L, b_size, w = k.shape[2], CONFIG.block_size, CONFIG.window
    G = HQ // HKV
    out = torch.zeros_like(q)
    held = [[[] for _ in range(HKV)] for _ in range(q.shape[0])]
    history = []
    for s, e in chunks(L, size):
        lo_before = window_start(s - 1, b_size, w) if s else 0
        lo_after = window_start(e - 1, b_size, w)
        J = (lo_after - lo_before) // b_size
        for bi in range(q.shape[0]):
            for h in range(HKV):
                keys = held[bi][h] + list(range(s, e))  # step 1: append
                if J:  # step 2: Eqs. 5-8 over the leaving blocks, with the chunk's last query
                    imp = {j: 0.0 for j in keys}
                    for hq in range(h * G, (h + 1) * G):
                        logits = [SCALE * float(q[bi, hq, e - 1] @ k[bi, h, j]) for j in keys]
                        top = max(logits)
                        z = sum(math.exp(x - top) for x in logits)
                        for j, x in zip(keys, logits, strict=True):
                            imp[j] += math.exp(x - top) / z / G
                    priority = []
                    for block in range(J):
                        scores = [imp[j] for j in range(lo_before + block * b_size, lo_before + (block + 1) * b_size)]
                        mass = sum(scores)
                        herf = sum(x * x for x in scores) / mass**2 if mass > 0 else 1.0
                        m = J * mass if CONFIG.mass_scale == "mean" else mass
                        priority.append((1 - CONFIG.alpha) * m + CONFIG.alpha * (1 - herf))
                    order = sorted(range(J), key=lambda j: (-priority[j], j))
                    table = psi(budget_counts(budgets[h], J), b_size).tolist()
                    dropped = set()
                    for rank, block in enumerate(order):
                        start = lo_before + block * b_size
                        members = sorted(range(start, start + b_size), key=lambda j: (-imp[j], j))
                        dropped |= set(members[table[rank] :])
                    keys = [j for j in keys if j not in dropped]
                held[bi][h] = keys
                for i in range(s, e):  # step 3: attend over S(i)
                    lo = window_start(i, b_size, w)
                    visible = [j for j in keys if j < lo] + list(range(lo, i + 1))
                    for hq in range(h * G, (h + 1) * G):
                        logits = torch.stack([SCALE * (q[bi, hq, i] @ k[bi, h, j]) for j in visible])
                        out[bi, hq, i] = logits.softmax(0) @ v[bi, h, visible]
        history.append([[list(p) for p in row] for row in held])
    return out, history


# 20: chunks that start and end inside blocks (the public API allows that only for a prompt's last chunk,
# e.g. after decoding; the rule itself is defined for any chunk).
@pytest.mark.parametrize("size", [16, 20, 32, 48, 112])
def test_streaming_matches_a_loop_by_loop_simulation(size):
    L = 112
    q, k, v = make_qkv(1, HQ, HKV, L, D, seed=size)
    budgets = random_budgets(HKV, 16, seed=size + 1)
    seen = []
    outs, _ = run_streaming(q, k, v, budgets, size, after_chunk=lambda s, e, c: seen.append(cached_positions(c)))
    expected, history = simulate_streaming(q, k, v, budgets, size)
    torch.testing.assert_close(torch.cat(outs, dim=2), expected, rtol=1e-10, atol=1e-10)
    assert seen == history


def test_streaming_memory_stays_at_window_plus_kept_tokens():
    L, size = 400, 32
    q, k, v = make_qkv(1, HQ, HKV, L, D, seed=7)
    budgets = torch.stack([tca.default_budgets(16), random_budgets(1, 16, seed=7)[0]])
    kept = torch.zeros(HKV, dtype=torch.long)
    b_size, w = CONFIG.block_size, CONFIG.window
    checked = []

    def check(s, e, cache):
        J = (window_start(e - 1, b_size, w) - (window_start(s - 1, b_size, w) if s else 0)) // b_size
        kept.add_(psi_sums(budgets, J))
        local = e - window_start(e - 1, b_size, w)
        assert local <= w
        assert cache.lengths[0].tolist() == (kept + local).tolist()
        assert cache.lengths.max() <= w + kept.max()
        checked.append(e)

    _, cache = run_streaming(q, k, v, budgets, size, after_chunk=check)
    assert checked[-1] == L
    assert cache.lengths[0, 0] < L // 3  # default budgets keep 3 tokens of 16 here: the dense KV never existed
    assert cache.nbytes == 2 * int(cache.lengths.sum()) * D * 8


def psi_sums(budgets, num_blocks):
    """Tokens kept of J leaving blocks per KV head: sum of Psi (Eq. 7 counts over J blocks)."""
    return torch.stack([psi(budget_counts(p, num_blocks), 16).sum() for p in budgets])


def test_streaming_equals_exact_until_a_block_leaves_the_window():
    q, k, v = make_qkv(B, HQ, HKV, 32, D, seed=11)
    budgets = random_budgets(HKV, 16, seed=11)
    exact, _ = run_exact(q, k, v, budgets, 16)
    streaming, cache = run_streaming(q, k, v, budgets, 16)
    for a, b in zip(exact, streaming, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert cache.lengths.eq(32).all()


def test_streaming_with_dense_budgets_is_causal_attention_in_every_chunk():
    L = 90
    q, k, v = make_qkv(B, HQ, HKV, L, D, seed=5)
    dense = tca.dense_budgets(16).expand(HKV, -1)
    outs, cache = run_streaming(q, k, v, dense, 32)
    torch.testing.assert_close(torch.cat(outs, dim=2), dense_causal_attention(q, k, v, SCALE), rtol=1e-12, atol=1e-12)
    assert cache.lengths.eq(L).all()


def test_decoding_after_streaming():
    L, steps = 96, 20
    q, k, v = make_qkv(B, HQ, HKV, L + steps, D, seed=2)
    # Dense budgets: the whole of it is causal attention.
    dense = tca.dense_budgets(16).expand(HKV, -1)
    _, cache = run_streaming(q[:, :, :L], k[:, :, :L], v[:, :, :L], dense, 32)
    for i in range(L, L + steps):
        out = decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache)
        expected = dense_causal_attention(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], SCALE)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # Sparse budgets: each step attends over what the cache holds (section 5), which keeps shrinking blocks.
    budgets = random_budgets(HKV, 16, seed=2)
    _, cache = run_streaming(q[:, :, :L], k[:, :, :L], v[:, :, :L], budgets, 32)
    for i in range(L, L + steps):
        out = decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache)
        assert cache.seq_len == i + 1
        for bi in range(B):
            for h in range(HKV):
                positions = cache.positions[bi][h]
                assert positions[-1] == i and positions.unique().numel() == positions.numel()
                keys, values = k[bi, h, positions], v[bi, h, positions]
                for hq in range(h * 2, h * 2 + 2):
                    expected = (SCALE * keys @ q[bi, hq, i]).softmax(0) @ values
                    torch.testing.assert_close(out[bi, hq, 0], expected, rtol=1e-12, atol=1e-12)
    assert cache.lengths.max() < L + steps

"""TCA over a paged KV cache (tca.serving.vllm.sequence), checked against tca.prefill / tca.decode / tca.attention.

No vLLM needed: the pages are a plain tensor [NP, HKV, P, 2 * D] as vLLM allocates it, filled through the
plugin's own writer, with a shuffled page table so that logical and physical order differ.

Shape letters: HQ query heads, HKV KV heads, L prompt length, D head dim, P page size, b, w.
"""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import make_qkv, random_budgets
from tca.budgets import block_keep_count
from tca.serving.vllm.paged import PagedSequence, split_pages, write_tokens
from tca.serving.vllm.sequence import attend_chunk, decode_token

REFERENCE = tca.backends.registry.get("reference").load()


def paged_copy(k, v, page_size, seed=0):
    """k, v [HKV, L, D] -> a PagedSequence holding them in shuffled pages of a larger pool."""
    HKV, L, D = k.shape
    pages_needed = -(-L // page_size)
    pool = torch.zeros(pages_needed + 3, HKV, page_size, 2 * D, dtype=k.dtype)
    table = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))[:pages_needed]
    key_pages, value_pages = split_pages(pool, D)
    positions = torch.arange(L)
    slots = table[positions // page_size] * page_size + positions % page_size
    write_tokens(key_pages, value_pages, k.transpose(0, 1), v.transpose(0, 1), slots)
    return PagedSequence(key_pages, value_pages, table)


def test_pages_return_what_was_written():
    _, k, v = make_qkv(1, 2, 2, 70, 8, seed=1)
    paged = paged_copy(k[0], v[0], page_size=32)
    got_k, got_v = paged.prefix(70)
    assert torch.equal(got_k, k[0]) and torch.equal(got_v, v[0])
    heads = torch.tensor([[3, 40, 69], [0, 1, 64]])
    per_head_k, _ = paged.gather_per_head(heads)
    assert torch.equal(per_head_k[1, 2], k[0, 1, 64]) and torch.equal(per_head_k[0, 1], k[0, 0, 40])


def test_negative_slots_are_padding():
    pool = torch.zeros(2, 1, 16, 4)
    key_pages, value_pages = split_pages(pool, 2)
    write_tokens(key_pages, value_pages, torch.ones(2, 1, 2), torch.ones(2, 1, 2), torch.tensor([3, -1]))
    assert key_pages.sum() == 2 and value_pages.sum() == 2


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("L0", [20, 57, 100])
def test_prefill_then_decode_equals_tca_decode(page_size, L0):
    """Prompt of L0 tokens, then decode steps across several window moves: outputs equal tca.decode's."""
    HQ, HKV, D, b, w, steps = 4, 2, 16, 16, 32, 40
    config = tca.TCAConfig(block_size=b, window=w)
    budgets = random_budgets(HKV, b, seed=3)
    q, k, v = make_qkv(1, HQ, HKV, L0 + steps, D, seed=L0)
    scale = D**-0.5
    paged = paged_copy(k[0], v[0], page_size)
    expected, cache = tca.prefill(q[:, :, :L0], k[:, :, :L0], v[:, :, :L0], budgets=budgets, config=config,
                                  backend="reference")
    out, state = attend_chunk(q[0, :, :L0].transpose(0, 1), paged, L0, budgets, config, scale, REFERENCE)
    torch.testing.assert_close(out, expected[0].transpose(0, 1), rtol=1e-10, atol=1e-10)
    keep = block_keep_count(budgets)
    for i in range(L0, L0 + steps):
        want = tca.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache)
        got = decode_token(q[0, :, i], paged, state, keep, config, scale)
        torch.testing.assert_close(got, want[0, :, 0], rtol=1e-10, atol=1e-10)
    # The state keeps exactly what the reference cache keeps, per head.
    assert state.kept_tokens().tolist() == [int(n) for n in cache.lengths[0]]


def test_chunk_equals_stateless_attention_with_fewer_queries():
    """A chunk of LQ < L queries is section 4's tca.attention with the selection from the chunk's last row."""
    HQ, HKV, D, L, LQ = 4, 2, 16, 90, 25
    config = tca.TCAConfig(block_size=16, window=32)
    budgets = random_budgets(HKV, 16, seed=5)
    q, k, v = make_qkv(1, HQ, HKV, L, D, LQ=LQ, seed=7)
    paged = paged_copy(k[0], v[0], 16)
    out, state = attend_chunk(q[0].transpose(0, 1), paged, L, budgets, config, D**-0.5, REFERENCE)
    expected = tca.attention(q, k, v, budgets=budgets, config=config, backend="reference")
    torch.testing.assert_close(out, expected[0].transpose(0, 1), rtol=1e-10, atol=1e-10)
    assert state.seq_len == L and state.window_start == 64


def test_dense_budgets_decode_equals_causal_attention():
    HQ, HKV, D, L0, steps = 4, 2, 16, 50, 30
    config = tca.TCAConfig(block_size=16, window=16)
    budgets = tca.dense_budgets(16).expand(HKV, -1)
    q, k, v = make_qkv(1, HQ, HKV, L0 + steps, D, seed=11)
    paged = paged_copy(k[0], v[0], 16)
    _, state = attend_chunk(q[0, :, :L0].transpose(0, 1), paged, L0, budgets, config, D**-0.5, REFERENCE)
    keep = block_keep_count(budgets)
    for i in range(L0, L0 + steps):
        got = decode_token(q[0, :, i], paged, state, keep, config, D**-0.5)
        kk, vv = k[0, :, : i + 1].repeat_interleave(2, 0), v[0, :, : i + 1].repeat_interleave(2, 0)
        want = torch.softmax(q[0, :, i, None] @ kk.transpose(-1, -2) * D**-0.5, -1) @ vv
        torch.testing.assert_close(got, want[:, 0], rtol=1e-10, atol=1e-10)
    assert state.kept_tokens().tolist() == [L0 + steps] * HKV


def test_a_non_finite_key_in_the_leaving_block_ranks_last():
    """Section 8 in the plugin's decode: a key whose logit is not finite scores 0, so the leaving block still keeps
    exactly t tokens and the bad key is kept only when every token is."""
    from tca.serving.vllm.sequence import SequenceState, compress_leaving_block

    HKV, G, D, b = 2, 2, 16, 16
    q, k, v = make_qkv(1, HKV * G, HKV, b, D, seed=5)
    k[0, :, 3] = float("inf")  # position 3 of the block, both heads
    paged = paged_copy(k[0], v[0], 8)
    state = SequenceState(seq_len=b, window_start=0, positions=torch.empty(HKV, 0, dtype=torch.long),
                          counts=torch.zeros(HKV, dtype=torch.long))
    keep = torch.tensor([4, b])  # head 0 keeps 4 tokens of the block, head 1 all of them
    compress_leaving_block(q[0, :, -1].reshape(HKV, G, D), paged, state, 0, b, keep, D**-0.5)
    assert state.counts.tolist() == [4, b]
    assert 3 not in state.positions[0, :4].tolist() and state.positions[1].tolist() == list(range(b))

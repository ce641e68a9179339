"""TCA over a paged KV cache (tca.serving.vllm: sequence.attend_chunk for prompts; the batched decode step over
states in page-shaped pools, tca.backends.common.paged_decode_torch, for the decode rows of a batch), checked
against tca.prefill / tca.decode / tca.attention.

No vLLM needed: the pages are a plain tensor [NP, HKV, P, 2 * D] as vLLM allocates it, filled through the
plugin's own writer, with a shuffled page table so that logical and physical order differ.

Shape letters: HQ query heads, HKV KV heads, L prompt length, D head dim, P page size, b, w.
"""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import make_qkv, random_budgets
from tca.backends.common.paged_decode_torch import paged_decode_torch, store_state
from tca.budgets import block_keep_count
from tca.geometry import window_start
from tca.serving.vllm.paged import PagedSequence, split_pages, write_tokens
from tca.serving.vllm.sequence import SequenceState, attend_chunk

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


def shared_pool(sequences, page_size, seed=0):
    """Several sequences' k, v [HKV, L_r, D] in shuffled pages of one pool: (key_pages, value_pages, tables
    [R, most pages], one PagedSequence per sequence)."""
    HKV, _, D = sequences[0][0].shape
    needs = [-(-k.shape[1] // page_size) for k, _ in sequences]
    pool = torch.zeros(sum(needs) + 3, HKV, page_size, 2 * D, dtype=sequences[0][0].dtype)
    order = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))
    key_pages, value_pages = split_pages(pool, D)
    tables = torch.zeros(len(sequences), max(needs), dtype=torch.int64)
    views, used = [], 0
    for r, ((k, v), n) in enumerate(zip(sequences, needs, strict=True)):
        table = order[used : used + n]
        used += n
        tables[r, :n] = table
        positions = torch.arange(k.shape[1])
        slots = table[positions // page_size] * page_size + positions % page_size
        write_tokens(key_pages, value_pages, k.transpose(0, 1), v.transpose(0, 1), slots)
        views.append(PagedSequence(key_pages, value_pages, table))
    return key_pages, value_pages, tables, views


class LayerStates:
    """One layer's decode states over a page pool, in the page-shaped pools the plugin keeps (PagedStates, one layer)."""

    def __init__(self, key_pages: torch.Tensor, keep: torch.Tensor):
        NP, HKV, P, _ = key_pages.shape
        self.positions = torch.zeros(NP, HKV, P, dtype=torch.int32)
        self.counts = torch.full((NP, HKV), -1, dtype=torch.int32)
        self.covered = torch.zeros(NP, dtype=torch.int32)
        self.usage = torch.zeros(3, dtype=torch.int64)
        self.keep = keep.to(torch.int32)

    def put(self, pages: torch.Tensor, state: SequenceState) -> None:
        store_state(self.positions, self.counts, self.covered, pages, state.positions, state.counts, state.seq_len)

    def decode(self, query, tables, seq_lens, key_pages, value_pages, config, scale):
        """query [R, HQ, D] of rows whose sequences reach seq_lens [R] tokens with this step."""
        return paged_decode_torch(query, key_pages, value_pages, tables, torch.as_tensor(seq_lens), self.positions,
                                  self.counts, self.covered, self.keep, self.usage, config.block_size, config.window,
                                  scale)

    def kept_tokens(self, pages: torch.Tensor, seq_len: int, config) -> list[int]:
        """Per head, the tokens the next step of a sequence of seq_len tokens attends (kept + window)."""
        window = seq_len - window_start(seq_len - 1, config.block_size, config.window)
        return (self.counts[int(pages[0])].long() + window).tolist()


def decode_one(states, query, paged, seq_len, config, scale):
    """One decode step of one sequence through the batched step (R = 1): query [HQ, D] -> out [HQ, D]."""
    out = states.decode(query[None], paged.pages[None], [seq_len], paged.key_pages, paged.value_pages, config, scale)
    return out[0]


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
    states = LayerStates(paged.key_pages, block_keep_count(budgets))
    states.put(paged.pages, state)
    for i in range(L0, L0 + steps):
        want = tca.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache)
        got = decode_one(states, q[0, :, i], paged, i + 1, config, scale)
        torch.testing.assert_close(got, want[0, :, 0], rtol=1e-10, atol=1e-10)
    # The state keeps exactly what the reference cache keeps, per head.
    assert states.kept_tokens(paged.pages, L0 + steps, config) == [int(n) for n in cache.lengths[0]]


def test_decode_rows_of_a_batch_decode_together_as_each_alone():
    """Sequences of different lengths (their windows move at different steps) decode in one batched step per token;
    each equals its own tca.decode. A stale state on a page that a new sequence reuses is not continued."""
    HQ, HKV, D, b, w, steps, page_size = 4, 2, 16, 16, 32, 37, 16
    config = tca.TCAConfig(block_size=b, window=w)
    budgets = random_budgets(HKV, b, seed=8)
    scale = D**-0.5
    lengths = [70, 33, 101]
    qkv = [make_qkv(1, HQ, HKV, L + steps, D, seed=20 + r) for r, L in enumerate(lengths)]
    key_pages, value_pages, tables, views = shared_pool([(k[0], v[0]) for _, k, v in qkv], page_size)
    states, caches = LayerStates(key_pages, block_keep_count(budgets)), []
    for r, ((q, k, v), L) in enumerate(zip(qkv, lengths, strict=True)):
        # an earlier sequence's state on the same first page, covering other tokens: never continued
        states.put(views[r].pages, SequenceState(5, 0, torch.full((HKV, 1), 3), torch.ones(HKV, dtype=torch.long)))
        _, state = attend_chunk(q[0, :, :L].transpose(0, 1), views[r], L, budgets, config, scale, REFERENCE)
        states.put(views[r].pages, state)
        caches.append(tca.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], budgets=budgets, config=config,
                                  backend="reference")[1])
    for step in range(steps):
        query = torch.stack([q[0, :, L + step] for (q, _, _), L in zip(qkv, lengths, strict=True)])
        got = states.decode(query, tables, [L + step + 1 for L in lengths], key_pages, value_pages, config, scale)
        for r, ((q, k, v), L) in enumerate(zip(qkv, lengths, strict=True)):
            i = L + step
            want = tca.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], caches[r])
            torch.testing.assert_close(got[r], want[0, :, 0], rtol=1e-10, atol=1e-10, msg=f"row {r} step {step}")
    for r, L in enumerate(lengths):
        assert states.kept_tokens(views[r].pages, L + steps, config) == [int(n) for n in caches[r].lengths[0]]


def test_a_head_that_keeps_fewer_per_block_but_holds_more_stays_in_its_pages():
    """Heads' prefill counts (Eq. 7's rounding) and their keep per leaving block (floor of E[p]) can rank heads in
    opposite orders: a head keeping fewer per block may hold the most positions. Its decode steps equal
    tca.decode."""
    HQ, HKV, D, b, w, L0, steps = 8, 8, 8, 16, 32, 384, 40
    config = tca.TCAConfig(block_size=b, window=w)
    budgets = random_budgets(HKV, b, seed=35)
    keep, scale = block_keep_count(budgets), D**-0.5
    q, k, v = make_qkv(1, HQ, HKV, L0 + steps, D, seed=1)
    paged = paged_copy(k[0], v[0], 16)
    _, state = attend_chunk(q[0, :, :L0].transpose(0, 1), paged, L0, budgets, config, scale, REFERENCE)
    counts = state.counts.tolist()
    fewer = [h for h in range(HKV) if keep[h] < keep.max()]
    assert fewer and max(counts[h] for h in fewer) > min(counts[h] for h in range(HKV) if keep[h] == keep.max())
    _, cache = tca.prefill(q[:, :, :L0], k[:, :, :L0], v[:, :, :L0], budgets=budgets, config=config,
                           backend="reference")
    states = LayerStates(paged.key_pages, keep)
    states.put(paged.pages, state)
    for i in range(L0, L0 + steps):
        want = tca.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache)
        torch.testing.assert_close(decode_one(states, q[0, :, i], paged, i + 1, config, scale), want[0, :, 0],
                                   rtol=1e-10, atol=1e-10)


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
    states = LayerStates(paged.key_pages, block_keep_count(budgets))
    states.put(paged.pages, state)
    for i in range(L0, L0 + steps):
        got = decode_one(states, q[0, :, i], paged, i + 1, config, D**-0.5)
        kk, vv = k[0, :, : i + 1].repeat_interleave(2, 0), v[0, :, : i + 1].repeat_interleave(2, 0)
        want = torch.softmax(q[0, :, i, None] @ kk.transpose(-1, -2) * D**-0.5, -1) @ vv
        torch.testing.assert_close(got, want[:, 0], rtol=1e-10, atol=1e-10)
    assert states.kept_tokens(paged.pages, L0 + steps, config) == [L0 + steps] * HKV


def test_a_non_finite_key_in_the_leaving_block_ranks_last():
    """Section 8 in the plugin's decode: a key whose logit is not finite scores 0, so the leaving block still keeps
    exactly t tokens and the bad key is kept only when every token is."""
    HKV, G, D, b = 2, 2, 16, 16
    q, k, v = make_qkv(1, HKV * G, HKV, b + 1, D, seed=5)
    k[0, :, 3] = float("inf")  # position 3 of the block, both heads
    paged = paged_copy(k[0], v[0], 8)
    config = tca.TCAConfig(block_size=b, window=b)
    states = LayerStates(paged.key_pages, torch.tensor([4, b]))  # head 0 keeps 4 tokens of the block, head 1 all
    # a state of b tokens, nothing global yet: the next token moves the window
    states.put(paged.pages, SequenceState(seq_len=b, window_start=0, positions=torch.empty(HKV, 0, dtype=torch.long),
                                          counts=torch.zeros(HKV, dtype=torch.long)))
    decode_one(states, q[0, :, b], paged, b + 1, config, D**-0.5)
    owner = int(paged.pages[0])
    assert states.counts[owner].tolist() == [4, b]
    entries = torch.arange(b)
    kept = states.positions[paged.pages[entries // 8].long(), :, entries % 8].T  # [HKV, b] (pages of 8)
    assert 3 not in kept[0, :4].tolist()
    assert kept[1].tolist() == list(range(b))

"""One layer's rows (layer.LayerRunner.run: prompts and chunks one by one, every decode row in one batched
step over states in page-shaped pools: Triton on a GPU, PyTorch elsewhere) against tca's reference, sequence by
sequence, on batches of prompts, chunks and decode steps, with a sequence restarting on reused pages. No vLLM
needed. The reference per sequence (docs/semantics.md section 5.1): a prompt or chunk reaching the crossover is
tca.attention over its prefix; a decode step continues tca.prefill of the tokens up to its last TCA chunk with
tca.decode; a sequence prefilled under the crossover stays dense.

Shape letters: HQ query heads, HKV KV heads, D head dim, NP pages, P page size.
"""

from __future__ import annotations

import torch

import tca
from helpers import random_budgets
from tca.backends import registry
from tca.serving.vllm.layer import LayerRunner, Rows
from tca.serving.vllm.paged import split_pages, write_tokens
from tca.serving.vllm.paged_states import PagedStates
from tca.serving.vllm.settings import Settings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYER = "model.layers.0.self_attn.attn"


class Reference:
    """One sequence's tokens so far and its reference cache (None: dense, no TCA prefill yet)."""

    def __init__(self):
        self.q, self.k, self.v, self.cache = [], [], [], None

    def tokens(self):
        return [torch.stack(t, dim=1)[None] for t in (self.q, self.k, self.v)]  # [1, H, L, D] each


def exact(q, k, v, scale):
    """Causal attention of the last q.shape[2] positions over every key (GQA)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    L, LQ = k.shape[2], q.shape[2]
    mask = torch.arange(L)[None, :] <= torch.arange(L - LQ, L)[:, None]
    weights = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask.to(q.device), float("-inf")).softmax(-1)
    return weights @ v


def test_paged_rows_equal_the_reference_sequence_by_sequence():
    """Three sequences: a long prompt in two chunks, a long one-shot prompt, a short prompt (dense); then decode
    steps of all three, then a new sequence on the pages of a finished one."""
    generator = torch.Generator().manual_seed(3)
    HQ, HKV, D, P = 4, 2, 16, 16
    config = tca.TCAConfig(block_size=16, window=32)
    budgets = random_budgets(HKV, 16, seed=5)
    scale = D**-0.5
    dense_below = 48
    NP, width = 40, 12
    pool = torch.zeros(NP, HKV, P, 2 * D, device=DEVICE)
    key_pages, value_pages = split_pages(pool, D)
    table = (torch.randperm(NP - 1, generator=generator)[: 3 * width] + 1).view(3, width).to(DEVICE, torch.int32)
    layer = LayerRunner(HQ, HKV, D, scale, Settings(config, "torch", None, budgets[0], "test"))
    # what LayerRunner.budgets makes on first use (it asks vLLM for the tensor-parallel rank)
    layer._budgets = (budgets.to(DEVICE), registry.get("torch").load())
    states = PagedStates([LAYER], [budgets], NP, P, config, width * P, torch.device(DEVICE))
    sequences = [Reference() for _ in range(3)]

    def step(new_tokens):
        """One batch: new_tokens[r] tokens for row r (0: not scheduled); checks every row against the reference."""
        rows = [r for r in range(3) if new_tokens[r]]
        starts, seq_lens = [0], []
        for r in rows:
            starts.append(starts[-1] + new_tokens[r])
            seq_lens.append(len(sequences[r].q) + new_tokens[r])
        T = starts[-1]
        key = torch.randn(T, HKV, D, generator=generator).to(DEVICE)
        value = torch.randn(T, HKV, D, generator=generator).to(DEVICE)
        query = torch.randn(T, HQ, D, generator=generator).to(DEVICE)
        slots = []
        for index, r in enumerate(rows):
            positions = torch.arange(seq_lens[index] - new_tokens[r], seq_lens[index], device=DEVICE)
            slots.append(table[r].long()[positions // P] * P + positions % P)
        write_tokens(key_pages, value_pages, key, value, torch.cat(slots))
        tables = table[rows]
        new = [index for index, r in enumerate(rows) if new_tokens[r] == seq_lens[index]]
        states.forget(tables[new, 0])  # what the builders do for sequences that start
        got = torch.zeros(T, HQ, D, device=DEVICE)
        layer.run(LAYER, query, key_pages, value_pages, Rows(starts, seq_lens, tables), got, dense_below, states)
        for index, r in enumerate(rows):
            sequence, a, b = sequences[r], starts[index], starts[index + 1]
            sequence.q += list(query[a:b])
            sequence.k += list(key[a:b])
            sequence.v += list(value[a:b])
            q, k, v = sequence.tokens()
            n = b - a
            if n == 1 and sequence.cache is not None:  # a decode step continuing the state
                want = tca.decode(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], sequence.cache)
            elif n > 1 and seq_lens[index] >= dense_below:  # a prompt or chunk: TCA over its prefix
                want = tca.attention(q[:, :, -n:], k, v, budgets=budgets, config=config, backend="reference")
                _, sequence.cache = tca.prefill(q, k, v, budgets=budgets, config=config, backend="reference")
            else:  # dense: under the crossover, or a sequence prefilled dense
                want = exact(q[:, :, -n:], k, v, scale)
            torch.testing.assert_close(got[a:b], want[0].transpose(0, 1), atol=2e-5, rtol=2e-5,
                                       msg=f"row {r}, {n} tokens at {seq_lens[index]}")

    step([40, 70, 20])  # a first chunk under the crossover (dense), a long prompt, a short prompt
    step([30, 0, 0])  # the second chunk reaches the crossover: TCA
    for _ in range(20):  # decode steps: two with states, one dense, windows moving
        step([1, 1, 1])
    sequences[2] = Reference()  # row 2's sequence ended; a new one starts on its pages
    step([1, 1, 60])
    for _ in range(5):
        step([1, 1, 1])
    usage = states.usage[0].tolist()
    assert usage[0] == 2 * 26 + 5  # decode rows with a state: rows 0 and 1 every step, row 2's new one after
    assert 0 < usage[2] < usage[1]

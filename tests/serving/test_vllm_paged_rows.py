"""The rows of layer.LayerRunner.run_paged (states in page-shaped pools, one batched paged decode step: Triton on a
GPU, PyTorch elsewhere) against LayerRunner.run (DecodeStates) on the same batches of prompts, chunks and decode
steps. No vLLM needed.

Shape letters: R rows, HQ query heads, HKV KV heads, D head dim, NP pages, P page size, b, w.
"""

from __future__ import annotations

import torch

import tca
from helpers import random_budgets
from tca.backends import registry
from tca.budgets import block_keep_count
from tca.serving.vllm.layer import LayerRunner, Rows
from tca.serving.vllm.paged import split_pages, write_tokens
from tca.serving.vllm.paged_states import PagedStates
from tca.serving.vllm.settings import Settings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYER = "model.layers.0.self_attn.attn"


def runner(budgets, config, HQ, HKV, D):
    settings = Settings(config, "torch", None, budgets[0], "test")
    layer = LayerRunner(HQ, HKV, D, D**-0.5, settings)
    # what LayerRunner.budgets makes on first use (it asks vLLM for the tensor-parallel rank)
    layer._budgets = (budgets.to(DEVICE), block_keep_count(budgets), registry.get("torch").load())
    return layer


def test_paged_rows_match_the_cpu_rows():
    """Three sequences: a long prompt in two chunks, a long one-shot prompt, a short prompt (dense); then decode
    steps of all three, with a new sequence starting on the pages of a finished one."""
    generator = torch.Generator().manual_seed(3)
    HQ, HKV, D, P = 4, 2, 16, 16
    config = tca.TCAConfig(block_size=16, window=32)
    budgets = random_budgets(HKV, 16, seed=5)
    dense_below = 48
    NP, width = 40, 12
    pool = torch.zeros(NP, HKV, P, 2 * D, device=DEVICE)
    key_pages, value_pages = split_pages(pool, D)
    table = (torch.randperm(NP - 1, generator=generator)[: 3 * width] + 1).view(3, width).to(DEVICE, torch.int32)
    fast, slow = runner(budgets, config, HQ, HKV, D), runner(budgets, config, HQ, HKV, D)
    states = PagedStates([LAYER], [budgets], NP, P, config, width * P, torch.device(DEVICE))
    lengths = [0, 0, 0]

    def step(new_tokens):
        """One batch: new_tokens[r] tokens for row r (0: not scheduled). Writes them, runs both paths."""
        rows = [r for r in range(3) if new_tokens[r]]
        starts, seq_lens = [0], []
        for r in rows:
            starts.append(starts[-1] + new_tokens[r])
            lengths[r] += new_tokens[r]
            seq_lens.append(lengths[r])
        T = starts[-1]
        key = torch.randn(T, HKV, D, generator=generator).to(DEVICE)
        value = torch.randn(T, HKV, D, generator=generator).to(DEVICE)
        query = torch.randn(T, HQ, D, generator=generator).to(DEVICE)
        slots = torch.cat([
            table[r].long()[torch.arange(lengths[r] - new_tokens[r], lengths[r], device=DEVICE) // P] * P
            + torch.arange(lengths[r] - new_tokens[r], lengths[r], device=DEVICE) % P for r in rows
        ])
        write_tokens(key_pages, value_pages, key, value, slots)
        tables = table[rows]
        owners = tables[:, 0].tolist()
        new = [owners[i] for i, r in enumerate(rows) if new_tokens[r] == lengths[r]]
        states.forget(torch.tensor(new, device=DEVICE, dtype=torch.long))  # what the CUDA builder does
        slow.forget(new)  # what the CPU backend does
        got, want = torch.zeros(T, HQ, D, device=DEVICE), torch.zeros(T, HQ, D, device=DEVICE)
        fast.run_paged(LAYER, query, key_pages, value_pages, Rows(starts, seq_lens, tables), got, dense_below, states)
        slow.run(LAYER, query, key_pages, value_pages, Rows(starts, seq_lens, tables, owners), want, dense_below)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)

    step([40, 70, 20])  # a first chunk under the crossover (dense), a long prompt, a short prompt
    step([30, 0, 0])  # the second chunk reaches the crossover: TCA
    for _ in range(20):  # decode steps: two with states, one dense, windows moving
        step([1, 1, 1])
    lengths[2] = 0  # row 2's sequence ends; a new one starts on its pages
    step([1, 1, 60])
    for _ in range(5):
        step([1, 1, 1])
    usage = states.usage[0].tolist()
    assert usage[0] == 2 * 26 + 5  # decode rows with a state: rows 0 and 1 every step, row 2's new one after
    assert 0 < usage[2] < usage[1]

"""The paged decode step (states in page-shaped pools): the three Triton kernels against the PyTorch step on the same
pages, step by step across window moves, and both against exact attention for rows with no state, a stale state
and padding rows. The Triton kernels run in the interpreter lane (float32) and on a GPU.

Shape letters: R rows, HQ query heads, HKV KV heads, D head dim, NP pages, P page size, b block size, w window.
"""

from __future__ import annotations

import pytest
import torch

from tca.backends.common.paged_decode_torch import paged_decode_torch, store_state
from tca.geometry import window_start
from tca.serving.vllm.sequence import SequenceState

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def triton_step(*args, **kwargs):
    """The kernels (3 splits per row and head)."""
    pytest.importorskip("triton")
    if DEVICE == "cpu":
        from tca.backends.common.environment import triton_interpret

        if not triton_interpret():
            pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1")
    from tca.backends.common.paged_decode import paged_decode

    return paged_decode(*args, splits=3, **kwargs)


def torch_step(*args, **kwargs):
    return paged_decode_torch(*args, **kwargs)


STEPS = [pytest.param(triton_step, id="triton", marks=pytest.mark.triton), pytest.param(torch_step, id="torch")]


def random_state(L: int, HKV: int, b: int, w: int, generator) -> SequenceState:
    """Kept global positions drawn at random before lo(L - 1), a different number per head."""
    lo = window_start(L - 1, b, w)
    rows, counts = [], []
    for _ in range(HKV):
        n = int(torch.randint(0, lo + 1, (), generator=generator))
        rows.append(torch.randperm(lo, generator=generator)[:n].sort().values)
        counts.append(n)
    width = max(counts)
    positions = torch.full((HKV, width), -1, dtype=torch.int64)
    for h, row in enumerate(rows):
        positions[h, : len(row)] = row
    return SequenceState(L, lo, positions.to(DEVICE), torch.tensor(counts, device=DEVICE))


def exact(query, keys, values, scale):
    """query [HQ, D] over keys/values [HKV, L, D] -> [HQ, D]."""
    G = query.shape[0] // keys.shape[0]
    k, v = keys.repeat_interleave(G, 0), values.repeat_interleave(G, 0)
    weights = (torch.einsum("hd,hld->hl", query, k) * scale).softmax(-1)
    return torch.einsum("hl,hld->hd", weights, v)


@pytest.mark.triton
@pytest.mark.parametrize("lengths, steps, D", [((150, 97, 41), 40, 16), ((70, 200), 24, 24)])
def test_the_kernels_equal_the_torch_step(lengths, steps, D):
    """Random states, a row with none, steps across window moves: the Triton kernels and the PyTorch step (checked
    against tca.decode in tests/serving/test_vllm_sequence.py) give the same outputs, pools and counters; the row
    with no state is exact attention. D = 24: a head dim that is not a power of two (the kernels pad it)."""
    generator = torch.Generator().manual_seed(sum(lengths))
    HQ, HKV, P, b, w = 4, 2, 16, 16, 32
    scale = D**-0.5
    R = len(lengths)
    pages_per_row = -(-(max(lengths) + steps) // P)
    NP = R * pages_per_row + 3
    key_pages = torch.randn(NP, HKV, P, D, generator=generator).to(DEVICE)
    value_pages = torch.randn(NP, HKV, P, D, generator=generator).to(DEVICE)
    order = torch.randperm(NP - 1, generator=generator)[: R * pages_per_row] + 1  # page 0: nobody's
    block_table = order.view(R, pages_per_row).to(DEVICE, torch.int32)
    keep = torch.tensor([3, 5], dtype=torch.int32, device=DEVICE)
    pools = [torch.full((NP, HKV, P), -7, dtype=torch.int32, device=DEVICE),
             torch.full((NP, HKV), -1, dtype=torch.int32, device=DEVICE),
             torch.zeros(NP, dtype=torch.int32, device=DEVICE)]
    for r, L in enumerate(lengths[:-1]):  # the last row has no state
        state = random_state(L, HKV, b, w, generator)
        store_state(*pools, block_table[r], state.positions, state.counts, L)
    twin = [t.clone() for t in pools]
    usage, twin_usage = (torch.zeros(3, dtype=torch.int64, device=DEVICE) for _ in range(2))
    seq_lens = torch.tensor(lengths, device=DEVICE, dtype=torch.int32)
    for _ in range(steps):
        seq_lens += 1
        query = torch.randn(R, HQ, D, generator=generator).to(DEVICE)
        for r in range(R):  # the new token's key and value, as the engine writes them before attention
            i = int(seq_lens[r]) - 1
            page = block_table[r, i // P]
            key_pages[page, :, i % P] = torch.randn(HKV, D, generator=generator).to(DEVICE)
            value_pages[page, :, i % P] = torch.randn(HKV, D, generator=generator).to(DEVICE)
        got = triton_step(query, key_pages, value_pages, block_table, seq_lens, *pools, keep, usage, b, w, scale)
        want = torch_step(query, key_pages, value_pages, block_table, seq_lens, *twin, keep, twin_usage, b, w, scale)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        r = R - 1
        i = int(seq_lens[r])
        pages = block_table[r].long()[torch.arange(i, device=DEVICE) // P]
        keys = key_pages[pages, :, torch.arange(i, device=DEVICE) % P].transpose(0, 1)
        values = value_pages[pages, :, torch.arange(i, device=DEVICE) % P].transpose(0, 1)
        torch.testing.assert_close(got[r], exact(query[r], keys, values, scale), atol=2e-5, rtol=2e-5)
    positions, counts, covered = pools
    assert torch.equal(counts, twin[1]) and torch.equal(covered, twin[2]) and torch.equal(usage, twin_usage)
    for r in range(R - 1):  # the same kept positions, in the same order
        owner = int(block_table[r, 0])
        for h in range(HKV):
            entries = torch.arange(int(counts[owner, h]), device=DEVICE)
            where = (block_table[r].long()[entries // P], h, entries % P)
            assert torch.equal(positions[where], twin[0][where])
    decodes, dense, read = usage.tolist()
    token_bytes = 2 * D * 4
    assert decodes == steps * (R - 1)
    assert dense == sum(sum(range(L + 1, L + steps + 1)) for L in lengths[:-1]) * HKV * token_bytes
    assert 0 < read < dense


@pytest.mark.parametrize("step", STEPS)
def test_a_state_that_does_not_end_where_the_step_starts_is_not_continued(step):
    """A state covering other than seq_len - 1 tokens (one an earlier sequence left on the page): exact attention,
    and the state stays as it was."""
    HQ, HKV, D, P = 4, 2, 16, 16
    generator = torch.Generator().manual_seed(0)
    key_pages = torch.randn(4, HKV, P, D, generator=generator).to(DEVICE)
    value_pages = torch.randn(4, HKV, P, D, generator=generator).to(DEVICE)
    block_table = torch.tensor([[1, 2, 3]], dtype=torch.int32, device=DEVICE)
    positions = torch.zeros(4, HKV, P, dtype=torch.int32, device=DEVICE)
    counts = torch.full((4, HKV), -1, dtype=torch.int32, device=DEVICE)
    covered = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    store_state(positions, counts, covered, block_table[0], torch.tensor([[0, 5], [3, -1]], device=DEVICE),
                torch.tensor([2, 1], device=DEVICE), 40)  # a state of 40 tokens
    usage = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    query = torch.randn(1, HQ, D, generator=generator).to(DEVICE)
    seq_len = 45  # not 41: this step does not continue that state
    out = step(query, key_pages, value_pages, block_table, torch.tensor([seq_len], device=DEVICE, dtype=torch.int32),
               positions, counts, covered, torch.tensor([2, 2], dtype=torch.int32, device=DEVICE), usage, 16, 32,
               D**-0.5)
    pages = block_table[0].long()[torch.arange(seq_len, device=DEVICE) // P]
    keys = key_pages[pages, :, torch.arange(seq_len, device=DEVICE) % P].transpose(0, 1)
    values = value_pages[pages, :, torch.arange(seq_len, device=DEVICE) % P].transpose(0, 1)
    torch.testing.assert_close(out[0], exact(query[0], keys, values, D**-0.5), atol=2e-5, rtol=2e-5)
    assert counts[1].tolist() == [2, 1] and int(covered[1]) == 40 and usage.tolist() == [0, 0, 0]


@pytest.mark.parametrize("step", STEPS)
def test_padding_rows_write_zeros(step):
    HQ, HKV, D, P = 4, 2, 16, 16
    key_pages = torch.randn(4, HKV, P, D, device=DEVICE)
    block_table = torch.tensor([[1, 2], [0, 0]], dtype=torch.int32, device=DEVICE)
    counts = torch.full((4, HKV), -1, dtype=torch.int32, device=DEVICE)
    covered = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    positions = torch.zeros(4, HKV, P, dtype=torch.int32, device=DEVICE)
    usage = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    query = torch.randn(2, HQ, D, device=DEVICE)
    out = step(query, key_pages, key_pages, block_table, torch.tensor([20, 0], device=DEVICE), positions, counts,
               covered, torch.tensor([2, 2], dtype=torch.int32, device=DEVICE), usage, 16, 32, 0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out[0]).all() and usage.tolist() == [0, 0, 0]  # a row with no state is not counted

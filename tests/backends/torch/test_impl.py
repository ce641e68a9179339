"""The `torch` backend (src/tca/backends/torch/) against the oracle, in the four layers of style.md.

1. attention given the same Selection (reference.select) vs reference.attend, per dtype, LSE, LQ < L;
2. selection equality vs reference.select on random fp64 inputs and on inputs with deliberate ties;
3. end to end through tca.attention(backend="torch") vs backend="reference" over the geometry grid;
4. prefill + decode vs reference.prefill / decode, step by step (outputs and cached positions);
plus a memory check at L = 16K (no op output of L x L size) with a timing against SDPA in the output.

Shape letters: B batch, HQ query heads, HKV key/value heads, L keys, LQ queries, D head dim, b block, w window.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import tca
from helpers import make_qkv, random_budgets
from tca import TCAConfig, reference
from tca.backends import registry
from tca.backends.common import selection_torch as torch_selection
from tca.backends.torch.impl import TorchBackend
from tca.budgets import dense_budgets
from tca.testing import assert_close, selection_difference

SCALE = 0.3


def _same_selection(actual, expected):
    assert torch.equal(actual.mask, expected.mask), selection_difference(actual, expected)
    assert torch.equal(actual.block_budgets, expected.block_budgets)
    assert actual.seq_len == expected.seq_len


# ------------------------------------------------------------------ registry


def test_runs_any_head_dim_on_the_cpu():
    spec = registry.get("torch")
    assert spec.load() is TorchBackend
    assert spec.reasons("cpu", torch.float32, 80) == []


# ------------------------------------------------------------------ layer 1: attention given a selection


ATTEND_CASES = [
    # (B, HQ, HKV, L, LQ, D, b, w)
    (2, 4, 2, 200, 200, 16, 16, 64),  # GQA, L does not divide b
    (1, 3, 3, 256, 256, 8, 16, 32),  # MHA, L divides b
    (1, 6, 2, 333, 100, 8, 32, 64),  # LQ < L
    (1, 4, 1, 130, 1, 8, 16, 32),  # one query row
    (1, 2, 2, 50, 50, 8, 16, 64),  # L <= w: no budgeted block
    (1, 2, 1, 700, 700, 8, 16, 16),  # w == b, many chunks
]


@pytest.mark.parametrize("case", ATTEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_attend_matches_reference_given_the_same_selection(case, dtype):
    B, HQ, HKV, L, LQ, D, b, w = case
    config = TCAConfig(block_size=b, window=w)
    q, k, v = make_qkv(B, HQ, HKV, L, D, LQ=LQ, dtype=dtype, seed=L + LQ)
    selection = reference.select(q, k, random_budgets(HKV, b, L), config, SCALE)
    out, lse = TorchBackend.attend(q, k, v, selection, SCALE, return_lse=True)
    ref_out, ref_lse = reference.attend(q, k, v, selection, SCALE, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (B, HQ, LQ)
    assert_close(out, ref_out, dtype, msg="out")
    assert_close(lse, ref_lse, dtype, lse=True, msg="lse")
    assert_close(TorchBackend.attend(q, k, v, selection, SCALE), ref_out, dtype, msg="out without lse")


def test_attend_with_a_hand_made_selection_everything_and_nothing():
    """Selections no top-t would make: every budgeted token (= dense causal) and none (= sliding window)."""
    B, HQ, HKV, L, D, b, w = 1, 4, 2, 160, 8, 16, 32
    q, k, v = make_qkv(B, HQ, HKV, L, D, seed=11)
    J = (L - 1) // b + 1 - w // b
    for fill in (True, False):
        mask = torch.full((B, HKV, J * b), fill)
        selection = tca.Selection(mask, mask.view(B, HKV, J, b).sum(-1), b, w, L)
        out = TorchBackend.attend(q, k, v, selection, SCALE)
        assert_close(out, reference.attend(q, k, v, selection, SCALE), torch.float64)
    dense = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=SCALE
    )
    mask = torch.ones(B, HKV, J * b, dtype=torch.bool)
    full = tca.Selection(mask, mask.view(B, HKV, J, b).sum(-1), b, w, L)
    assert_close(TorchBackend.attend(q, k, v, full, SCALE), dense, torch.float64)


# ------------------------------------------------------------------ layer 2: selection


SELECT_CASES = [
    # (B, HQ, HKV, L, D, b, w, alpha, mass_scale)
    (1, 4, 2, 150, 16, 16, 32, 0.5, "mean"),
    (2, 3, 3, 97, 8, 16, 16, 0.5, "none"),
    (1, 6, 2, 130, 8, 16, 48, 0.0, "mean"),
    (1, 2, 1, 600, 8, 32, 64, 1.0, "mean"),
    (1, 4, 4, 40, 8, 16, 64, 0.5, "mean"),  # L <= w: empty selection
]


def _tied_qkv(B, HQ, HKV, L, D, b, seed):
    """Small-integer q and k (exact dot products) with duplicated keys and a duplicated block: ties everywhere."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (B, HQ, L, D), generator=gen).double() * 0.5
    k = torch.randint(-2, 3, (B, HKV, L, D), generator=gen).double() * 0.5
    for _ in range(L // 3):
        src, dst = torch.randint(0, L, (2,), generator=gen).tolist()
        k[:, :, dst] = k[:, :, src]
    if L // b >= 3:
        k[:, :, 2 * b : 3 * b] = k[:, :, 0:b]
    v = torch.randn(B, HKV, L, D, generator=gen, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("case", SELECT_CASES)
@pytest.mark.parametrize("inputs", ["random", "ties", "zero_query"])
def test_selection_equals_reference(case, inputs):
    B, HQ, HKV, L, D, b, w, alpha, mass_scale = case
    config = TCAConfig(block_size=b, window=w, alpha=alpha, mass_scale=mass_scale)
    seed = L * 7 + b
    if inputs == "random":
        q, k, _ = make_qkv(B, HQ, HKV, L, D, seed=seed)
    else:
        q, k, _ = _tied_qkv(B, HQ, HKV, L, D, b, seed)
        if inputs == "zero_query":
            q[:, :, -1] = 0  # uniform importance: every block and token tied
    budgets = random_budgets(HKV, b, seed)
    expected = reference.select(q, k, budgets, config, SCALE)
    _same_selection(TorchBackend.select(q, k, budgets, config, SCALE), expected)
    indices, counts = TorchBackend.select_indices(q, k, budgets, config, SCALE)
    assert indices.dtype == torch.int32 and counts.dtype == torch.int32
    ref_indices, ref_counts = expected.padded_indices(fill=L)
    assert torch.equal(counts.long(), ref_counts)
    assert torch.equal(indices.long(), ref_indices)  # ascending, padded with L


def test_selection_with_underflowing_importance_equals_reference():
    """Huge logits: most importances are exactly 0, so blocks with M_j = 0 (H_j = 1) appear."""
    q, k, _ = _tied_qkv(1, 2, 1, 160, 8, 16, 3)
    config = TCAConfig(block_size=16, window=32)
    budgets = random_budgets(1, 16, 3)
    _same_selection(
        TorchBackend.select(q * 400, k, budgets, config, SCALE), reference.select(q * 400, k, budgets, config, SCALE)
    )


# ------------------------------------------------------------------ layer 3: end to end through tca.attention


E2E_CASES = [
    # (B, HQ, HKV, L, LQ, D, b, w)
    (1, 4, 2, 300, 300, 64, 16, 64),  # GQA, D 64, L % b != 0, L > w
    (2, 2, 2, 256, 256, 128, 32, 64),  # MHA, D 128, L % b == 0
    (1, 4, 1, 60, 60, 64, 16, 64),  # L <= w (SDPA fast path)
    (1, 4, 1, 64, 17, 64, 16, 64),  # L == w, LQ < L
    (1, 6, 3, 400, 37, 64, 32, 128),  # LQ < L, L > w
    (1, 2, 1, 129, 1, 128, 16, 32),  # LQ == 1
]


@pytest.mark.parametrize("case", E2E_CASES)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_end_to_end_matches_reference(case, layout):
    B, HQ, HKV, L, LQ, D, b, w = case
    config = TCAConfig(block_size=b, window=w)
    q, k, v = make_qkv(B, HQ, HKV, L, D, LQ=LQ, seed=L * 3 + LQ)
    budgets = random_budgets(HKV, b, L)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    kwargs = dict(budgets=budgets, config=config, layout=layout, return_lse=True)
    out, lse = tca.attention(q, k, v, backend="torch", **kwargs)
    ref_out, ref_lse = tca.attention(q, k, v, backend="reference", **kwargs)
    assert out.shape == q.shape
    assert_close(out, ref_out, torch.float64, msg="out")
    assert_close(lse, ref_lse, torch.float64, lse=True, msg="lse")
    plain = tca.attention(q, k, v, backend="torch", budgets=budgets, config=config, layout=layout)
    assert_close(plain, ref_out, torch.float64, msg="out without lse")


def test_end_to_end_float32_and_default_scale():
    config = TCAConfig(block_size=32, window=64)
    q, k, v = make_qkv(1, 9, 3, 500, 64, dtype=torch.float32, seed=4)
    out = tca.attention(q, k, v, config=config, backend="torch")
    assert_close(out, tca.attention(q, k, v, config=config, backend="reference"), torch.float32)


# ------------------------------------------------------------------ layer 4: prefill + decode


DECODE_CASES = [
    # (B, HQ, HKV, L, D, b, w, steps)
    (2, 4, 2, 100, 16, 16, 48, 70),  # several window moves, B > 1
    (1, 3, 3, 20, 8, 16, 64, 80),  # L < w: the ring grows, then the window starts moving
    (1, 6, 2, 64, 8, 16, 64, 40),  # L == w
    (1, 2, 1, 33, 8, 16, 16, 50),  # w == b: a move every b steps
]


@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("budget_kind", ["random", "per_head_different"])
def test_prefill_and_decode_match_reference_step_by_step(case, budget_kind):
    B, HQ, HKV, L, D, b, w, steps = case
    config = TCAConfig(block_size=b, window=w)
    q, k, v = make_qkv(B, HQ, HKV, L, D, seed=L + steps)
    budgets = random_budgets(HKV, b, steps)
    if budget_kind == "per_head_different":
        one_hot = torch.zeros(HKV, budgets.shape[-1], dtype=torch.float64)
        one_hot[torch.arange(HKV), torch.arange(HKV) % budgets.shape[-1]] = 1.0  # t = 1, 2, 4, ... per head
        budgets = one_hot
    out, cache = tca.prefill(q, k, v, budgets=budgets, config=config, scale=SCALE, backend="torch")
    ref_out, ref_cache = tca.prefill(q, k, v, budgets=budgets, config=config, scale=SCALE, backend="reference")
    assert_close(out, ref_out, torch.float64, msg="prefill")
    gen = torch.Generator().manual_seed(case[3])
    moves = 0
    for step in range(steps):
        qs = torch.randn(B, HQ, 1, D, generator=gen, dtype=torch.float64)
        ks = torch.randn(B, HKV, 1, D, generator=gen, dtype=torch.float64)
        vs = torch.randn(B, HKV, 1, D, generator=gen, dtype=torch.float64)
        moves += any(cache._leaving_host())
        out = tca.decode(qs, ks, vs, cache)
        assert_close(out, tca.decode(qs, ks, vs, ref_cache), torch.float64, msg=f"step {step}")
        for bi in range(B):
            for h in range(HKV):
                assert cache.positions_of(bi, h).tolist() == ref_cache.positions[bi][h].tolist(), (step, bi, h)
        assert torch.equal(cache.lengths.cpu(), ref_cache.lengths) and cache.used_nbytes == ref_cache.nbytes
    assert moves >= 2


def test_dense_budgets_prefill_and_decode_equal_dense_attention():
    B, HQ, HKV, L, D, b, w = 1, 4, 2, 90, 16, 16, 32
    config = TCAConfig(block_size=b, window=w)
    gen = torch.Generator().manual_seed(21)
    total = L + 40
    q = torch.randn(B, HQ, total, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, HKV, total, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, HKV, total, D, generator=gen, dtype=torch.float64)
    dense = reference.dense_causal_attention(q, k, v, SCALE)
    budgets = dense_budgets(b)
    out, cache = tca.prefill(
        q[:, :, :L], k[:, :, :L], v[:, :, :L], budgets=budgets, config=config, scale=SCALE, backend="torch"
    )
    assert_close(out, dense[:, :, :L], torch.float64)
    for i in range(L, total):
        out = tca.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache)
        assert_close(out, dense[:, :, i : i + 1], torch.float64, msg=f"position {i}")
    assert cache.lengths.eq(total).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_in_low_precision_matches_reference(dtype):
    B, HQ, HKV, L, D, b, w = 1, 4, 2, 80, 16, 16, 32
    config = TCAConfig(block_size=b, window=w)
    q, k, v = make_qkv(B, HQ, HKV, L + 40, D, dtype=dtype, seed=31)
    budgets = random_budgets(HKV, b, 31)
    _, cache = tca.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], budgets=budgets, config=config, backend="torch")
    _, ref_cache = tca.prefill(
        q[:, :, :L], k[:, :, :L], v[:, :, :L], budgets=budgets, config=config, backend="reference"
    )
    assert cache.dtype == dtype
    for i in range(L, L + 40):
        args = (q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1])
        assert_close(tca.decode(*args, cache), tca.decode(*args, ref_cache), dtype, msg=f"position {i}")


# ------------------------------------------------------------------ memory: no L x L tensor


class _LargestOutput(TorchFunctionMode):
    """Records the largest number of elements of any tensor a torch function returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


def test_long_prefill_allocates_nothing_quadratic(capsys):
    """L = 16K, b = 128, w = 1024: no intermediate is larger than the inputs (a chunk holds G R x (N + w + R))."""
    L, b, w, HQ, HKV, D = 16384, 128, 1024, 3, 1, 64
    config = TCAConfig(block_size=b, window=w)
    q, k, v = make_qkv(1, HQ, HKV, L, D, dtype=torch.float32, seed=16)
    with _LargestOutput() as probe:
        start = time.perf_counter()
        out = TorchBackend.attention(q, k, v, tca.default_budgets(b).expand(HKV, -1), config, 1 / 8)
        ours = time.perf_counter() - start
    assert not torch.isnan(out).any()
    # Nothing bigger than q itself (L*HQ*D = 3.1M elements; a chunk's logits are ~1.3M; L*L would be 268M).
    assert probe.largest <= q.numel(), f"an intermediate of {probe.largest} elements (q: {q.numel()}, L*L = {L * L})"
    start = time.perf_counter()
    F.scaled_dot_product_attention(q, k.expand(-1, HQ, -1, -1), v.expand(-1, HQ, -1, -1), is_causal=True)
    sdpa = time.perf_counter() - start
    with capsys.disabled():
        print(
            f"\n[torch backend] L={L} b={b} w={w} HQ={HQ}: {ours:.2f} s (largest tensor {probe.largest:,} elements); SDPA causal {sdpa:.2f} s"
        )


# ------------------------------------------------------------------ CUDA (the GPU machine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_prefill_and_decode_match_reference_on_cpu(dtype):
    """The same function on CUDA: selection equal to the CPU reference's (fp32 scores), outputs within tolerance."""
    B, HQ, HKV, L, D, b, w = 2, 8, 2, 1100, 64, 64, 256
    config = TCAConfig(block_size=b, window=w)
    q, k, v = make_qkv(B, HQ, HKV, L + 80, D, dtype=dtype, seed=41)
    budgets = random_budgets(HKV, b, 41)
    prompt = [t[:, :, :L] for t in (q, k, v)]
    out, cache = tca.prefill(*(t.cuda() for t in prompt), budgets=budgets, config=config, backend="torch")
    ref_out, ref_cache = tca.prefill(*prompt, budgets=budgets, config=config, backend="reference")
    assert out.is_cuda and cache.device.type == "cuda"
    assert_close(out.cpu(), ref_out, dtype, msg="prefill")
    for i in range(L, L + 80):
        step = [t[:, :, i : i + 1] for t in (q, k, v)]
        got = tca.decode(*(t.cuda() for t in step), cache)
        assert_close(got.cpu(), tca.decode(*step, ref_cache), dtype, msg=f"position {i}")
    for bi in range(B):
        for h in range(HKV):
            assert cache.positions_of(bi, h).cpu().tolist() == ref_cache.positions[bi][h].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_priority_with_tiny_nonzero_importance_equals_reference(dtype):
    """Blocks whose scores are tiny but not zero (sum s^2 would underflow): both evaluate H on s / max s, no NaN."""
    tiny = torch.finfo(dtype).tiny
    importance = torch.rand(1, 2, 64, dtype=dtype, generator=torch.Generator().manual_seed(0))
    importance[..., :16] *= tiny ** 0.5 * 1e-3  # block 0: squares underflow, mass does not
    importance[..., 16:32] = 0  # block 1: M = 0, H = 1
    ours = torch_selection.block_priority(importance, 4, 16, 0.5, "mean")
    ref = reference.block_priority(importance, 4, 16, 0.5, "mean")
    assert not torch.isnan(ours).any()
    assert torch.equal(ours, ref)

"""Layer 3: the Triton selection (Eqs. 5-8) against the reference on well-separated scores.

Inputs are built so that importance values are far apart (no near-ties at a top-t boundary): every query of a
group points along the first axis, and the keys' first coordinates are a shuffled arithmetic progression.
Shape letters: B, HQ, HKV, L, D, b block size, w window, J budgeted blocks.
"""

from __future__ import annotations

import pytest
import torch

from helpers import require_triton
from tca import reference
from tca.backends.common import compact
from tca.budgets import default_budgets, dense_budgets, log_gaussian_budgets
from tca.config import TCAConfig
from tca.testing import selection_difference

pytestmark = pytest.mark.triton
DEVICE = require_triton()
CUDA = DEVICE == "cuda"
from tca.backends.triton import ops  # noqa: E402


def separated_inputs(B, HQ, HKV, L, D, seed):
    """q [B, HQ, 1, D], k [B, HKV, L, D]: scale * q_last . k_l are distinct, at least 0.01 apart."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, HKV, L, D, generator=gen) * 0.1
    for bi in range(B):
        for h in range(HKV):
            k[bi, h, :, 0] = torch.randperm(L, generator=gen).float() * (4.0 / L)
    q = torch.zeros(B, HQ, 1, D)
    q[..., 0] = (1.0 + torch.rand(B, HQ, 1, generator=gen)) * D**0.5  # positive: same order for every head
    return q.to(DEVICE), k.to(DEVICE)


@pytest.mark.parametrize(
    "B,HQ,HKV,L,b,w,mass_scale",
    [
        (1, 4, 2, 300, 32, 64, "mean"),
        (2, 2, 2, 256, 32, 96, "mean"),
        (1, 3, 1, 333, 16, 64, "none"),
        (1, 4, 2, 97, 16, 64, "mean"),
    ],
)
@pytest.mark.parametrize("budget", ["default", "random", "dense"])
def test_selection_matches_reference(B, HQ, HKV, L, b, w, mass_scale, budget):
    D = 64
    config = TCAConfig(block_size=b, window=w, mass_scale=mass_scale)
    q, k = separated_inputs(B, HQ, HKV, L, D, seed=L + b)
    if budget == "default":
        p = default_budgets(b).expand(HKV, -1)
    elif budget == "dense":
        p = dense_budgets(b).expand(HKV, -1)
    else:
        p = torch.stack([log_gaussian_budgets(1.0 + h, 1.0, b) for h in range(HKV)])
    p = p.to(DEVICE).contiguous()
    mine = ops.TritonBackend.select(q, k, p, config, D**-0.5)
    ref = reference.select(q.double(), k.double(), p, config, D**-0.5)
    assert torch.equal(mine.mask.cpu(), ref.mask.cpu()), selection_difference(mine, ref)
    assert torch.equal(mine.block_budgets.cpu(), ref.block_budgets.cpu())
    indices, counts = ops.select_indices(q, k, p, config, D**-0.5)
    compact.check(indices.cpu(), counts.cpu(), L)  # ascending, padded with L
    assert torch.equal(compact.to_selection(indices.cpu(), counts.cpu(), b, w, L).mask, ref.mask.cpu())


def test_selection_with_tiny_mass_blocks_matches_reference():
    """Blocks whose scores are ~1e-26 (sum s^2 would underflow in fp32): the Herfindahl index is evaluated on
    s / max s as in the reference, never NaN (which would rank those blocks first)."""
    B, HQ, HKV, L, D, b, w = 1, 2, 1, 160, 64, 16, 64
    config = TCAConfig(block_size=b, window=w)
    q, k = separated_inputs(B, HQ, HKV, L, D, seed=5)
    k[..., : 3 * b, 0] -= 60.0 / q[0, 0, 0, 0].item() * D**0.5  # blocks 0-2: logits about 60 below the rest
    p = default_budgets(b).to(DEVICE).expand(HKV, -1).contiguous()
    mine = ops.TritonBackend.select(q, k, p, config, D**-0.5)
    ref = reference.select(q.double(), k.double(), p, config, D**-0.5)
    assert torch.equal(mine.block_budgets.cpu(), ref.block_budgets.cpu())
    assert torch.equal(mine.mask.cpu(), ref.mask.cpu()), selection_difference(mine, ref)


@pytest.mark.parametrize("tie", [False, True], ids=["random", "all-equal"])
@pytest.mark.parametrize("L,b,w", [(70, 16, 32), (1000, 16, 64), (2100, 32, 64)])
def test_device_selection_equals_the_torch_selection(L, b, w, tie):
    """Eq. 7 counts (float64 largest remainder), block ranks and the compact form, also when every priority and
    every budget fraction ties (ties to the smaller block, then to the larger retain count)."""
    from tca.backends.common import selection_torch, selection_triton

    config = TCAConfig(block_size=b, window=w)
    K = b.bit_length()
    gen = torch.Generator().manual_seed(L)
    budgets = torch.full((2, K), 1.0 / K, dtype=torch.float64) if tie else torch.rand(2, K, generator=gen,
                                                                                       dtype=torch.float64)
    budgets /= budgets.sum(-1, keepdim=True)
    q = torch.randn(1, 6, 1, 16, generator=gen)
    if tie:  # whole-number queries: every logit is exactly equal, whatever order a matrix product sums in
        q = q.mul(3).round()
    k = torch.ones(1, 2, L, 16) if tie else torch.randn(1, 2, L, 16, generator=gen)
    q, k, budgets = q.to(DEVICE), k.to(DEVICE), budgets.to(DEVICE)
    sel = selection_triton.select_on_device(q, k, budgets, config, 0.25)
    mask, per_block = selection_torch.select_parts(q, k, budgets, config, 0.25)
    assert torch.equal(sel["keep"].long(), per_block)
    assert torch.equal(selection_triton.to_selection(sel, config, L).mask, mask)
    counts = mask.sum(-1)
    assert torch.equal(sel["counts"].long(), counts)
    for h in range(2):
        n = int(counts[0, h])
        assert torch.equal(sel["indices"][0, h, :n].long(), mask[0, h].nonzero()[:, 0])
        assert bool((sel["indices"][0, h, n:] == L).all())


def test_device_selection_is_five_kernels_and_no_torch_compute(monkeypatch):
    """The selection runs five kernels and, between them, only allocates (no torch kernel launches)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tca.backends.common import kernels_selection, selection_triton

    launches, inside = [], []

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(self.kernel)
                inside.append(True)
                try:
                    return self.kernel[grid](*args, **kwargs)
                finally:
                    inside.pop()
            return launch

    for name in ("last_query_logits_kernel", "row_stats_kernel", "block_scores_kernel", "block_keep_kernel",
                 "compact_kernel"):
        monkeypatch.setattr(kernels_selection, name, Counted(getattr(kernels_selection, name)))
    ALLOCATION = {"empty.memory_format", "empty_strided.default", "empty_like.default", "_to_copy.default",
                  "select.int", "slice.Tensor", "view.default", "alias.default"}
    computed = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside and func._opname + "." + func._overloadname not in ALLOCATION:
                computed.append(str(func))
            return func(*args, **(kwargs or {}))

    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    k = torch.randn(1, 2, 600, 16, device=DEVICE)
    budgets = default_budgets(16).expand(2, -1).contiguous().to(DEVICE)
    with Ops():
        selection_triton.select_on_device(q, k, budgets, TCAConfig(block_size=16, window=64), 0.25)
    assert len(launches) == 5
    assert not computed, computed

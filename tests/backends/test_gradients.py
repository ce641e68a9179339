"""Gradients: every backend that declares them matches the reference's (fp64, tiny shapes, outputs and LSE); every
backend that lacks them refuses inputs that require grad with its reason, and backend="auto" passes it over.

Shape letters: B batch, HQ query heads, HKV key/value heads, L keys, LQ queries, D head dim.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import tca
from helpers import make_qkv, random_budgets
from tca.backends import registry, routing

CONFIG = tca.TCAConfig(block_size=16, window=32)
WITH_GRADIENTS = [n for n in registry.names() if n != "reference" and registry.get(n).supports("gradients")]
WITHOUT_GRADIENTS = [n for n in registry.names() if not registry.get(n).supports("gradients")]


def _grads(backend, q, k, v, budgets, return_lse):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    result = tca.attention(q, k, v, budgets=budgets, config=CONFIG, backend=backend, return_lse=return_lse)
    out, lse = result if return_lse else (result, None)
    gen = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    if lse is not None:
        loss = loss + (lse * torch.randn(lse.shape, generator=gen, dtype=lse.dtype)).sum()
    return torch.autograd.grad(loss, (q, k, v))


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("HQ,HKV,L,LQ", [(4, 2, 100, 100), (4, 2, 100, 9), (2, 2, 30, 30), (8, 1, 70, 1)])
@pytest.mark.parametrize("backend", WITH_GRADIENTS)
def test_gradients_match_the_reference(backend, HQ, HKV, L, LQ, return_lse):
    if registry.get(backend).reasons("cpu", torch.float64, 16):
        pytest.skip(f"{backend} cannot run fp64 on the CPU here")
    q, k, v = make_qkv(1, HQ, HKV, L, 16, LQ=LQ, seed=L + LQ)
    budgets = random_budgets(HKV, 16, seed=L)
    got = _grads(backend, q, k, v, budgets, return_lse)
    want = _grads("reference", q, k, v, budgets, return_lse)
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", ["reference", *WITH_GRADIENTS])
def test_gradcheck_against_finite_differences(backend):
    """The selection is piecewise constant in the inputs (random inputs sit far from its ties), so the gradient
    is that of Eq. 2 with the selection fixed: finite differences must agree."""
    q, k, v = make_qkv(1, 2, 1, 40, 8, LQ=5, seed=3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        return tca.attention(q, k, v, config=CONFIG, backend=backend, return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("backend", WITHOUT_GRADIENTS)
def test_backends_without_gradients_refuse_inputs_that_require_grad(backend):
    q, k, v = make_qkv(1, 2, 1, 40, 16, dtype=torch.float32)
    q.requires_grad_()
    with pytest.raises(tca.BackendUnavailableError, match="no gradients: .*backward"):
        tca.attention(q, k, v, config=CONFIG, backend=backend)


def test_auto_picks_a_backend_with_gradients():
    q, k, v = make_qkv(1, 2, 1, 40, 16, dtype=torch.float32)
    k.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tca.BackendChoiceWarning)
        out = tca.attention(q, k, v, config=CONFIG)
        chosen = routing.resolve("auto", "cpu", torch.float32, 16, needs=("gradients",))
    assert out.grad_fn is not None
    assert chosen.supports("gradients")

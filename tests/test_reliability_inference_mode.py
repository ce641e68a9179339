"""Caches filled under torch.inference_mode() and continued outside it (or back and forth) through tca.decode and
the chunked prefill: the same outputs as a run that never entered inference mode, and as the reference.

Shape letters: B batch, HQ query heads, HKV key/value heads, L keys, D head dim.
"""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import make_qkv, random_budgets

CONFIG = tca.TCAConfig(block_size=16, window=32)
B, HQ, HKV, D = 1, 4, 2, 16
PROMPT, STEPS = 40, 10  # positions 40 .. 49: the window moves at 48 and block [16, 32) is compressed
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]
POLICIES = [None, tca.Reselect(every=3)]


def _device(backend: str) -> str:
    if backend == "triton":
        from helpers import require_triton

        return require_triton()
    return "cpu"


def _generate(backend, policy, q, k, v, inference: list[bool]) -> list[torch.Tensor]:
    """Prefill PROMPT tokens, then decode one token per step; inference[0] is the prefill's mode, inference[s] the
    mode of step s. Returns every output."""
    budgets = random_budgets(HKV, CONFIG.block_size)
    with torch.inference_mode(inference[0]):
        out, cache = tca.prefill(q[:, :, :PROMPT], k[:, :, :PROMPT], v[:, :, :PROMPT], budgets=budgets,
                                 config=CONFIG, backend=backend, policy=policy)
    outs = [out]
    for s, i in enumerate(range(PROMPT, PROMPT + STEPS), start=1):
        with torch.inference_mode(inference[s]):
            outs.append(tca.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache, backend=backend))
        assert outs[-1].is_inference() == inference[s]
    return outs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", POLICIES, ids=["section5", "reselect"])
def test_prefilled_in_inference_mode_decodes_outside_it(backend, policy):
    device = _device(backend)
    q, k, v = make_qkv(B, HQ, HKV, PROMPT + STEPS, D, dtype=torch.float32, device=device)
    # prefill inside, decode outside, inside (a step may regrow buffers into inference tensors again), outside
    modes = [True] + [False] * 4 + [True] * 3 + [False] * (STEPS - 7)
    got = _generate(backend, policy, q, k, v, modes)
    want = _generate("reference", policy, *(t.cpu().double() for t in (q, k, v)), [False] * (STEPS + 1))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu().double(), w, atol=1e-5, rtol=1e-5)


def _chunked(mode, q, k, v, budgets, inference: bool):
    """The first 48 tokens (a chunk, or a whole prefill that a streaming prefill continues) in inference mode or
    not, the next 48 outside it, then one decode step outside it. Returns (the second chunk's output, the step's)."""
    with torch.inference_mode(inference):
        if mode == "continued":
            _, cache = tca.prefill(q[:, :, :48], k[:, :, :48], v[:, :, :48], budgets=budgets, config=CONFIG,
                                   backend="torch")
        else:
            state = tca.start_prefill(mode=mode, budgets=budgets, config=CONFIG, backend="torch")
            tca.prefill_chunk(q[:, :, :48], k[:, :, :48], v[:, :, :48], state)
    if mode == "continued":
        state = tca.start_prefill(mode="streaming", budgets=budgets, cache=cache, backend="torch")
    out = tca.prefill_chunk(q[:, :, 48:96], k[:, :, 48:96], v[:, :, 48:96], state)
    cache = tca.finish_prefill(state)
    step = tca.decode(q[:, :, 96:97], k[:, :, 96:97], v[:, :, 96:97], cache, backend="torch")
    assert not any(t.is_inference() for t in vars(cache).values() if isinstance(t, torch.Tensor))
    return out, step


@pytest.mark.parametrize("mode", ["exact", "streaming", "continued"])
def test_chunked_prefill_continues_outside_inference_mode(mode):
    """A chunk after a chunk run in inference mode, and a streaming prefill continuing a cache prefilled there,
    equal the same calls made outside inference mode; the exact one's last chunk and cache are the one-shot
    prefill's."""
    q, k, v = make_qkv(B, HQ, HKV, 97, D, dtype=torch.float32)
    budgets = random_budgets(HKV, CONFIG.block_size)
    got = _chunked(mode, q, k, v, budgets, inference=True)
    want = _chunked(mode, q, k, v, budgets, inference=False)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    if mode == "exact":
        out, cache = tca.prefill(q[:, :, :96], k[:, :, :96], v[:, :, :96], budgets=budgets, config=CONFIG,
                                 backend="reference")
        step = tca.decode(q[:, :, 96:97], k[:, :, 96:97], v[:, :, 96:97], cache)
        torch.testing.assert_close(got[0], out[:, :, 48:96])
        torch.testing.assert_close(got[1], step)

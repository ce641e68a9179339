"""tca.prefill(..., starts=...) on the CPU (docs/semantics.md section 9.1): a left-padded batch on a backend
without "varlen" (one sequence at a time), the layouts and policies it passes through, and clear errors for
starts that cannot describe left padding."""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import make_qkv
from tca import reference
from tca.backends.common.reselecting_cache import ReselectingCache
from tca.budgets import default_budgets
from tca.testing import assert_close

CONFIG = tca.TCAConfig(block_size=16, window=32)
STARTS = [0, 45, 100]


def _qkv(seed=0):
    return make_qkv(3, 4, 2, 130, 16, dtype=torch.float64, seed=seed)


def test_padded_prefill_on_torch_equals_the_reference_and_decodes_each_sequence():
    q, k, v = _qkv()
    out, cache = tca.prefill(q, k, v, config=CONFIG, backend="torch", starts=STARTS)
    budgets = default_budgets(16).expand(2, -1).to(torch.float64)
    ref_out, ref_caches = reference.prefill_padded(q, k, v, STARTS, budgets, CONFIG, 16**-0.5)
    assert_close(out, ref_out)
    assert cache.seq_lens == [130 - s for s in STARTS]
    nq, nk, nv = make_qkv(3, 4, 2, 20, 16, dtype=torch.float64, seed=1)
    for t in range(20):
        o = tca.decode(nq[:, :, t : t + 1], nk[:, :, t : t + 1], nv[:, :, t : t + 1], cache, backend="torch")
        for b in range(3):
            o_ref = reference.decode(
                nq[b : b + 1, :, t : t + 1], nk[b : b + 1, :, t : t + 1], nv[b : b + 1, :, t : t + 1], ref_caches[b]
            )
            assert_close(o[b : b + 1], o_ref, msg=f"step {t}, sequence {b}")


def test_starts_as_a_tensor_and_bshd_layout():
    q, k, v = _qkv()
    out, _ = tca.prefill(q, k, v, config=CONFIG, backend="torch", starts=STARTS)
    bshd = [x.transpose(1, 2) for x in (q, k, v)]
    out_bshd, cache = tca.prefill(*bshd, config=CONFIG, backend="torch", layout="bshd", starts=torch.tensor(STARTS))
    assert torch.equal(out_bshd.transpose(1, 2), out)
    assert cache.seq_lens == [130 - s for s in STARTS]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_padded_attention_one_sequence_at_a_time(backend):
    """Backends without "varlen" attend each sequence alone; padding rows get out 0 and lse -inf."""
    q, k, v = _qkv()
    out, lse = tca.attention(q, k, v, config=CONFIG, backend=backend, starts=STARTS, return_lse=True)
    for b, start in enumerate(STARTS):
        alone = (x[b : b + 1, :, start:] for x in (q, k, v))
        ref_out, ref_lse = tca.attention(*alone, config=CONFIG, backend="reference", return_lse=True)
        assert_close(out[b : b + 1, :, start:], ref_out)
        assert_close(lse[b : b + 1, :, start:], ref_lse, lse=True)
        assert torch.count_nonzero(out[b, :, :start]) == 0 and bool((lse[b, :, :start] == float("-inf")).all())


def test_padded_attention_needs_whole_prompts():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="whole prompts"):
        tca.attention(q[:, :, -10:], k, v, config=CONFIG, backend="torch", starts=STARTS)


def test_padded_attention_with_gradients_takes_a_backend_with_a_backward_pass():
    q, k, v = (x.float().requires_grad_() for x in _qkv())
    out = tca.attention(q, k, v, config=CONFIG, starts=STARTS)
    out.sum().backward()
    assert q.grad is not None and torch.count_nonzero(q.grad[1, :, :45]) == 0


def test_padded_prefill_with_gradients_takes_a_backend_with_a_backward_pass():
    q, k, v = (x.float().requires_grad_() for x in _qkv())
    out, _ = tca.prefill(q, k, v, config=CONFIG, starts=STARTS)
    out.sum().backward()
    assert q.grad is not None and torch.count_nonzero(q.grad[2, :, :100]) == 0


def test_padded_prefill_on_the_reference_is_refused_before_any_work():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="packed cache"):
        tca.prefill(q, k, v, config=CONFIG, backend="reference", starts=STARTS)


def test_numpy_starts_are_accepted():
    np = pytest.importorskip("numpy")
    q, k, v = _qkv()
    _, cache = tca.prefill(q, k, v, config=CONFIG, backend="torch", starts=np.array(STARTS))
    assert cache.seq_lens == [130 - s for s in STARTS]


def test_no_padding_is_the_plain_prefill():
    q, k, v = _qkv()
    out, cache = tca.prefill(q, k, v, config=CONFIG, backend="torch", starts=[0, 0, 0])
    out_plain, cache_plain = tca.prefill(q, k, v, config=CONFIG, backend="torch")
    assert torch.equal(out, out_plain)
    assert torch.equal(cache.lengths, cache_plain.lengths)


def test_padded_prefill_with_reselection_keeps_every_sequence_evicted_tokens():
    q, k, v = _qkv()
    _, cache = tca.prefill(q, k, v, config=CONFIG, backend="torch", starts=STARTS, policy=tca.Reselect(every=4))
    assert isinstance(cache, ReselectingCache)
    assert cache.seq_lens == [130 - s for s in STARTS]


@pytest.mark.parametrize(
    "starts, match",
    [
        ([0, 45], "one int per sequence"),
        ([0, 45, 130], r"in \[0, 130\)"),
        ([0, -1, 3], r"in \[0, 130\)"),
        ([0, 1.5, 3], "one int per sequence"),
        (torch.tensor([0.0, 1.0, 2.0]), "1D integer tensor"),
        (torch.zeros(3, 1, dtype=torch.long), "1D integer tensor"),
    ],
)
def test_bad_starts_are_refused_with_what_was_expected(starts, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        tca.prefill(q, k, v, config=CONFIG, backend="torch", starts=starts)

"""Every bad input raises the right exception type with a message that helps.

Shape letters: B batch, HQ query heads, HKV KV heads, L keys, LQ queries, D head dim.
"""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import make_qkv

CFG = tca.TCAConfig(block_size=16, window=32)


def qkv(HQ=4, HKV=2, L=40, D=8, LQ=None, dtype=torch.float32):
    return make_qkv(1, HQ, HKV, L, D, LQ=LQ, dtype=dtype, seed=0)


def run(q, k, v, **kwargs):
    kwargs.setdefault("config", CFG)
    kwargs.setdefault("backend", "reference")
    return tca.attention(q, k, v, **kwargs)


# ---- tensors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("rank", [2, 3, 5])
def test_wrong_rank(which, rank):
    tensors = list(qkv())
    t = tensors[which]
    tensors[which] = t.reshape(*t.shape[: rank - 1], -1) if rank < 4 else t[None]
    with pytest.raises(ValueError, match="must have 4 dimensions"):
        run(*tensors)


def test_wrong_rank_names_the_layout():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"\[B, L, H, D\]"):
        run(q[0], k, v, layout="bshd")


def test_k_v_shape_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        run(q, k, v[:, :, :-1])


def test_batch_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="same batch size"):
        run(torch.cat([q, q]), k, v)


def test_head_dim_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="same head dim"):
        run(q[..., :4], k, v)


def test_v_head_dim_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        run(q, k, v[..., :4])


@pytest.mark.parametrize("HQ,HKV", [(3, 2), (4, 3), (2, 4)])
def test_query_heads_not_a_multiple_of_kv_heads(HQ, HKV):
    with pytest.raises(ValueError, match=rf"query heads \({HQ}\) must be a multiple of key/value heads \({HKV}\)"):
        run(*qkv(HQ=HQ, HKV=HKV))


@pytest.mark.parametrize("which", [1, 2])
def test_mixed_dtypes(which):
    tensors = list(qkv())
    tensors[which] = tensors[which].double()
    with pytest.raises(TypeError, match="share one dtype"):
        run(*tensors)


def test_mixed_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        run(q, k.to("meta"), v)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_dtypes(dtype):
    q, k, v = (t.to(dtype) for t in qkv())
    with pytest.raises(TypeError, match="floating-point"):
        run(q, k, v)


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        run(q.tolist(), k, v)


def test_more_queries_than_keys():
    q, k, v = qkv(LQ=41, L=40)
    with pytest.raises(ValueError, match=r"more queries \(41\) than keys \(40\)"):
        run(q, k, v)


@pytest.mark.parametrize("dim", ["B", "HQ", "LQ", "D", "HKV", "L"])
def test_zero_size_dimensions(dim):
    B, HQ, HKV, LQ, L, D = 1, 2, 1, 5, 5, 8
    sizes = dict(B=B, HQ=HQ, HKV=HKV, LQ=LQ, L=L, D=D)
    sizes[dim] = 0
    if dim == "HKV":
        sizes["HQ"] = 0  # keep the head check from firing first
    if dim == "L":
        sizes["LQ"] = 0
    q = torch.randn(sizes["B"], sizes["HQ"], sizes["LQ"], sizes["D"])
    k = torch.randn(sizes["B"], sizes["HKV"], sizes["L"], sizes["D"])
    with pytest.raises(ValueError, match="zero-size dimension"):
        run(q, k, k.clone())


def test_unknown_layout():
    with pytest.raises(ValueError, match=r"layout must be one of \('bhsd', 'bshd'\), got 'bsdh'"):
        run(*qkv(), layout="bsdh")


# ---- config -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b", [8, 24, 48, 512, 0, -16])
def test_block_size_not_a_power_of_two_in_range(b):
    with pytest.raises(ValueError, match="block_size must be a power of two in 16..256"):
        tca.TCAConfig(block_size=b, window=512)


@pytest.mark.parametrize("b", [16.0, "16", True, None])
def test_block_size_not_an_int(b):
    with pytest.raises(TypeError, match="block_size must be an int"):
        tca.TCAConfig(block_size=b, window=64)


@pytest.mark.parametrize("w", [40, 8, 0, -32, 17])
def test_window_not_a_multiple_of_block_size(w):
    with pytest.raises(ValueError, match=r"window must be a positive multiple of block_size \(16\)"):
        tca.TCAConfig(block_size=16, window=w)


@pytest.mark.parametrize("alpha", [-0.1, 1.01, float("nan"), float("inf"), "0.5", None])
def test_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        tca.TCAConfig(alpha=alpha)


@pytest.mark.parametrize("tau", [0.0, -0.5, 1.0001, float("nan")])
def test_tau_outside_half_open_interval(tau):
    with pytest.raises(ValueError, match=r"tau must be a number in \(0, 1\]"):
        tca.TCAConfig(tau=tau)


def test_other_config_values():
    with pytest.raises(ValueError, match="mass_scale must be one of"):
        tca.TCAConfig(mass_scale="sum")
    with pytest.raises(ValueError, match="num_candidates must be an int >= 2"):
        tca.TCAConfig(num_candidates=1)
    with pytest.raises(ValueError, match="sigma must be a number > 0"):
        tca.TCAConfig(sigma=0.0)


def test_valid_config_edges():
    for b in (16, 32, 64, 128, 256):
        assert tca.TCAConfig(block_size=b, window=b, alpha=0, tau=1).window == b
    assert tca.TCAConfig(alpha=1.0).alpha == 1.0


def test_config_of_the_wrong_type():
    with pytest.raises(TypeError, match="config must be a tca.TCAConfig"):
        run(*qkv(), config={"block_size": 16})


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        CFG.block_size = 32


# ---- budgets ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4,), (6,), (3, 5), (1, 5), (2, 4), (2, 2, 5), ()])
def test_budgets_of_the_wrong_shape(shape):
    budgets = torch.ones(shape, dtype=torch.float64)
    budgets = budgets / budgets.sum(-1, keepdim=True) if budgets.dim() else budgets
    with pytest.raises(ValueError, match=r"budgets must have shape \[5\] or \[2, 5\]"):
        run(*qkv(), budgets=budgets)


def test_negative_budgets():
    with pytest.raises(ValueError, match="non-negative"):
        run(*qkv(), budgets=torch.tensor([-0.2, 0.2, 0.5, 0.25, 0.25]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_budgets(bad):
    with pytest.raises(ValueError, match="NaN or infinity"):
        run(*qkv(), budgets=torch.tensor([bad, 0.2, 0.3, 0.25, 0.25]))


@pytest.mark.parametrize("total", [0.9, 1.0002, 2.0])
def test_budgets_not_summing_to_one(total):
    budgets = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2 + total - 1]])
    with pytest.raises(ValueError, match=r"must sum to 1 \(within 0.0001\)"):
        run(*qkv(), budgets=budgets)


def test_budgets_summing_to_one_within_tolerance_are_accepted():
    budgets = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2 + 5e-5], dtype=torch.float64)
    out = run(*qkv(), budgets=budgets)
    assert torch.isfinite(out).all()


def test_budgets_of_the_wrong_type():
    with pytest.raises(TypeError, match="budgets must be None or a torch.Tensor"):
        run(*qkv(), budgets=[0.2] * 5)
    with pytest.raises(TypeError, match="budgets must be a floating-point tensor"):
        run(*qkv(), budgets=torch.tensor([0, 0, 0, 0, 1]))


# ---- other arguments and entry points -----------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), "0.1", True])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        run(*qkv(), scale=scale)


def test_return_lse_must_be_bool():
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        run(*qkv(), return_lse=1)


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'fastest'; known backends: .*reference"):
        run(*qkv(), backend="fastest")


def test_backend_not_a_string():
    with pytest.raises(TypeError, match="backend must be a string"):
        run(*qkv(), backend=None)


def test_prefill_needs_one_query_per_key():
    with pytest.raises(ValueError, match="LQ == L"):
        tca.prefill(*qkv(LQ=10), config=CFG, backend="reference")


def test_decode_errors():
    q, k, v = qkv()
    _, cache = tca.prefill(q, k, v, config=CFG, backend="reference")
    with pytest.raises(TypeError, match="cache must be a cache returned by tca.prefill"):
        tca.decode(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], object())
    with pytest.raises(ValueError, match="decode takes one new token"):
        tca.decode(q[:, :, -2:], k[:, :, -2:], v[:, :, -2:], cache)
    with pytest.raises(ValueError, match="the cache has 2 KV heads"):
        tca.decode(q[:, :, -1:], k[:, :1, -1:], v[:, :1, -1:], cache)
    with pytest.raises(TypeError, match="share one dtype"):
        tca.decode(q[:, :, -1:].double(), k[:, :, -1:], v[:, :, -1:], cache)
    with pytest.raises(ValueError, match="the cache has batch size 1 but the new token has 2"):
        tca.decode(*(torch.cat([t[:, :, -1:]] * 2) for t in (q, k, v)), cache)
    with pytest.raises(ValueError, match="the cache has head dim 8 but the new token has 4"):
        tca.decode(*(t[:, :, -1:, :4] for t in (q, k, v)), cache)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_decode_rejects_a_dtype_other_than_the_caches(backend):
    q, k, v = qkv()
    _, cache = tca.prefill(q, k, v, config=CFG, backend=backend)
    other = torch.float32 if q.dtype == torch.float64 else torch.float64
    with pytest.raises(ValueError, match="the cache holds dtype"):
        tca.decode(*(t[:, :, -1:].to(other) for t in (q, k, v)), cache)


def test_decode_rejects_another_number_of_query_heads():
    q, k, v = qkv()
    _, cache = tca.prefill(q, k, v, config=CFG, backend="reference")
    doubled = torch.cat([q[:, :, -1:]] * 2, dim=1)
    with pytest.raises(ValueError, match="number of query heads"):
        tca.decode(doubled, k[:, :, -1:], v[:, :, -1:], cache)


def test_budget_helpers_reject_bad_arguments():
    with pytest.raises(ValueError, match="sigma must be"):
        tca.log_gaussian_budgets(1.0, 0.0, 16)
    for make in (tca.default_budgets, tca.dense_budgets):
        with pytest.raises(ValueError, match="power of two in 16..256"):
            make(100)


def test_one_dimensional_budgets_of_the_wrong_length_report_the_given_shape():
    with pytest.raises(ValueError, match=r"got \(3,\)"):
        tca.attention(*qkv(), budgets=torch.ones(3) / 3, config=CFG, backend="reference")


def test_sequence_first_tensors_get_a_layout_hint():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="layout='bshd'"):
        tca.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), config=CFG, backend="reference")


def test_scale_accepts_real_numbers_and_zero_dim_tensors():
    import numpy as np

    q, k, v = qkv()
    expected = tca.attention(q, k, v, scale=0.25, config=CFG, backend="reference")
    for scale in (np.float32(0.25), torch.tensor(0.25)):
        torch.testing.assert_close(tca.attention(q, k, v, scale=scale, config=CFG, backend="reference"), expected)


def test_budgets_are_checked_again_after_an_in_place_change():
    """check_budgets remembers a tensor it accepted (a model passes the same one every call), not its values."""
    from tca.validation import check_budgets

    config = tca.TCAConfig(block_size=16, window=32)
    budgets = tca.default_budgets(16).expand(2, -1).clone()
    first = check_budgets(budgets, 2, config, "cpu")
    assert check_budgets(budgets, 2, config, "cpu") is first
    budgets.mul_(2)  # now sums to 2
    with pytest.raises(ValueError, match="must sum to 1"):
        check_budgets(budgets, 2, config, "cpu")


def test_budgets_made_in_inference_mode_are_checked_every_call():
    """Inference tensors have no version counter: they are not remembered, and nothing made in inference mode
    is handed to a later call outside it."""
    from tca.validation import check_budgets

    config = tca.TCAConfig(block_size=16, window=32)
    with torch.inference_mode():
        budgets = tca.default_budgets(16).expand(2, -1).clone()
        inside = check_budgets(budgets, 2, config, "cpu")
        assert check_budgets(None, 2, config, "cpu").is_inference()
    outside = check_budgets(budgets, 2, config, "cpu")
    assert torch.equal(inside, outside) and not check_budgets(None, 2, config, "cpu").is_inference()
    q, k, v = make_qkv(1, 4, 2, 100, 16, dtype=torch.float32, seed=1)
    with torch.inference_mode():
        tca.prefill(q, k, v, budgets=budgets, config=config, backend="torch")
    tca.prefill(q, k, v, budgets=budgets, config=config, backend="torch")

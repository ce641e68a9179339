"""Routing (tca.backends.routing): one record of a call's inputs, one priority list per device and shape that
holds the crossover, dense attention as a registered backend, one bound choice that the cache keeps, and a
padded batch that never comes back up through the public API."""

from __future__ import annotations

import warnings

import pytest
import torch

import tca
from helpers import dense_causal, force_crossover, make_qkv
from tca.backends import registry, routing
from tca.backends.common import decode_torch
from tca.backends.common.dense_cache import DenseKVCache
from tca.backends.routing import Inputs
from tca.budgets import default_budgets

CONFIG = tca.TCAConfig(block_size=16, window=32)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tca.BackendChoiceWarning)
        yield


def test_the_phase_says_what_a_call_needs():
    assert Inputs(CPU, torch.float32, 16, "attention").needs == ()
    assert Inputs(CPU, torch.float32, 16, "prefill").needs == ("decode",)
    assert Inputs(CPU, torch.float32, 16, "chunked_prefill").needs == ("decode", "chunked_prefill")
    assert Inputs(CPU, torch.float32, 16, "calibration", gradients=True, lse=True).needs == (
        "calibration", "gradients", "lse")
    with pytest.raises(ValueError, match="unknown phase 'decoding'"):
        Inputs(CPU, torch.float32, 16, "decoding")


def test_inputs_of_tensors_record_heads_length_and_gradients():
    q, k, v = make_qkv(2, 6, 2, 40, 16, dtype=torch.float32, seed=0)
    inputs = Inputs.of(q, k, v, phase="prefill", padded=True)
    assert (inputs.query_heads, inputs.kv_heads, inputs.length, inputs.shape) == (6, 2, 40, (6, 2, 16))
    assert inputs.padded and not inputs.gradients
    assert Inputs.of(q.requires_grad_(), k, v).gradients
    with torch.no_grad():
        assert not Inputs.of(q, k, v).gradients


def test_the_priority_list_holds_the_crossover(monkeypatch):
    force_crossover(monkeypatch, 200)
    tca_order = registry.names()
    assert "dense" not in tca_order and "dense" in registry.names(every=True)
    short = Inputs(CPU, torch.float32, 16, "prefill", 4, 2, 150)
    assert routing.candidates(short) == ["dense", *tca_order]
    assert routing.candidates(Inputs(CPU, torch.float32, 16, "prefill", 4, 2, 300)) == tca_order
    # the crossover was measured on the first token's time: other phases keep the priority order
    assert routing.candidates(Inputs(CPU, torch.float32, 16, "calibration", 4, 2, 150)) == tca_order
    assert routing.candidates(Inputs(CPU, torch.float32, 16, "prefill")) == tca_order  # no length known


def test_from_flash_from_the_flash_backend_comes_first(monkeypatch):
    from tca.backends.crossover import Crossover

    table = Crossover(dense_below=0, flash_from=100, measured="test")
    monkeypatch.setattr("tca.backends.routing.crossover", lambda device, shape=None: table)
    order = routing.candidates(Inputs(CPU, torch.float32, 16, "attention", 4, 2, 150))
    assert order[0] == "flash" and sorted(order) == sorted(registry.names())


def test_auto_below_the_crossover_routes_to_the_dense_backend_unless_it_cannot(monkeypatch):
    force_crossover(monkeypatch, 200)
    q, k, v = make_qkv(1, 4, 2, 150, 16, dtype=torch.float32, seed=1)
    assert routing.route("auto", Inputs.of(q, k, v)).name == "dense"
    # dense attention returns no log-sum-exp: a call that wants it routes to the best TCA backend
    assert routing.route("auto", Inputs.of(q, k, v, lse=True)).name != "dense"
    _, lse = tca.attention(q, k, v, config=CONFIG, return_lse=True)
    assert lse.shape == (1, 4, 150)


def test_dense_is_a_backend_a_user_can_name():
    q, k, v = make_qkv(1, 4, 2, 120, 16, dtype=torch.float32, seed=2)
    out = tca.attention(q, k, v, config=CONFIG, backend="dense")
    torch.testing.assert_close(out, dense_causal(q, k, v, 0.25), atol=1e-5, rtol=1e-5)
    with pytest.raises(tca.BackendUnavailableError, match="backend 'dense' cannot run here: no lse: SDPA"):
        tca.attention(q, k, v, config=CONFIG, backend="dense", return_lse=True)
    _, cache = tca.prefill(q[:, :, :100], k[:, :, :100], v[:, :, :100], config=CONFIG, backend="dense")
    assert isinstance(cache, DenseKVCache) and int(cache.lengths.min()) == 100
    for i in range(100, 120):
        step = tca.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache)
        want = dense_causal(q[:, :, : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], 0.25)[:, :, -1:]
        torch.testing.assert_close(step, want, atol=1e-5, rtol=1e-5)


def test_the_dense_selection_keeps_every_token():
    impl = registry.get("dense").load()
    q, k, v = make_qkv(1, 4, 2, 100, 16, dtype=torch.float32, seed=3)
    selection = impl.select(q, k, None, CONFIG, 0.25)
    assert bool(selection.mask.all()) and int(selection.block_budgets.min()) == CONFIG.block_size
    torch.testing.assert_close(impl.attend(q, k, v, selection, 0.25), dense_causal(q, k, v, 0.25))
    budgets = default_budgets(CONFIG.block_size).double().expand(2, -1)
    sparse = registry.get("torch").load().select(q, k, budgets, CONFIG, 0.25)
    with pytest.raises(ValueError, match="only the selection of dense budgets"):
        impl.attend(q, k, v, sparse, 0.25)


def test_a_prefill_route_binds_the_decode_kernels_the_cache_keeps():
    q, k, v = make_qkv(1, 4, 2, 100, 16, dtype=torch.float32, seed=4)
    chosen = routing.route("torch", Inputs.of(q, k, v, phase="prefill"))
    assert chosen.decode is routing.decode_backend("auto", CPU, torch.float32, 16)
    assert chosen.decode_kernels is decode_torch
    _, cache = tca.prefill(q, k, v, config=CONFIG, backend="torch")
    assert cache.kernels is decode_torch
    oracle = routing.route("reference", Inputs.of(q, k, v, phase="prefill"))
    assert oracle.decode is oracle.backend and oracle.decode_kernels is None  # its own cache decodes there
    assert routing.route("torch", Inputs.of(q, k, v)).decode is None  # stateless: no cache to decode


def test_a_named_decode_backend_that_cannot_decode_the_shared_caches_is_refused():
    with pytest.raises(tca.BackendUnavailableError, match="its decode needs its own cache"):
        routing.decode_backend("reference", CPU, torch.float32, 16)
    with pytest.raises(tca.BackendUnavailableError, match="'dense' has no decode kernels of its own.*torch"):
        routing.decode_backend("dense", CPU, torch.float32, 16)


def test_a_padded_batch_without_varlen_never_comes_back_through_the_public_api(monkeypatch):
    q, k, v = make_qkv(2, 4, 2, 90, 16, dtype=torch.float32, seed=5)
    starts = [0, 30]
    alone = [tca.attention(q[b : b + 1, :, s:], k[b : b + 1, :, s:], v[b : b + 1, :, s:], config=CONFIG,
                           backend="torch") for b, s in enumerate(starts)]

    def reentered(*args, **kwargs):
        raise AssertionError("the padded path called tca.attention again")

    public = tca.api.attention
    monkeypatch.setattr(tca.api, "attention", reentered)  # what a per-sequence re-entry would call
    padded = public(q, k, v, config=CONFIG, backend="torch", starts=starts)
    for b, s in enumerate(starts):
        torch.testing.assert_close(padded[b : b + 1, :, s:], alone[b])
        assert not padded[b, :, :s].any()


def test_a_choice_is_memoised_per_band_of_the_crossover(monkeypatch):
    force_crossover(monkeypatch, 200)
    calls = []
    real = routing._first_usable
    monkeypatch.setattr(routing, "_first_usable", lambda name, inputs: calls.append(inputs.band) or real(name, inputs))
    routing.forget()
    for length in (100, 150, 199, 250, 300):
        routing.route("auto", Inputs(CPU, torch.float32, 16, "prefill", 4, 2, length))
    assert calls == ["dense", "sparse"]  # one probe per band, not per length

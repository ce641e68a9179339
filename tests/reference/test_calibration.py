"""Offline calibration (semantics.md section 6) on constructed inputs whose answer is known, and plans.

Shape letters: B batch (calibration sequences), HQ query heads, HKV KV heads, L keys, D head dim, M candidates.
"""

from __future__ import annotations

import json

import pytest
import torch

import tca
from tca import reference
from tca.budgets import calibration_candidates, expected_cost
from tca.plan import BudgetPlan

B_SIZE, WINDOW, D = 16, 32, 16
CONFIG = tca.TCAConfig(block_size=B_SIZE, window=WINDOW)  # tau = 0.9, M = 14, sigma = 1


def needle_inputs(L=256, HQ=4, HKV=2, seed=0):
    """Every query points along e_0; each block holds exactly one key along e_0 (its needle), every other key is
    orthogonal to e_0. Dense attention puts all but ~e^-30 of each row's mass on the needles, so keeping one
    token per block (the needle, which is also the top importance of its block) already retains ~all mass."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.zeros(1, HQ, L, D, dtype=torch.float64)
    q[..., 0] = 10.0
    k = torch.randn(1, HKV, L, D, generator=gen, dtype=torch.float64)
    k[..., 0] = 0.0
    for j in range(L // B_SIZE + 1):
        offset = (j * 7 + 3) % B_SIZE  # a different place in each block
        if j * B_SIZE + offset < L:
            k[..., j * B_SIZE + offset, 0] = 12.0  # logit 0.25 * 10 * 12 = 30
    return q, k


def uniform_inputs(L=512, HQ=4, HKV=2, seed=0):
    """Near-uniform attention (tiny queries): retained mass ~ the fraction of keys kept, which no sparse
    candidate brings to 0.9 (the largest keeps ~76% of a budgeted block), so calibration falls back to dense.
    Tiny random queries rather than zeros, so block priorities are not all tied (ties favour early blocks)."""
    gen = torch.Generator().manual_seed(seed)
    q = 1e-3 * torch.randn(1, HQ, L, D, generator=gen, dtype=torch.float64)
    k = torch.randn(1, HKV, L, D, generator=gen, dtype=torch.float64)
    return q, k


def test_one_needle_per_block_gives_the_cheapest_candidate():
    q, k = needle_inputs()
    plan = reference.calibrate([(q, k)], CONFIG)
    cheapest = calibration_candidates(B_SIZE, CONFIG.num_candidates, CONFIG.sigma)[0]
    assert plan.num_layers == 1 and plan.num_kv_heads == 2
    for head in plan.layers[0]:
        assert head.candidate == 0
        assert head.retained_mass >= 0.999
        assert head.budgets == pytest.approx(cheapest.tolist())
        assert head.cost == pytest.approx(float(expected_cost(cheapest)))


def test_uniform_attention_gives_the_dense_fallback():
    q, k = uniform_inputs()
    plan = reference.calibrate([(q, k)], CONFIG)
    for head in plan.layers[0]:
        assert head.candidate is None
        assert head.budgets == tca.dense_budgets(B_SIZE).tolist()
        assert head.cost == B_SIZE and head.retained_mass == 1.0
    assert plan.mean_keep_ratio() == 1.0


def test_layers_are_calibrated_independently():
    needle, uniform = needle_inputs(L=512), uniform_inputs(L=512)
    plan = reference.calibrate([needle, uniform], CONFIG, metadata={"text": "constructed"})
    assert [[h.candidate for h in layer] for layer in plan.layers] == [[0, 0], [None, None]]
    assert plan.metadata == {"text": "constructed"}
    assert plan.budgets(1).shape == (2, 5)


def test_a_lower_tau_accepts_a_cheaper_candidate():
    """On near-uniform attention a_m grows with the candidate's cost; tau picks the first that reaches it."""
    q, k = uniform_inputs()
    candidates = calibration_candidates(B_SIZE, CONFIG.num_candidates, CONFIG.sigma)
    masses = reference.retained_mass(q, k, candidates, CONFIG, D**-0.5)[:, 0]  # [M]
    tau = float(masses[6])  # exactly reached: a_m >= tau accepts it
    assert (masses[:6] < tau).all()
    plan = reference.calibrate([(q, k)], tca.TCAConfig(block_size=B_SIZE, window=WINDOW, tau=tau))
    m = plan.layers[0][0].candidate
    assert m == 6  # the cheapest reaching tau (costs ascend with m)
    assert plan.layers[0][0].retained_mass == pytest.approx(float(masses[m]))


@pytest.mark.parametrize("num_rows", [16, 256])
def test_retained_mass_with_uniform_attention_is_the_kept_fraction(num_rows):
    """q = 0: A_h[i, :] is uniform over [0, i], so rho_i = |S(i)| / (i + 1), counted here by hand."""
    L = 300
    q = torch.zeros(1, 2, L, D, dtype=torch.float64)
    k = torch.randn(1, 1, L, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    candidates = calibration_candidates(B_SIZE, 4, 1.0)
    masses = reference.retained_mass(q, k, candidates, CONFIG, D**-0.5, num_rows=num_rows)
    rows = reference.evaluated_rows(L, WINDOW, num_rows).tolist()
    for m, p in enumerate(candidates):
        sel = reference.select(q, k, p[None], CONFIG, D**-0.5).mask[0, 0].nonzero().squeeze(-1).tolist()
        fractions = []
        for i in rows:
            lo = max(0, (i // B_SIZE + 1) * B_SIZE - WINDOW)
            fractions.append((sum(1 for j in sel if j < lo) + i - lo + 1) / (i + 1))
        assert float(masses[m, 0]) == pytest.approx(sum(fractions) / len(fractions), abs=1e-12)


def test_evaluated_rows_hand_example():
    # L = 20, w = 4, R = 4: 16 rows > R, i_m = 4 + (m * 15 + 1) // 3 -> 4, 9, 14, 19.
    assert reference.evaluated_rows(20, 4, 4).tolist() == [4, 9, 14, 19]
    # At most R rows: all of w .. L-1.
    assert reference.evaluated_rows(20, 4, 16).tolist() == list(range(4, 20))
    assert reference.evaluated_rows(20, 4, 17).tolist() == list(range(4, 20))


@pytest.mark.parametrize("L,w,R", [(1000, 64, 256), (4097, 4096, 256), (300, 32, 7), (5000, 128, 2), (258, 2, 256)])
def test_evaluated_rows_formula(L, w, R):
    rows = reference.evaluated_rows(L, w, R).tolist()
    if L - w <= R:
        assert rows == list(range(w, L))
    else:
        assert len(rows) == R and rows[0] == w and rows[-1] == L - 1  # both ends included
        assert all(a < b for a, b in zip(rows, rows[1:], strict=False))
        assert rows == [w + (m * (L - 1 - w) + (R - 1) // 2) // (R - 1) for m in range(R)]


def test_calibration_needs_a_sequence_longer_than_the_window():
    q, k = needle_inputs(L=32)
    with pytest.raises(ValueError, match="longer than the window"):
        reference.calibrate([(q, k)], CONFIG)


# ---- plans: save / load ------------------------------------------------------------------------------------


def small_plan():
    q, k = needle_inputs(L=160)
    return reference.calibrate([(q, k), uniform_inputs(L=160)], CONFIG, metadata={"model": "test"})


def test_plan_save_load_round_trip(tmp_path):
    plan = small_plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = BudgetPlan.load(path)
    assert loaded.config == plan.config
    assert loaded.metadata == plan.metadata
    assert loaded.layers == plan.layers
    for layer in range(plan.num_layers):
        assert torch.equal(loaded.budgets(layer), plan.budgets(layer))
    assert json.loads(path.read_text())["format"] == "tca-budget-plan/1"  # human-readable JSON


def test_loaded_plan_drives_attention(tmp_path):
    plan = small_plan()
    plan.save(tmp_path / "p.json")
    loaded = BudgetPlan.load(tmp_path / "p.json")
    q, k = needle_inputs(L=160)
    v = torch.randn_like(k)
    out = tca.attention(q, k, v, budgets=loaded.budgets(0), config=loaded.config, backend="reference")
    assert out.shape == q.shape and torch.isfinite(out).all()


def corrupt(data, path):
    layer0 = data["layers"][0]
    if path == "format":
        data["format"] = "something-else"
    elif path == "short":
        layer0[0]["budgets"] = layer0[0]["budgets"][:-1]
    elif path == "negative":
        layer0[0]["budgets"] = [-0.5, 1.5] + [0.0] * (len(layer0[0]["budgets"]) - 2)
    elif path == "sum":
        layer0[0]["budgets"] = [0.5] * len(layer0[0]["budgets"])
    elif path == "nan":
        layer0[0]["budgets"][0] = float("nan")
    elif path == "heads":
        data["layers"][1] = data["layers"][1][:1]
    elif path == "config":
        data["config"]["block_size"] = 48
    elif path == "unknown_field":
        data["config"]["blocksize"] = 16
    elif path == "missing_mass":
        del layer0[0]["retained_mass"]
    elif path == "layers_not_list":
        data["layers"] = 3
    return data


@pytest.mark.parametrize(
    "how,match",
    [
        ("format", "not a tca budget plan"),
        ("short", "5 non-negative numbers summing to 1"),
        ("negative", "non-negative"),
        ("sum", "summing to 1"),
        ("nan", "summing to 1"),
        ("heads", "different numbers of KV heads"),
        ("config", "power of two"),
        ("unknown_field", "unknown TCAConfig fields"),
        ("missing_mass", "retained_mass"),
        ("layers_not_list", "layers"),
    ],
)
def test_malformed_plan_raises(tmp_path, how, match):
    path = tmp_path / "plan.json"
    small_plan().save(path)
    path.write_text(json.dumps(corrupt(json.loads(path.read_text()), how)))
    with pytest.raises(ValueError, match=match):
        BudgetPlan.load(path)


def test_plan_that_is_not_json_raises(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(ValueError):
        BudgetPlan.load(path)


@pytest.mark.parametrize("num_rows", [1, 0, -3])
def test_evaluated_rows_needs_two_rows(num_rows):
    with pytest.raises(ValueError, match="num_rows must be an int >= 2"):
        reference.evaluated_rows(100, 32, num_rows)

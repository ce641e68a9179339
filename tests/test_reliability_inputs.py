"""Bad inputs outside the cache: plan files with a missing, null or empty section, empty calibration batches,
budgets or tensors on the meta device, sparse tensors. Each raises ValueError or TypeError naming the problem.

Shape letters: B batch, HQ query heads, HKV key/value heads, L keys, D head dim.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import tca
from tca import BudgetPlan, reference

CONFIG = tca.TCAConfig(block_size=16, window=32)


def qkv(L: int = 64):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, L, 16, generator=gen) for _ in range(3))


@pytest.fixture(scope="module")
def plan_dict() -> dict:
    q, k, _ = qkv()
    return reference.calibrate([(q, k)], config=CONFIG).to_dict()


@pytest.mark.parametrize("section", ["config", "layers"])
@pytest.mark.parametrize("state", ["missing", "null", "empty"])
def test_plan_section_missing_null_or_empty_is_named(plan_dict, section, state):
    data = copy.deepcopy(plan_dict)
    if state == "missing":
        del data[section]
    else:
        data[section] = None if state == "null" else type(data[section])()
    with pytest.raises(ValueError, match=rf"'{section}'.*{'' if state == 'empty' else state}"):
        BudgetPlan.from_dict(data)


def test_plan_null_metadata_and_null_head_fields_are_named(plan_dict):
    data = copy.deepcopy(plan_dict)
    data["metadata"] = None
    with pytest.raises(ValueError, match="'metadata'"):
        BudgetPlan.from_dict(data)
    data = copy.deepcopy(plan_dict)
    data["layers"][0][1]["budgets"] = None
    with pytest.raises(ValueError, match="layer 0 head 1 has no budgets"):
        BudgetPlan.from_dict(data)
    data = copy.deepcopy(plan_dict)
    data["layers"][0] = []
    with pytest.raises(ValueError, match="layer 0 must be a non-empty list"):
        BudgetPlan.from_dict(data)


def test_plan_file_not_json_or_missing(tmp_path, plan_dict):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="plan.json is not a tca budget plan: not valid JSON"):
        BudgetPlan.load(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        BudgetPlan.load(tmp_path / "absent.json")
    data = copy.deepcopy(plan_dict)
    data["layers"] = None
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="plan.json.*'layers' is null"):
        BudgetPlan.load(bad)


def test_calibration_with_no_layers_or_an_empty_batch():
    with pytest.raises(ValueError, match="no layers"):
        reference.calibrate([], config=CONFIG)
    q, k, _ = qkv()
    with pytest.raises(ValueError, match="zero-size"):
        reference.calibrate([(q[:0], k[:0])], config=CONFIG)
    with pytest.raises(TypeError, match=r"\(q, k\) or \(q, k, v\) tuple"):
        reference.calibrate([q], config=CONFIG)
    with pytest.raises(ValueError, match="50 queries for 64 keys"):
        reference.calibrate([(q[:, :, :50], k)], config=CONFIG)


def test_meta_device_budgets_and_tensors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="budgets is on the meta device"):
        tca.attention(q, k, v, config=CONFIG, budgets=tca.default_budgets(16).to("meta"))
    with pytest.raises(ValueError, match="q, k, v are on the meta device"):
        tca.attention(q.to("meta"), k.to("meta"), v.to("meta"), config=CONFIG)
    with pytest.raises(ValueError, match="meta device"):
        reference.calibrate([(q.to("meta"), k.to("meta"))], config=CONFIG)


@pytest.mark.parametrize("which", ["q", "k", "v", "budgets"])
def test_sparse_tensors_are_a_type_error(which):
    q, k, v = qkv()
    inputs = {"q": q, "k": k, "v": v, "budgets": tca.default_budgets(16)}
    inputs[which] = inputs[which].to_sparse()
    with pytest.raises(TypeError, match=f"{which} must be a dense"):
        tca.attention(inputs["q"], inputs["k"], inputs["v"], budgets=inputs["budgets"], config=CONFIG)
    if which != "budgets":
        with pytest.raises(TypeError, match=f"{which} must be a dense"):
            tca.prefill(inputs["q"], inputs["k"], inputs["v"], config=CONFIG)

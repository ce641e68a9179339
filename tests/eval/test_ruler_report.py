"""RULER summaries: the macro average over tasks, bootstrap intervals, paired differences."""

from __future__ import annotations

import pytest

from tca.eval import ruler_report as R


def _results():
    samples = []
    for method, scores in {"dense": {"a": [100, 100], "b": [0, 100]}, "x": {"a": [100, 0], "b": [0, 100]}}.items():
        for task, values in scores.items():
            for i, v in enumerate(values):
                samples.append({"method": method, "task": task, "length": 4096, "index": i, "score": float(v),
                                "kept_fraction": 1.0 if method == "dense" else 0.4})
    return {"methods": {"dense": {}, "x": {}}, "samples": samples}


def test_average_is_the_mean_of_task_means_with_an_interval_around_it():
    a = R.average(_results(), "x", 4096)
    assert a["score"] == 50.0 and a["n"] == 4 and a["kept"] == pytest.approx(0.4)
    assert 0.0 <= a["low"] <= a["score"] <= a["high"] <= 100.0


def test_paired_difference_uses_the_same_prompts():
    d = R.paired_difference(_results(), "x", 4096)
    assert d["diff"] == -25.0 and d["n"] == 4  # task a: -50, task b: 0
    assert d["low"] <= d["diff"] <= d["high"] <= 0.0


def test_families_share_colours():
    assert R.family("snapkv=tca-tau0.9") == R.family("snapkv-50") == "snapkv"
    assert R.family("tca-tau0.9") == "tca" and R.family("tca-fixed31") == "tca_fixed"
    assert R.family("tca-tau0.9-retrieval") == "tca_variant" and R.family("adakv-expected-attention=tca-fixed31") == "adakv"
    assert R.family("expected-attention-40") == "expected"

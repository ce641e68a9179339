"""benchmarks/padded_prefill.py at its --tiny CPU sizes: every method runs, the single call and the per-sequence
calls agree, and the model mode times both methods on a tiny random model."""

from __future__ import annotations

import json

import pytest

from helpers import load_script


def _bench():
    return load_script("benchmarks/padded_prefill.py")


def test_tiny_layer_run_reports_every_method(tmp_path):
    out = tmp_path / "padded.json"
    assert _bench().main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["outputs_equal"]
    assert set(result["methods"]) == {"tca-one-call", "tca-per-sequence", "dense-per-sequence", "dense-masked"}
    assert all(m["ms"] > 0 for m in result["methods"].values())
    assert result["methods"]["tca-one-call"]["cache_bytes"] == result["methods"]["tca-per-sequence"]["cache_bytes"]


def test_tiny_model_run_times_dense_and_tca(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "padded_model.json"
    assert _bench().main(["--tiny", "--device", "cpu", "--model", "llama-tiny-shape", "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert set(result["methods"]) == {"dense", "tca-auto"}
    assert result["methods"]["tca-auto"]["ttft_speedup_vs_dense"] > 0

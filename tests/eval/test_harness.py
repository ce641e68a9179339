"""The quality harness end to end on a tiny random Llama (seconds): CLI, JSON, tables, plots, target checks."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")

from tca.cli import main  # noqa: E402
from tca.eval import report  # noqa: E402


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "quality_smoke.json"
    plots = out.parent / "quality_smoke"
    assert main(["eval", "--model", "tiny", "--preset", "smoke", "--out", str(out), "--plots", str(plots), "--quiet"]) == 0
    return json.loads(out.read_text()), out, plots


def test_smoke_run_writes_every_method_sample_and_document(smoke_results):
    results, _, _ = smoke_results
    assert list(results["methods"]) == ["dense", "tca-tau0.9", "tca-fixed17"]
    # smoke grid: 2 tasks x 1 length x 1 depth x 1 sample; perplexity: 1 document x 2 modes
    assert len(results["needles"]) == 3 * 2
    assert len(results["perplexity"]) == 3 * 2
    for row in results["perplexity"]:
        assert math.isfinite(row["nll"]) and row["nll"] > 0
    for row in results["needles"]:
        assert 0.0 <= row["score"] <= 1.0
        assert 0.0 < row["kept_fraction"] <= 1.0


def test_dense_decode_and_prefill_perplexity_agree(smoke_results):
    """Teacher-forced decoding through a dense cache computes the same NLL as one forward pass."""
    results, _, _ = smoke_results
    nll = {row["mode"]: row["nll"] for row in results["perplexity"] if row["method"] == "dense"}
    assert nll["decode"] == pytest.approx(nll["prefill"], rel=1e-4)


def test_fixed_budget_really_compresses_the_cache(smoke_results):
    results, _, _ = smoke_results
    assert report.kept_fraction(results, "dense") == 1.0
    assert report.kept_fraction(results, "tca-fixed17") < 0.6


def test_tables_plots_and_from_json(smoke_results, capsys):
    results, out, plots = smoke_results
    for suffix in ("tradeoff", "needle_grid", "tasks"):
        assert (out.parent / f"{plots.name}_{suffix}.png").stat().st_size > 1000
    table = report.markdown_table(results)
    assert table.count("\n") == 1 + len(results["methods"])
    assert main(["eval", "--from-json", str(out)]) == 0
    assert "tca-fixed17" in capsys.readouterr().out


def test_needle_misses_count_only_cells_dense_solves():
    rows = [
        {"method": m, "task": "niah_single", "length": 2048, "depth": d, "index": 0, "score": s}
        for m, d, s in [("dense", 0.1, 1.0), ("dense", 0.5, 0.0), ("tca", 0.1, 0.0), ("tca", 0.5, 1.0)]
    ]
    results = {"methods": {"dense": {}, "tca": {}}, "needles": rows, "perplexity": []}
    misses, total, missed = report.needle_misses(results, "tca")
    assert (misses, total) == (1, 1)
    assert missed[0]["depth"] == 0.1


def test_bad_arguments_are_clear(capsys):
    assert main(["eval", "--model", "tiny", "--preset", "smoke", "--methods", "nope", "--quiet"]) == 2
    assert "unknown methods" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny", "--preset", "smoke", "--tasks", "passkey", "--quiet"]) == 2
    assert "unknown tasks" in capsys.readouterr().err


def test_full_cache_twin_shares_the_plan_and_keeps_everything():
    from dataclasses import replace

    import torch

    from tca.eval.harness import Grid, evaluate
    from tca.eval.methods import Runner, fixed
    from tca.eval.presets import TINY_CONFIG
    from tca.eval.tiny import tiny_llama

    model, tokenizer = tiny_llama(seed=1)
    compressed = fixed(1, TINY_CONFIG)
    full = replace(compressed, name=compressed.name + "-fullcache", cache="full")
    runner = Runner(model, "auto", torch.zeros(1, 8, dtype=torch.long), progress=False)
    grid = Grid(tasks=["niah_single"], lengths=[512], depths=[0.5], ppl_lengths=[])
    results = evaluate(runner, tokenizer, [compressed, full], grid, progress=False)
    assert list(runner.plans) == [compressed.name]
    assert report.kept_fraction(results, full.name) == 1.0
    assert report.kept_fraction(results, compressed.name) < 0.6


def test_reselecting_variant_shares_the_plan_reads_as_much_and_holds_everything():
    import torch

    from tca.eval.harness import Grid, evaluate
    from tca.eval.methods import Runner, fixed, reselecting
    from tca.eval.presets import TINY_CONFIG
    from tca.eval.tiny import tiny_llama

    model, tokenizer = tiny_llama(seed=1)
    paper = fixed(1, TINY_CONFIG)
    every16, offloaded = reselecting(paper, 16), reselecting(paper, 1, offload=True)
    one_block = reselecting(paper, 1, offload=True, blocks=1)
    runner = Runner(model, "auto", torch.zeros(1, 8, dtype=torch.long), progress=False)
    grid = Grid(tasks=["niah_single"], lengths=[512], depths=[0.5], ppl_lengths=[])
    results = evaluate(runner, tokenizer, [paper, every16, offloaded, one_block], grid, progress=False)
    assert list(runner.plans) == [paper.name]
    row = {r["method"]: r for r in results["needles"]}
    assert results["methods"][every16.name]["policy"] == {"reselect_every": 16, "offload": False, "blocks": None}
    assert one_block.name == f"{paper.name}-reselect1-blocks1"
    # The same tokens read by attention; the store holds the rest, on the device or in host memory.
    assert row[every16.name]["kept_fraction"] == row[paper.name]["kept_fraction"] < 0.6
    assert row[every16.name]["device_bytes"] > row[paper.name]["device_bytes"] == row[paper.name]["cache_bytes"]
    assert row[offloaded.name]["device_bytes"] == row[paper.name]["device_bytes"]
    assert row[offloaded.name]["offloaded_bytes"] > 0 == row[every16.name]["offloaded_bytes"]
    # Re-selection reads the keys before the window once per period on top of the active set.
    assert row[paper.name]["read_bytes_per_step"] < row[every16.name]["read_bytes_per_step"]
    assert row[every16.name]["read_bytes_per_step"] < row[offloaded.name]["read_bytes_per_step"]
    # Over one candidate block a re-selection reads the active keys, one block's evicted keys and the summaries.
    assert row[paper.name]["read_bytes_per_step"] < row[one_block.name]["read_bytes_per_step"]
    assert row[one_block.name]["read_bytes_per_step"] < row[offloaded.name]["read_bytes_per_step"]


def test_runner_names_the_backend_so_the_crossover_never_replaces_a_plan():
    """backend="auto" runs dense attention below a device's crossover; an evaluation must measure the plan."""
    import torch

    from tca.eval.methods import Runner
    from tca.eval.tiny import tiny_llama

    model, _ = tiny_llama(0, torch.float32)
    assert Runner(model, "auto", progress=False).backend == "torch"
    assert Runner(model, "reference", progress=False).backend == "reference"


def test_streaming_variant_shares_the_plan_and_bounds_the_cache():
    """A streaming-prefill method (section 5b) runs on its method's plan. One chunk covering the prompt is the
    one-shot prefill (the same answer, the same tokens kept); smaller chunks hold at most the window plus the kept tokens."""
    import torch

    from tca.eval.harness import Grid, evaluate
    from tca.eval.methods import Runner, fixed, streaming
    from tca.eval.presets import TINY_CONFIG
    from tca.eval.tiny import tiny_llama

    model, tokenizer = tiny_llama(seed=1)
    paper = fixed(1, TINY_CONFIG)
    whole, chunked = streaming(paper, 1024), streaming(paper, 4 * TINY_CONFIG.block_size)
    runner = Runner(model, "auto", torch.zeros(1, 8, dtype=torch.long), progress=False)
    grid = Grid(tasks=["niah_single"], lengths=[512], depths=[0.5], ppl_lengths=[])
    results = evaluate(runner, tokenizer, [paper, whole, chunked], grid, progress=False)
    assert list(runner.plans) == [paper.name]
    row = {r["method"]: r for r in results["needles"]}
    assert results["methods"][chunked.name]["prefill_chunk"] == 4 * TINY_CONFIG.block_size
    assert row[whole.name]["output"] == row[paper.name]["output"]
    assert row[whole.name]["kept_fraction"] == row[paper.name]["kept_fraction"]
    assert 0 < row[chunked.name]["kept_fraction"] < 1


def test_ruler_greedy_streams_the_prefill_when_asked():
    import torch

    from tca.eval.methods import Runner, fixed, streaming
    from tca.eval.presets import TINY_CONFIG
    from tca.eval.ruler_harness import greedy
    from tca.eval.tiny import tiny_llama

    model, _ = tiny_llama(seed=2)
    paper = fixed(1, TINY_CONFIG)
    runner = Runner(model, "torch", progress=False)
    prompt = torch.randint(0, model.config.vocab_size, (600,), generator=torch.Generator().manual_seed(0)).tolist()
    answers = {}
    for method, chunk in ((paper, None), (streaming(paper, 1024), 1024), (streaming(paper, 128), 128)):
        runner.use(method)
        cache = runner.new_cache()
        answers[chunk] = greedy(model, prompt, cache, 6, set(), prefill_chunk=chunk)[0], cache.seq_len
    assert answers[1024] == answers[None]  # one chunk is the one-shot prefill
    assert len(answers[128][0]) == 6 and answers[128][1] == 600 + 5


def test_a_streaming_prefill_needs_a_compressed_tca_cache():
    from tca.eval.methods import Method

    with pytest.raises(ValueError, match="needs a TCA method on the compressed cache"):
        Method("dense-stream", "dense", prefill_chunk=256)

"""Plots of eval results: one colour per method in every panel and figure, the one meaning of "kept" on the
axes, and a legend naming every method (no overlapping point labels)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from matplotlib.colors import to_rgba  # noqa: E402

from helpers import ROOT
from tca.eval import plots  # noqa: E402
from tca.eval.report import ordered_methods  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "quality_ablation_2k_cpu.json"


@pytest.fixture
def figures(monkeypatch, tmp_path):
    kept = []

    def keep(plt, fig, path, rect=None):
        kept.append(fig)
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    results = json.loads(RESULTS.read_text())
    plots.tradeoff(results, tmp_path / "t.png")
    plots.task_bars(results, tmp_path / "b.png")
    return results, kept


def test_each_method_has_one_colour_in_every_panel(figures):
    results, (tradeoff, bars) = figures
    colours = {m: to_rgba(c) for m, c in plots.method_colours(ordered_methods(results)).items()}
    legend = tradeoff.legends[0]
    names = [t.get_text() for t in legend.get_texts()]
    by_name = {name: to_rgba(h.get_color()) for name, h in zip(names, legend.legend_handles, strict=True)}
    for method, colour in colours.items():
        assert by_name[method.removeprefix("tca-")] == colour
    for ax in tradeoff.axes:
        assert ax.get_xlabel() == plots.KEPT_LABEL
        point_colours = {to_rgba(line.get_color()) for line in ax.get_lines() if line.get_marker() not in (None, "None")}
        assert point_colours <= set(colours.values())
        assert not ax.texts  # no per-point labels to overlap
    bar_ax = bars.axes[0]
    bar_legend = {t.get_text(): to_rgba(p.get_facecolor()) for t, p in zip(bar_ax.get_legend().get_texts(),
                                                                          bar_ax.get_legend().legend_handles, strict=True)}
    for method, colour in colours.items():
        assert bar_legend[method.removeprefix("tca-")] == colour

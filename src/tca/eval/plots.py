"""Plots of a results dict: accuracy and perplexity against the kept-KV fraction, the needle depth x length grid.

matplotlib is imported lazily (headless "Agg" backend); each function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
from pathlib import Path

from .report import BASELINE, _lengths, _tasks, kept_fraction, length_label, needle_scores, ordered_methods, perplexity


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError('plots need matplotlib: pip install "tca[eval]" (or pip install matplotlib)') from error

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path) -> Path:
    """Lay out, write `fig` to the PNG `path` (creating its folder), close it; return the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _label(ax, x, y, text):
    if not (math.isnan(x) or math.isnan(y)):
        ax.annotate(text, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")


def tradeoff(results: dict, path: str | Path, methods: list[str] | None = None) -> Path:
    """Two panels against the kept-KV fraction (one point per method and length): mean needle accuracy
    over all tasks, and decode perplexity relative to dense."""
    plt = _pyplot()
    methods = methods or ordered_methods(results)
    fig, (acc, ppl) = plt.subplots(1, 2, figsize=(11, 4.2))
    for L in _lengths(results, "needles"):
        pts = sorted((kept_fraction(results, m, L), needle_scores(results, m, length=L), m) for m in methods)
        line = acc.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=f"{length_label(L)} tokens")[0]
        for x, y, m in pts:
            if m != BASELINE:
                _label(acc, x, y, m.removeprefix("tca-"))
        acc.axhline(needle_scores(results, BASELINE, length=L), color=line.get_color(), ls=":", lw=0.8)
    acc.set(xlabel="kept KV fraction (cache positions held / total)", ylabel="needle accuracy (all tasks)",
            title="Needle tasks (dotted: dense)", ylim=(-0.05, 1.05), xlim=(0, 1.05))
    acc.legend(fontsize=8)
    for L in _lengths(results, "perplexity"):
        base = perplexity(results, BASELINE, L)
        pts = sorted((kept_fraction(results, m, L), 100 * (perplexity(results, m, L) / base - 1), m) for m in methods)
        ppl.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=f"{length_label(L)} tokens")
        for x, y, m in pts:
            if m != BASELINE:
                _label(ppl, x, y, m.removeprefix("tca-"))
    ppl.axhline(2.0, color="red", ls="--", lw=0.8, label="+2% target")
    ppl.axhline(0.0, color="gray", lw=0.6)
    ppl.set(xlabel="kept KV fraction (cache positions held / total)", ylabel="perplexity change vs dense (%)",
            title="Perplexity of real text (decode through the cache)", xlim=(0, 1.05))
    ppl.legend(fontsize=8)
    return _save(plt, fig, path)


def needle_grid(results: dict, path: str | Path, methods: list[str] | None = None, task: str = "niah_single") -> Path:
    """Depth x length accuracy heatmaps of `task`, one panel per method."""
    plt = _pyplot()
    methods = methods or ordered_methods(results)
    rows = [r for r in results["needles"] if r["task"] == task]
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(methods), figsize=(2.2 + 2.0 * len(methods), 0.6 + 0.45 * len(depths) + 1), squeeze=False)
    for ax, m in zip(axes[0], methods, strict=True):
        grid = []
        for d in depths:
            row = []
            for L in lengths:
                scores = [r["score"] for r in rows if r["method"] == m and r["depth"] == d and r["length"] == L]
                row.append(sum(scores) / len(scores) if scores else math.nan)
            grid.append(row)
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if math.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [length_label(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("context length")
    axes[0][0].set_ylabel("needle depth")
    fig.suptitle(f"{task}: accuracy by depth and length", fontsize=10)
    return _save(plt, fig, path)


def task_bars(results: dict, path: str | Path, methods: list[str] | None = None) -> Path:
    """Needle accuracy per task (grouped bars), one bar per method: the ablation view."""
    plt = _pyplot()
    methods = methods or ordered_methods(results)
    tasks = _tasks(results)
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(methods), 3.6))
    width = 0.8 / max(1, len(tasks))
    for t, task in enumerate(tasks):
        ax.bar([i + t * width for i in range(len(methods))], [needle_scores(results, m, task) for m in methods], width, label=task)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))], [m.removeprefix("tca-") for m in methods], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="accuracy", ylim=(0, 1.05))
    ax.legend(fontsize=7)
    return _save(plt, fig, path)

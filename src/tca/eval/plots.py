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


def _save(plt, fig, path, rect=None) -> Path:
    """Lay out (within `rect` of the figure, leaving room for a figure legend), write `fig` to the PNG `path`
    (creating its folder), close it; return the path."""
    fig.tight_layout(rect=rect)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


KEPT_LABEL = "kept KV (positions held / positions a dense cache holds)"
MARKERS = "osD^v<>ph"


def method_colours(methods: list[str]) -> dict[str, str]:
    """One colour per method, the same in every panel and figure of a results dict (dense: black)."""
    palette = [f"C{i}" for i in range(10)]
    others = [m for m in methods if m != BASELINE]
    colours = {m: palette[i % len(palette)] for i, m in enumerate(others)}
    colours[BASELINE] = "black"
    return colours


def _short(method: str) -> str:
    return method.removeprefix("tca-")


def tradeoff(results: dict, path: str | Path, methods: list[str] | None = None) -> Path:
    """Two panels against the kept-KV fraction (one point per method and length): mean needle accuracy
    over all tasks, and decode perplexity relative to dense. Colour = method (the same in both panels),
    marker = context length; both explained in one legend instead of labels on the points."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    methods = methods or ordered_methods(results)
    colours = method_colours(methods)
    fig, (acc, ppl) = plt.subplots(1, 2, figsize=(12, 4.6))
    needle_lengths, ppl_lengths = _lengths(results, "needles"), _lengths(results, "perplexity")
    lengths = sorted(set(needle_lengths) | set(ppl_lengths))
    marker = {L: MARKERS[i % len(MARKERS)] for i, L in enumerate(lengths)}
    for L in needle_lengths:
        for m in methods:
            acc.plot(kept_fraction(results, m, L), needle_scores(results, m, length=L), marker[L], color=colours[m],
                     markersize=7, alpha=0.85)
    acc.set(xlabel=KEPT_LABEL, ylabel="needle accuracy (all tasks)", title="Needle tasks",
            ylim=(-0.05, 1.05), xlim=(0, 1.05))
    for L in ppl_lengths:
        base = perplexity(results, BASELINE, L)
        for m in methods:
            ppl.plot(kept_fraction(results, m, L), 100 * (perplexity(results, m, L) / base - 1), marker[L],
                     color=colours[m], markersize=7, alpha=0.85)
    ppl.axhline(2.0, color="red", ls="--", lw=0.8)
    ppl.axhline(0.0, color="gray", lw=0.6)
    ppl.set(xlabel=KEPT_LABEL, ylabel="perplexity change vs dense (%)",
            title="Perplexity of real text (decode through the cache; red: +2%)", xlim=(0, 1.05))
    handles = [Line2D([], [], color=colours[m], marker="o", ls="", label=_short(m)) for m in methods]
    handles += [Line2D([], [], color="gray", marker=marker[L], ls="", label=f"{length_label(L)} tokens") for L in lengths]
    fig.legend(handles=handles, loc="center right", fontsize=9, frameon=False)
    return _save(plt, fig, path, rect=(0, 0, 0.88, 1))


def needle_grid(results: dict, path: str | Path, methods: list[str] | None = None, task: str = "niah_single") -> Path:
    """Depth x length accuracy heatmaps of `task`, one panel per method."""
    plt = _pyplot()
    methods = methods or ordered_methods(results)
    rows = [r for r in results["needles"] if r["task"] == task]
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    colours = method_colours(methods)
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
        ax.set_title(_short(m), fontsize=10, color=colours[m])
        ax.set_xlabel("context length")
    axes[0][0].set_ylabel("needle depth")
    fig.suptitle(f"{task}: accuracy by depth and length", fontsize=10)
    return _save(plt, fig, path)


def task_bars(results: dict, path: str | Path, methods: list[str] | None = None) -> Path:
    """Needle accuracy per task (groups), one bar per method in its colour (the same as in tradeoff)."""
    plt = _pyplot()
    methods = methods or ordered_methods(results)
    colours = method_colours(methods)
    tasks = _tasks(results)
    fig, ax = plt.subplots(figsize=(2.5 + 0.35 * len(methods) * len(tasks), 4.0))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        ax.bar([t + i * width for t in range(len(tasks))], [needle_scores(results, m, task) for task in tasks], width,
               color=colours[m], label=_short(m))
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, fontsize=9)
    ax.set(ylabel="accuracy", ylim=(0, 1.05))
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _save(plt, fig, path)

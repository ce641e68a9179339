"""Summaries of RULER results (ruler_harness.evaluate_ruler): averages with bootstrap confidence intervals,
per-task tables, paired differences against dense, and the score-vs-KV-kept plot.

The RULER average of a method at a length is the mean over tasks of each task's mean sample score (0-100).
Its 95% interval: a stratified bootstrap (samples resampled within each task, 2000 draws, seeded). A
difference to dense is paired: the same prompts are resampled for both methods.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from .report import tasks_in_order

BASELINE = "dense"
BOOTSTRAP_DRAWS = 2000
# One colour per method family, the same in every plot (families: method name up to its first "-" or "=").
FAMILY_COLOURS = {
    "dense": "black", "tca": "tab:blue", "tca_fixed": "tab:cyan", "streamingllm": "tab:orange", "snapkv": "tab:green",
    "expected": "tab:red", "adakv": "tab:purple", "knorm": "tab:brown", "tca_variant": "tab:olive",
    "tca_reselect": "magenta", "tca_stream": "goldenrod", "tca_press": "tab:pink", "other": "tab:gray",
}


def family(method: str) -> str:
    if method == BASELINE:
        return "dense"
    if method.startswith("tca-press="):  # TCA as a kvpress press (before the TCA families: it names one)
        return "tca_press"
    if method.startswith("tca-fixed"):
        return "tca_fixed"
    if method.startswith("tca-") and any(v in method for v in ("retrieval", "fallback")):
        return "tca_variant"
    if method.startswith("tca-") and "-reselect" in method:
        return "tca_reselect"
    if method.startswith("tca-") and "-stream" in method:
        return "tca_stream"
    head = method.split("=")[0].split("-")[0]
    return head if head in FAMILY_COLOURS else "other"


def _cells(results: dict, method: str, length: int) -> dict[tuple[str, int], float]:
    return {(s["task"], s["index"]): s["score"] for s in results["samples"] if s["method"] == method and s["length"] == length}


def methods_of(results: dict) -> list[str]:
    names = list(results["methods"])
    return sorted(names, key=lambda m: (m != BASELINE, names.index(m)))


def lengths_of(results: dict) -> list[int]:
    return sorted({s["length"] for s in results["samples"]})


def tasks_of(results: dict) -> list[str]:
    return tasks_in_order(results["samples"])


def _average(cells: dict, keys) -> float:
    by_task: dict[str, list[float]] = {}
    for key in keys:
        by_task.setdefault(key[0], []).append(cells[key])
    return sum(sum(v) / len(v) for v in by_task.values()) / len(by_task) if by_task else math.nan


def _bootstrap(keys: list, statistic, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> tuple[float, float]:
    """2.5% and 97.5% quantiles of `statistic(resampled keys)`, resampling within each task."""
    by_task: dict[str, list] = {}
    for key in keys:
        by_task.setdefault(key[0], []).append(key)
    rng = random.Random(seed)
    values = []
    for _ in range(draws):
        draw = [rng.choice(group) for group in by_task.values() for _ in group]
        values.append(statistic(draw))
    values.sort()
    return values[int(0.025 * (draws - 1))], values[int(0.975 * (draws - 1))]


def average(results: dict, method: str, length: int) -> dict:
    """{"score", "low", "high", "n", "kept"} of `method` at `length` (NaN when it has no samples there)."""
    cells = _cells(results, method, length)
    keys = sorted(cells)
    if not keys:
        return {"score": math.nan, "low": math.nan, "high": math.nan, "n": 0, "kept": math.nan}
    low, high = _bootstrap(keys, lambda draw: _average(cells, draw))
    kept = [s["kept_fraction"] for s in results["samples"] if s["method"] == method and s["length"] == length]
    return {"score": _average(cells, keys), "low": low, "high": high, "n": len(keys), "kept": sum(kept) / len(kept)}


def paired_difference(results: dict, method: str, length: int, baseline: str = BASELINE) -> dict:
    """method minus baseline on the prompts both ran: {"diff", "low", "high", "n"} (RULER points)."""
    a, b = _cells(results, method, length), _cells(results, baseline, length)
    keys = sorted(set(a) & set(b))
    if not keys:
        return {"diff": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    diff = {k: a[k] - b[k] for k in keys}
    low, high = _bootstrap(keys, lambda draw: _average(diff, draw))
    return {"diff": _average(diff, keys), "low": low, "high": high, "n": len(keys)}


def task_score(results: dict, method: str, task: str, length: int | None = None) -> float:
    scores = [s["score"] for s in results["samples"]
              if s["method"] == method and s["task"] == task and (length is None or s["length"] == length)]
    return sum(scores) / len(scores) if scores else math.nan


def cell_line(results: dict, method: str, length: int) -> str:
    a = average(results, method, length)
    return f"{method} @ {length}: RULER {a['score']:.1f} [{a['low']:.1f}, {a['high']:.1f}] over {a['n']} prompts, kept {a['kept']:.3f}"


def _fmt(x: float, digits: int = 1) -> str:
    return "" if math.isnan(x) else f"{x:.{digits}f}"


def summary_table(results: dict) -> str:
    """Markdown: per method and length the RULER average [95% CI], kept KV, and the paired difference to dense."""
    lengths = lengths_of(results)
    head = "| method | " + " | ".join(f"{L // 1024}K score [95% CI] | {L // 1024}K kept | {L // 1024}K vs dense" for L in lengths) + " |"
    rows = [head, "|---|" + "---|---|---|" * len(lengths)]
    for m in methods_of(results):
        cells = []
        for L in lengths:
            a = average(results, m, L)
            d = paired_difference(results, m, L) if m != BASELINE else None
            score = f"{_fmt(a['score'])} [{_fmt(a['low'])}, {_fmt(a['high'])}]" if a["n"] else ""
            vs = "" if d is None or not d["n"] else f"{d['diff']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"
            cells += [score, _fmt(a["kept"], 3), vs]
        rows.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def task_table(results: dict, length: int | None = None) -> str:
    """Markdown: mean score per task (columns) and method (rows), at one length or over all."""
    tasks = tasks_of(results)
    rows = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in methods_of(results):
        rows.append(f"| `{m}` | " + " | ".join(_fmt(task_score(results, m, t, length), 0) for t in tasks) + " |")
    return "\n".join(rows)


def short_table(results: dict) -> str:
    """Plain text, one line per method: the RULER average and kept fraction per length."""
    lengths = lengths_of(results)
    lines = [f"{'method':32s}" + "".join(f"{f'{L // 1024}K score':>12s}{'kept':>7s}" for L in lengths)]
    for m in methods_of(results):
        line = f"{m:32s}"
        for L in lengths:
            a = average(results, m, L)
            line += f"{_fmt(a['score']):>12s}{_fmt(a['kept'], 3):>7s}"
        lines.append(line)
    return "\n".join(lines)


def plot_score_vs_kept(results: dict, path: str | Path) -> Path:
    """RULER average against the real KV kept, one panel per length, one colour per method family,
    error bars = the 95% bootstrap interval; dense as a dotted line."""
    from .plots import _pyplot, _save

    plt = _pyplot()
    lengths = lengths_of(results)
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.8), squeeze=False)
    seen = set()
    for ax, L in zip(axes[0], lengths, strict=True):
        for m in methods_of(results):
            a = average(results, m, L)
            if not a["n"]:
                continue
            fam = family(m)
            if m == BASELINE:
                ax.axhline(a["score"], color="black", ls=":", lw=1, label=None if "dense" in seen else "dense")
                seen.add("dense")
                continue
            ax.errorbar(a["kept"], a["score"], yerr=[[a["score"] - a["low"]], [a["high"] - a["score"]]], fmt="o",
                        color=FAMILY_COLOURS[fam], ms=4, capsize=2, label=None if fam in seen else fam.replace("_", " "))
            seen.add(fam)
            ax.annotate(m.removeprefix("tca-"), (a["kept"], a["score"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set(title=f"RULER, {L // 1024}K tokens", xlabel="KV kept (positions held / dense)", xlim=(0, 1.05), ylim=(-3, 103))
    axes[0][0].set_ylabel("RULER average (0-100)")
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=7, loc="lower right")
    return _save(plt, fig, path)


def plot_score_vs_length(results: dict, path: str | Path) -> Path:
    """RULER average against the context length, one line per method (its mean KV kept over the lengths in the
    legend), error bars = the 95% bootstrap interval: the view where methods at one kept fraction crowd the
    score-vs-kept plot."""
    from .plots import MARKERS, _pyplot, _save

    plt = _pyplot()
    lengths = lengths_of(results)
    fig, ax = plt.subplots(figsize=(8.5, 5.0))
    per_family: dict[str, int] = {}
    for m in methods_of(results):
        points = [(L, average(results, m, L)) for L in lengths]
        points = [(L, a) for L, a in points if a["n"]]
        if not points:
            continue
        fam = family(m)
        n = per_family[fam] = per_family.get(fam, -1) + 1
        xs = [L // 1024 for L, _ in points]
        ys = [a["score"] for _, a in points]
        kept = sum(a["kept"] for _, a in points) / len(points)
        ax.errorbar(xs, ys, yerr=[[a["score"] - a["low"] for _, a in points], [a["high"] - a["score"] for _, a in points]],
                    color=FAMILY_COLOURS[fam], marker=MARKERS[n % len(MARKERS)], ls=(":" if m == BASELINE else "-"),
                    lw=1.2, ms=4, capsize=2, label=f"{m} (kept {kept:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks([L // 1024 for L in lengths], [f"{L // 1024}K" for L in lengths])
    ax.set(xlabel="context length (tokens)", ylabel="RULER average (0-100)", ylim=(-3, 103),
           title="RULER against context length (KV kept in the legend)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(plt, fig, path)

"""Summaries of a results dict (see harness.evaluate): per-method numbers, markdown tables, target checks."""

from __future__ import annotations

import math

BASELINE = "dense"


def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else math.nan


def needle_scores(results: dict, method: str, task: str | None = None, length: int | None = None) -> float:
    return _mean(
        r["score"] for r in results["needles"]
        if r["method"] == method and (task is None or r["task"] == task) and (length is None or r["length"] == length)
    )


def kept_fraction(results: dict, method: str, length: int | None = None) -> float:
    """Mean kept fraction of the KV cache over the needle prompts (and decode perplexity runs)."""
    rows = [r for r in results["needles"] if r["method"] == method and (length is None or r["length"] == length)]
    rows += [r for r in results["perplexity"] if r["method"] == method and r["mode"] == "decode" and (length is None or r["length"] == length)]
    return _mean(r["kept_fraction"] for r in rows)


def perplexity(results: dict, method: str, length: int | None = None, mode: str = "decode") -> float:
    """exp(mean NLL) over the documents (of one length, or all)."""
    nll = _mean(r["nll"] for r in results["perplexity"] if r["method"] == method and r["mode"] == mode and (length is None or r["length"] == length))
    return math.exp(nll) if not math.isnan(nll) else math.nan


def _lengths(results: dict, key: str) -> list[int]:
    return sorted({r["length"] for r in results[key]})


def tasks_in_order(rows) -> list[str]:
    """The tasks of result rows (dicts with a "task"), each once, in the order they first appear."""
    return list(dict.fromkeys(r["task"] for r in rows))


def _tasks(results: dict) -> list[str]:
    return tasks_in_order(results["needles"])


def method_summary(results: dict, method: str) -> str:
    parts = [f"{method}: KV kept {kept_fraction(results, method):.3f} (all prompts)"]
    for task in _tasks(results):
        parts.append(f"{task} {needle_scores(results, method, task):.2f}")
    for L in _lengths(results, "perplexity"):
        parts.append(f"ppl@{L} {perplexity(results, method, L):.3f}")
    return "  ".join(parts)


def needle_misses(results: dict, method: str, baseline: str = BASELINE) -> tuple[int, int, list[dict]]:
    """Cells (task, length, depth, index) where the baseline scores 1 and `method` scores less.

    Returns (misses, cells where the baseline succeeds, the missed cells)."""
    base = {(r["task"], r["length"], r["depth"], r["index"]): r["score"] for r in results["needles"] if r["method"] == baseline}
    missed, total = [], 0
    for r in results["needles"]:
        key = (r["task"], r["length"], r["depth"], r["index"])
        if r["method"] == method and base.get(key) == 1.0:
            total += 1
            if r["score"] < 1.0:
                missed.append(r)
    return len(missed), total, missed


def length_label(L: int) -> str:
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def _fmt(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(x: float, base: float) -> str:
    if any(isinstance(v, float) and math.isnan(v) for v in (x, base)):
        return "-"
    return f"{100 * (x / base - 1):+.1f}%"


def ordered_methods(results: dict) -> list[str]:
    """Dense first, then calibrated plans by tau, then fixed budgets by size, then the rest as run."""
    def key(item):
        index, (name, info) = item
        kind = info.get("kind")
        if kind == "dense":
            return (0, 0.0, index)
        if kind == "calibrated":
            return (1, (info.get("config") or {}).get("tau", 0.0), index)
        if kind == "fixed" and name.startswith("tca-fixed"):
            return (2, info.get("mu") or 0.0, index)
        return (3, 0.0, index)

    return [name for _, (name, _) in sorted(enumerate(results["methods"].items()), key=key)]


KEPT_LEGEND = ("KV kept: positions the cache holds / positions a dense cache holds, averaged over the needle prompts "
               "and decode-perplexity texts of every length (all prompts) or of one length (@2K, ...)")


def markdown_table(results: dict, baseline: str = BASELINE) -> str:
    """One row per method: kept KV fraction, needle accuracy per task, misses vs dense, decode perplexity
    per length with its change against dense."""
    tasks, ppl_lengths, lengths = _tasks(results), _lengths(results, "perplexity"), _lengths(results, "needles")
    head = ["method", "KV kept (all prompts)"] + [f"KV kept @{length_label(L)}" for L in lengths] + tasks
    head += ["misses vs dense"]
    head += [f"ppl@{length_label(L)}" for L in ppl_lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ordered_methods(results):
        row = [f"`{name}`", _fmt(kept_fraction(results, name), 3)]
        row += [_fmt(kept_fraction(results, name, L), 3) for L in lengths]
        row += [_fmt(needle_scores(results, name, t)) for t in tasks]
        if name == baseline or baseline not in results["methods"]:
            row.append("")
        else:
            misses, total, _ = needle_misses(results, name, baseline)
            row.append(f"{misses}/{total}")
        for L in ppl_lengths:
            p = perplexity(results, name, L)
            delta = "" if name == baseline else f" ({_pct(p, perplexity(results, baseline, L))})"
            row.append(_fmt(p, 3) + delta)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def targets(results: dict, method: str = "tca-tau0.9", baseline: str = BASELINE, max_ppl_increase: float = 0.02, max_kept: float = 0.5) -> dict:
    """The quality targets for one method: needles equal to dense wherever dense succeeds; decode perplexity
    within +2% of dense at every length while keeping at most 50% of the KV."""
    if method not in results["methods"] or baseline not in results["methods"]:
        return {}
    misses, total, _ = needle_misses(results, method, baseline)
    per_length = {}
    for L in _lengths(results, "perplexity"):
        p, b = perplexity(results, method, L), perplexity(results, baseline, L)
        kept = kept_fraction(results, method, L)
        per_length[L] = {
            "ppl_increase": p / b - 1,
            "kept_fraction": kept,
            "met": p / b - 1 <= max_ppl_increase and kept <= max_kept,
        }
    return {
        "needle_misses": misses,
        "needle_cells_dense_succeeds": total,
        "needles_met": misses == 0,
        "perplexity": per_length,
        "perplexity_met": all(v["met"] for v in per_length.values()),
    }

"""Plot and tabulate an end-to-end result of benchmarks/e2e_generate.py: time to first token, decode time per
token and KV bytes against prompt length, every method in the same colour in every panel.

    python benchmarks/plot_e2e.py benchmarks/results/e2e_h100.json benchmarks/results/e2e_flash_h100.json \
        --png docs/benchmarks_e2e.png --markdown
"""

from __future__ import annotations

import argparse
import json

COLOURS = {"dense": "#444444", "dense-kernels": "#999999",  # dense-kernels: dense budgets on tca's decode kernels
 "tca-triton": "#1f77b4", "tca-flash": "#d62728",
           "tca-auto": "#2ca02c"}


def single_rows(results: dict) -> list[dict]:
    return [r for r in results["rows"] if r.get("batch") == 1 and "ttft_s" in r]


def markdown(results: dict) -> str:
    """One row per (length, mode, method) with ratios against the fastest dense path of the same mode."""
    rows = single_rows(results)
    lines = ["| L | mode | method | TTFT s | TTFT speed-up | decode ms/token | decode x dense | KV GiB | kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["length"], r["mode"], r["method"])):
        dense = [d for d in rows if d["length"] == r["length"] and d["mode"] == r["mode"]
                 and d["method"] in ("dense", "dense-kernels")]
        ttft = min(d["ttft_s"] for d in dense if d["method"] == "dense") if dense else float("nan")
        decode = min(d["decode_ms"] for d in dense) if dense else float("nan")
        lines.append(
            f"| {r['length'] // 1024}K | {r['mode']} | {r['method']} | {r['ttft_s']:.3f} ± {r['ttft_spread_s'] / 2:.3f} | "
            f"{ttft / r['ttft_s']:.2f}x | {r['decode_ms']:.2f} | {r['decode_ms'] / decode:.2f}x | "
            f"{r['kv_bytes'] / 2**30:.2f} | {r.get('kept_fraction', 1.0):.2f} |"
        )
    batches = [r for r in results["rows"] if "ttft_s" not in r and r.get("batch")]
    if batches:
        lines += ["", "| method | mode | largest batch at L | decode ms/step | tokens/s | KV GiB |", "|---|---|---|---|---|---|"]
        for r in batches:
            lines.append(f"| {r['method']} | {r['mode']} | {r['batch']} at {r['length'] // 1024}K | "
                         f"{r['decode_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['kv_bytes'] / 2**30:.1f} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = single_rows(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    # Prefill is eager in both modes: time to first token and KV bytes come from any row of a (method, length).
    panels = [("ttft_s", None, "time to first token (s)"), ("decode_ms", "graph", "decode ms per token (CUDA graph)"),
              ("kv_bytes", None, "KV cache (GiB)")]
    for ax, (key, mode, title) in zip(axes, panels, strict=True):
        for method, colour in COLOURS.items():
            points = sorted({r["length"]: r[key] for r in rows if r["method"] == method and mode in (None, r["mode"])}.items())
            if not points or (key == "ttft_s" and method == "dense-kernels"):
                continue
            xs = [p[0] // 1024 for p in points]
            ys = [p[1] / 2**30 if key == "kv_bytes" else p[1] for p in points]
            ax.plot(xs, ys, "o-", color=colour, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (K tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.subplots_adjust(bottom=0.25)
    fig.suptitle(f"{results['device']}: Llama-3.1-8B shape, bf16, batch 1 (torch {results['torch']}, "
                 f"transformers {results.get('transformers')})")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="result JSONs; a (length, mode, method) already read is skipped")
    parser.add_argument("--png")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    results = None
    for path in args.results:
        with open(path) as f:
            more = json.load(f)
        if results is None:
            results = more
            continue
        seen = {(r["length"], r.get("mode"), r["method"], r["batch"]) for r in results["rows"]}
        results["rows"] += [r for r in more["rows"] if (r["length"], r.get("mode"), r["method"], r["batch"]) not in seen]
    if args.png:
        plot(results, args.png)
    if args.markdown:
        print(markdown(results))


if __name__ == "__main__":
    main()

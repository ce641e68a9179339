"""Plot a vllm_serving.py comparison: time to first token and decode step per prompt length, TCA against vLLM.

    python benchmarks/plot_vllm_serving.py benchmarks/results/vllm_8b_h100_flash_attn_run2.json \
        benchmarks/results/vllm_8b_h100_tca_run2.json --out docs/vllm_serving_h100.png

Batch-1 rows only (not the --saturate run). A decode step that is not positive (an older file's difference of two
whole runs, which their prefills' spread can exceed) is left out of the decode panel, and the figure says so.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="vllm_serving.py --out files")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for path in args.results for row in json.load(open(path))["rows"]]
    environment = json.load(open(args.results[0]))["environment"]
    names = {"vllm": "vLLM FlashAttention (FA3)", "tca": "TCA plugin (default budgets)"}
    figure, (ttft, decode) = plt.subplots(1, 2, figsize=(10, 4))
    dropped = []
    for backend in sorted({row["backend"] for row in rows}):
        mine = sorted((row for row in rows if row["backend"] == backend and row["batch"] == 1), key=lambda row: row["L"])
        label = names.get(backend, backend)
        ttft.plot([row["L"] // 1024 for row in mine], [row["ttft_s"] for row in mine], "o-", label=label)
        timed = [row for row in mine if row["decode_step_ms"] > 0]
        dropped += [f"{backend} {row['L'] // 1024}K" for row in mine if row["decode_step_ms"] <= 0]
        decode.plot([row["L"] // 1024 for row in timed], [row["decode_step_ms"] for row in timed], "o-", label=label)
    if dropped:
        decode.set_title(f"not measured: {', '.join(dropped)}", fontsize=9)
    for axis, label in ((ttft, "time to first token (s)"), (decode, "decode step, batch 1 (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("prompt length (K tokens)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"vLLM {environment['vllm']}, Llama-3.1-8B shape (random weights), {environment['device']}")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()

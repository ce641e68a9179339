"""What a user's `generate` feels, against the floor of a decode step: dense and TCA in the same run, each path a
real `model.generate` call as a user writes it (Llama-3.1-8B shape with random bf16 weights by default).

Counted first, then measured: the floor of one decode step is reading every weight once (timed here as one GEMV
over every weight matrix a step reads: all but the input embedding, of which a step reads one row, unless it is
tied to the output) plus the KV it must read (the kept KV at that same rate). Then, per prompt length:

    dense        transformers' sdpa with its DynamicCache: plain generate
    tca          enable_tca(model) (backend "auto"), TCACache: plain generate
    dense-graph  the dense plan (every token kept) on TCACache + custom_generate=graph_decoding
    tca-graph    enable_tca(model), TCACache + custom_generate=graph_decoding (CUDA only)

TTFT is generate(max_new_tokens=1); the first decode step is generate(2) - generate(1) (on the graph paths it
captures the step: a one-time cost of every generate call); decode is the steady rate after it,
(generate(2 + N) - generate(2)) / N; each is the median of --repeats runs after one untimed warm-up. Decode is reported against the floor and against the fastest
dense path of the run; for the graph paths also against the bare replay of the same captured step (one
`StepGraph.step` per token after a prefill, no `generate` around it): what `generate`'s loop adds.

    python benchmarks/generate_user.py --lengths 32768,131072 --out $OUT/generate_user.json --png $OUT/generate_user.png
    python benchmarks/generate_user.py --tiny --device cpu --lengths 256 --new-tokens 4   # plumbing on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
from tqdm import tqdm

from tca.models import TCACache, cache_kwargs, dense_plan, enable_tca, graph_decoding, model_shape
from tca.models.graphs import StepGraph, prepare_static
from tca.models.random_shapes import SHAPES, random_model

PATHS = ("dense", "tca", "dense-graph", "tca-graph")
GRAPH_PATHS = ("dense-graph", "tca-graph")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_read_seconds(model, repeats: int = 5) -> tuple[float, int]:
    """(seconds to read every weight matrix once as a GEMV, their bytes): the weights' floor of a decode step."""
    device = next(model.parameters()).device
    # A decode step reads one row of the input embedding: leave it out, unless it is the output matrix too (tied).
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    matrices = [p for p in model.parameters() if p.dim() == 2 and (tied or p is not embedding)]
    vectors = {m.shape[1]: torch.ones(m.shape[1], 1, dtype=m.dtype, device=device) for m in matrices}
    nbytes = sum(m.numel() * m.element_size() for m in matrices)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first pass warms the kernels up
            sync(device)
            start = time.perf_counter()
            for m in matrices:
                torch.matmul(m, vectors[m.shape[1]])
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), nbytes


def use(model, path: str, config) -> None:
    """Switch the model's attention for `path` (enable_tca is undone by setting sdpa back)."""
    if path == "dense":
        model.set_attn_implementation("sdpa")
    elif path == "dense-graph":
        backend = "triton" if next(model.parameters()).is_cuda else "torch"
        enable_tca(model, plan=dense_plan(model_shape(model), config), backend=backend)
    else:
        enable_tca(model, config=config)


def generate_seconds(model, path: str, ids: torch.Tensor, new_tokens: int) -> tuple[float, object]:
    """Seconds of one generate call of `path` producing `new_tokens` tokens, and the cache it filled."""
    device = ids.device
    cache = None if path == "dense" else TCACache(model)
    kwargs = {} if cache is None else cache_kwargs(model, cache)
    if path in GRAPH_PATHS:
        kwargs["custom_generate"] = graph_decoding
    mask = torch.ones_like(ids)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0, **kwargs)
    sync(device)
    return time.perf_counter() - start, cache


def measure(model, path: str, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """TTFT, the first decode step and the steady decode ms per token of `path` on prompt ids [1, L] (medians over
    repeats, after a warm-up). The first decode step is timed apart because on the graph paths it also captures
    the step (every generate call does, once): decode = (t(2 + N) - t(2)) / N, first step = t(2) - t(1)."""
    generate_seconds(model, path, ids, 2)  # warm-up: kernels compiled, graphs' first capture made
    first = [generate_seconds(model, path, ids, 1)[0] for _ in range(repeats)]
    second = [generate_seconds(model, path, ids, 2)[0] for _ in range(repeats)]
    whole = []
    for _ in range(repeats):
        seconds, cache = generate_seconds(model, path, ids, 2 + new_tokens)
        whole.append(seconds)
        kv = cache.nbytes if cache is not None else None
        del cache  # one cache alive at a time: at 128K a dense plan's holds 16 GiB on the 8B shape
    ttft, two, total = statistics.median(first), statistics.median(second), statistics.median(whole)
    return {"path": path, "length": ids.shape[1], "ttft_s": ttft, "ttft_spread_s": max(first) - min(first),
            "first_step_ms": (two - ttft) * 1e3, "decode_ms": (total - two) / new_tokens * 1e3,
            "total_spread_s": max(whole) - min(whole), "kv_bytes": kv, "repeats": repeats, "new_tokens": new_tokens}


def replay_ms(model, ids: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """ms per bare replay of the captured decode step after a prefill of ids [1, L] (median over repeats)."""
    device = ids.device
    times = []
    for _ in range(repeats):
        cache = TCACache(model)
        positions = torch.arange(ids.shape[1], device=device)[None]
        with torch.no_grad():
            out = model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                        **cache_kwargs(model, cache))
            token = out.logits[:, -1:].argmax(-1)
            prepare_static(cache, new_tokens + 1)
            graph = StepGraph(model, cache, token, positions[:, -1:] + 1, torch.tensor([ids.shape[1]], device=device))
            graph.capture()
            sync(device)
            start = time.perf_counter()
            for _ in range(new_tokens):
                graph.step(token)
            sync(device)
        times.append((time.perf_counter() - start) / new_tokens * 1e3)
        del graph, cache
    return statistics.median(times)


def dense_kv_bytes(model, length: int) -> int:
    """Bytes of a dense KV cache of `length` tokens (every layer, key and value)."""
    shape = model_shape(model)
    element = next(model.parameters()).element_size()
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * length * element


def table(results: dict) -> str:
    """The user-level table: TTFT (x dense), decode ms (x floor, x the fastest dense path), KV GiB."""
    lines = ["| L | path | TTFT s (speed-up) | first decode step ms | decode ms/token | x floor | x fastest dense | "
             "x bare replay | KV GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for length in sorted({r["length"] for r in results["rows"]}):
        rows = [r for r in results["rows"] if r["length"] == length and "ttft_s" in r]
        floor = results["floors"][str(length)]
        dense_ttft = next((r["ttft_s"] for r in rows if r["path"] == "dense"), float("nan"))
        dense_decode = min((r["decode_ms"] for r in rows if r["path"].startswith("dense")), default=float("nan"))
        for r in rows:
            kv = r["kv_bytes"] if r["kv_bytes"] is not None else results["dense_kv_bytes"][str(length)]
            lines.append(
                f"| {_tokens(length)} | {r['path']} | {r['ttft_s']:.3f} ({dense_ttft / r['ttft_s']:.2f}x) | "
                f"{_first_step(r)} | {r['decode_ms']:.2f} | {r['decode_ms'] / floor['dense_ms' if r['path'].startswith('dense') else 'tca_ms']:.2f}x | "
                f"{r['decode_ms'] / dense_decode:.2f}x | {_versus_replay(r)} | {kv / 2**30:.2f} |"
            )
        lines.append(f"| {_tokens(length)} | floor | | | dense {floor['dense_ms']:.2f}, TCA {floor['tca_ms']:.2f} | | | | |")
    return "\n".join(lines)


def plot(results: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in results["rows"]})
    paths = [p for p in PATHS if any(r["path"] == p and "ttft_s" in r for r in results["rows"])]
    fig, (ax_ttft, ax_decode) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(paths))
    for i, path in enumerate(paths):
        rows = {r["length"]: r for r in results["rows"] if r["path"] == path and "ttft_s" in r}
        xs = [j + i * width for j, L in enumerate(lengths) if L in rows]
        ax_ttft.bar(xs, [rows[L]["ttft_s"] for L in lengths if L in rows], width, label=path)
        ax_decode.bar(xs, [rows[L]["decode_ms"] for L in lengths if L in rows], width, label=path)
    for j, L in enumerate(lengths):
        floor = results["floors"][str(L)]
        span = (j - width / 2, j + 0.8 - width / 2)
        ax_decode.hlines(floor["tca_ms"], *span, colors="black", linestyles="--", label="TCA floor" if j == 0 else None)
        ax_decode.hlines(floor["dense_ms"], *span, colors="grey", linestyles=":", label="dense floor" if j == 0 else None)
    for ax, title in ((ax_ttft, "time to first token (s)"), (ax_decode, "decode (ms per token)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(lengths))], [_tokens(L) for L in lengths])
        ax.set_title(title)
    ax_decode.legend(fontsize=7)
    fig.suptitle(f"generate, {results['shape']}, batch 1, {results['device']}")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", default="llama-3.1-8b-shape", choices=sorted(SHAPES))
    parser.add_argument("--tiny", action="store_true", help="a 2-layer toy of the Llama architecture (plumbing)")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="generate_user.json")
    parser.add_argument("--png", help="also draw the table as a plot here")
    args = parser.parse_args(argv)
    import tca

    device = torch.device(args.device)
    lengths = [int(x) for x in args.lengths.split(",")]
    paths = args.paths.split(",")
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        parser.error(f"--paths: unknown {unknown}; known: {', '.join(PATHS)}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES["llama-tiny-shape"] if args.tiny else SHAPES[args.shape]
    model = random_model(shape, max(lengths) + args.new_tokens + 8, dtype, device)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    config = tca.TCAConfig(block_size=16, window=64) if args.tiny else tca.TCAConfig()
    seconds, weight_bytes = weight_read_seconds(model)
    rate = weight_bytes / seconds
    results = {"shape": "llama-tiny-shape" if args.tiny else args.shape, "device": _device_name(device),
               "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "weights_bytes": weight_bytes, "weights_read_ms": seconds * 1e3, "read_bytes_per_s": rate,
               "floors": {}, "dense_kv_bytes": {}, "rows": []}
    print(f"weights {weight_bytes / 2**30:.2f} GiB read in {seconds * 1e3:.2f} ms ({rate / 1e9:.0f} GB/s)", flush=True)
    generator = torch.Generator().manual_seed(0)
    for length in tqdm(lengths, desc="lengths", file=sys.stdout):
        ids = torch.randint(1, model.config.vocab_size, (1, length), generator=generator).to(device)
        dense_kv = dense_kv_bytes(model, length)
        results["dense_kv_bytes"][str(length)] = dense_kv
        rows = []
        for path in paths:
            if path in GRAPH_PATHS and device.type != "cuda":
                rows.append({"path": path, "length": length, "skipped": "graph_decoding needs a CUDA device"})
                continue
            use(model, path, config)
            rows.append(measure(model, path, ids, args.new_tokens, args.repeats))
            if path in GRAPH_PATHS:
                rows[-1]["replay_ms"] = replay_ms(model, ids, args.new_tokens, args.repeats)
            print(json.dumps(rows[-1]), flush=True)
        kept = min((r["kv_bytes"] for r in rows if r.get("path", "").startswith("tca") and r.get("kv_bytes")),
                   default=dense_kv)
        results["floors"][str(length)] = {"dense_ms": (weight_bytes + dense_kv) / rate * 1e3,
                                          "tca_ms": (weight_bytes + kept) / rate * 1e3}
        results["rows"] += rows
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))
    if args.png:
        plot(results, args.png)
    return 0


def _first_step(row: dict) -> str:
    first = row.get("first_step_ms")  # absent from results written before it was timed apart
    return "" if first is None else f"{first:.1f}"


def _versus_replay(row: dict) -> str:
    replay = row.get("replay_ms")
    return f"{row['decode_ms'] / replay:.2f}x of {replay:.2f} ms" if replay else ""


def _tokens(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


if __name__ == "__main__":
    raise SystemExit(main())

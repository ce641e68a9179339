"""`python -m tca bench`: end-to-end generation dense vs TCA (time to first token, decode tokens/s, peak
memory, KV-cache bytes) and, on a GPU, the per-layer kernel benchmark (benchmarks/bench_kernels.py).

    python -m tca bench                                    # GPU: kernels + end to end; CPU: end to end, small
    python -m tca bench --no-kernels --lengths 2048 --new-tokens 16 --out benchmarks/results/bench_e2e_cpu.json
    python -m tca bench --model tiny --lengths 256 --new-tokens 4          # seconds, for tests
    python -m tca bench --model llama-3.1-8b-shape --out e2e.json           # GPU: an 8B model, random weights

--model llama-3.1-8b-shape runs benchmarks/e2e_generate.py: the Llama-3.1-8B shape with random bf16 weights (no
download), eager and CUDA-graph decoding, dense baselines of both paths and the largest batch at the longest
length (docs/benchmarks.md reports it).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from ._args import (
    SHIPPED_MODELS,
    UsageError,
    check_backend,
    check_context,
    check_plan_file,
    check_positive,
    lengths,
    resolve_device,
    resolve_model,
)

MIN_REPEATS = 3  # fewer timed runs give no spread to report
HELP = "benchmarks: end-to-end generate dense vs TCA (TTFT, decode tok/s, memory); Triton kernels on a GPU"
KERNEL_SCRIPT = Path("benchmarks") / "bench_kernels.py"
E2E_SCRIPT = Path("benchmarks") / "e2e_generate.py"
SHAPE_MODELS = {"llama-3.1-8b-shape": "the Llama-3.1-8B shape with random bf16 weights (GPU; benchmarks/e2e_generate.py)"}


def configure(parser) -> None:
    parser.add_argument("--model", default="smollm2",
                        help=f"a shipped model ({', '.join(SHIPPED_MODELS)}), a local Hugging Face model directory, "
                        f"a .gguf file, or {', '.join(SHAPE_MODELS)} (random weights of that shape)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--backend", default="auto", help="TCA backend (auto: the best available)")
    parser.add_argument("--lengths", type=lengths,
                        help="prompt lengths in tokens, e.g. 2048 or 4k,32K (default: GPU 4k,8k,16k,32k; CPU 2k)")
    parser.add_argument("--new-tokens", type=int, help="decoded tokens per run (default: GPU 128, CPU 16)")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS,
                        help=f"timed runs per point, at least {MIN_REPEATS}: best and spread reported ({MIN_REPEATS})")
    parser.add_argument("--plan", help="budget plan JSON for TCA (default: the shipped SmolLM2 plan, or default budgets)")
    parser.add_argument("--block-size", type=int, default=None, help="block size of the default budgets (64); not with --plan")
    parser.add_argument("--window", type=int, default=None, help="window of the default budgets (512); not with --plan")
    parser.add_argument("--out", help="results JSON")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel benchmark (GPU only anyway)")
    parser.add_argument("--kernel-args", default="", help="extra arguments for benchmarks/bench_kernels.py")
    parser.add_argument("--verbose", action="store_true", help="show the model loader's progress bars")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def generate_once(model, ids, new_tokens: int, cache) -> dict:
    """Greedy prefill + decode with `cache`; times the first token and the decode steps separately."""
    import torch

    from tca.eval.harness import _cache_kwargs

    device = ids.device
    kwargs = _cache_kwargs(model, cache)
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, use_cache=True, **kwargs)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        decode = time.perf_counter() - start
    return {"ttft_s": ttft, "decode_s": decode, "decode_tokens_per_s": (new_tokens - 1) / decode if decode > 0 else None}


def end_to_end(model, tokenizer, lengths, new_tokens, repeats, plan, backend, progress=True) -> list[dict]:
    """One row per (length, method): best-of-repeats TTFT and decode tokens/s, peak memory, KV-cache bytes."""
    import torch
    from tqdm.auto import tqdm

    from tca.eval.corpus import evaluation_text
    from tca.eval.methods import Runner
    from tca.models import TCACache, disable_tca, enable_tca

    device = next(model.parameters()).device
    text_ids = tokenizer.encode(evaluation_text(), add_special_tokens=False)
    rows = []
    points = [(L, m) for L in lengths for m in ("dense", "tca")]
    for L, method in tqdm(points, desc="end to end", disable=not progress):
        ids = torch.tensor([(text_ids * (1 + L // len(text_ids)))[:L]], device=device)
        disable_tca(model)
        if method == "tca":
            enable_tca(model, plan=plan, backend=backend)

        def make_cache(method=method):
            if method == "tca":
                return TCACache(model)
            from transformers import DynamicCache

            return DynamicCache()

        generate_once(model, ids[:, : min(L, 1024)], 2, make_cache())  # warm-up (kernels compile here)
        runs, peak, cache = [], None, None
        for _ in range(repeats):
            cache = make_cache()
            _peak_reset(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            runs.append(generate_once(model, ids, new_tokens, cache))
            peak = _peak(device)
            peak = None if peak is None else peak - base
        # Best of the repeats, each part on its own (the usual way to time: noise only adds).
        best = {"ttft_s": min(r["ttft_s"] for r in runs), "decode_s": min(r["decode_s"] for r in runs)}
        best["decode_tokens_per_s"] = (new_tokens - 1) / best["decode_s"] if best["decode_s"] > 0 else None
        kv_bytes = Runner.cache_bytes(cache)
        rows.append({
            "length": L, "method": method, "new_tokens": new_tokens, **best,
            "ttft_s_all": [r["ttft_s"] for r in runs], "decode_s_all": [r["decode_s"] for r in runs],
            "peak_extra_bytes": peak, "kv_cache_bytes": kv_bytes,
            "kept_fraction": Runner.kept_fraction(cache),
        })
        del cache
    disable_tca(model)
    return rows


def spread(values: list[float]) -> float:
    """(max - min) / min of the timed repeats: how much the runs disagree (0 with one run)."""
    return (max(values) - min(values)) / min(values) if values and min(values) > 0 else 0.0


def table(rows: list[dict]) -> str:
    """Best of the repeats, with their spread ((max - min) / min) in parentheses."""
    lines = ["| L | method | TTFT (ms, spread) | decode tok/s (spread) | KV cache (MB) | kept | peak extra memory (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.0f}"
        tps = "-" if r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s']:.1f}"
        ttft = f"{1000 * r['ttft_s']:.1f} ({spread(r.get('ttft_s_all', [])):.0%})"
        tps += f" ({spread(r.get('decode_s_all', [])):.0%})" if r["decode_tokens_per_s"] is not None else ""
        lines.append(f"| {r['length']} | {r['method']} | {ttft} | {tps} | "
                     f"{r['kv_cache_bytes'] / 2**20:.2f} | {r['kept_fraction']:.3f} | {peak} |")
    return "\n".join(lines)


def check_args(args):
    """Arguments and files checked before anything loads: (model choice, BudgetPlan or None)."""
    import torch

    check_positive("--repeats", args.repeats, MIN_REPEATS)
    check_positive("--new-tokens", args.new_tokens, 2)
    check_context("--lengths", args.lengths or [], args.model)
    device = resolve_device(args.device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    check_backend(args.backend, device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32))
    plan = check_plan_file(args.plan) if args.plan else None
    if plan is not None and (args.block_size is not None or args.window is not None):
        raise UsageError("--block-size and --window set the default budgets; a --plan fixes its own "
                         f"(b={plan.config.block_size}, w={plan.config.window}): pass one or the other")
    return resolve_model(args.model), plan


def run_shape_model(args) -> int:
    """The end-to-end benchmark of a model shape with random weights: benchmarks/e2e_generate.py."""
    import torch

    if args.plan or args.repeats != MIN_REPEATS:
        raise UsageError(f"--model {args.model} runs {E2E_SCRIPT} with default budgets: --plan and --repeats do not apply")
    if not E2E_SCRIPT.is_file():
        raise UsageError(f"--model {args.model} needs {E2E_SCRIPT}: run from the repository root")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda"):
        raise UsageError(f"--model {args.model} needs a CUDA GPU (16 GB of weights); on a CPU try --model tiny")
    command = [sys.executable, str(E2E_SCRIPT), "--device", device, "--batch-search",
               "--out", args.out or "e2e.json", "--window", str(args.window or 4096),
               "--block-size", str(args.block_size or 128)]
    if args.lengths:
        command += ["--lengths", ",".join(map(str, args.lengths))]
    if args.new_tokens:
        command += ["--new-tokens", str(args.new_tokens)]
    print("end to end:", " ".join(command), flush=True)
    return subprocess.call(command)


def run(args) -> int:
    import torch

    if args.model in SHAPE_MODELS:
        return run_shape_model(args)
    choice, plan = check_args(args)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if gpu and not args.no_kernels:
        if KERNEL_SCRIPT.is_file():
            command = [sys.executable, str(KERNEL_SCRIPT), *args.kernel_args.split()]
            print("kernels:", " ".join(command), flush=True)
            status = subprocess.call(command)
            if status:
                print(f"the kernel benchmark exited with status {status}", file=sys.stderr)
        else:
            print(f"kernel benchmark skipped: {KERNEL_SCRIPT} not found (run from the repository root)", file=sys.stderr)
    elif not gpu and not args.no_kernels:
        print("kernel benchmark skipped: it needs a CUDA GPU (the end-to-end benchmark runs on any device)")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if gpu else torch.float32)
    lengths = args.lengths or ([4096, 8192, 16384, 32768] if gpu else [2048])
    new_tokens = args.new_tokens or (128 if gpu else 16)
    repeats = args.repeats
    from tca.config import TCAConfig

    model, tokenizer = choice.load(str(device), dtype, verbose=args.verbose)
    plan_name = args.plan
    if plan is None and choice.kind == "shipped" and choice.name != "tiny":
        from tca.models.budget_plans import PLANS_DIR
        from tca.models.catalogue import named_model

        shipped = named_model(choice.name).plan
        if shipped and (PLANS_DIR / f"{shipped}.json").is_file():
            plan, plan_name = check_plan_file(str(PLANS_DIR / f"{shipped}.json")), f"the plan shipped for {choice.name}"
    from tca.models import enable_tca

    if plan is None:
        from tca.models import default_plan, model_shape

        config = TCAConfig(block_size=args.block_size or 64, window=args.window or 512)
        plan = default_plan(model_shape(model), config)
        plan_name = f"default budgets (b={config.block_size}, w={config.window})"
    try:
        enable_tca(model, plan=plan, backend=args.backend)  # validates the plan against the model once
    except ValueError as error:  # a plan made for another model
        raise UsageError(f"--plan {args.plan}: {error}") from None
    print(f"end to end: {args.model}, lengths {lengths}, {new_tokens} new tokens, {repeats} timed runs per point, "
          f"TCA with {plan_name}", flush=True)
    rows = end_to_end(model, tokenizer, lengths, new_tokens, repeats, plan, args.backend)
    print(table(rows))
    if args.out:
        meta = {
            "model": args.model, "device": torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu",
            "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "backend": args.backend,
            "plan": str(plan_name), "repeats": repeats,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"metadata": meta, "rows": rows}, indent=1) + "\n")
        print("wrote", args.out)
    return 0

"""Prefill of a left-padded batch (docs/semantics.md section 9.1), one attention layer: one call against one
sequence at a time, and dense attention, in the same run.

    PYTHONPATH=src python benchmarks/padded_prefill.py                       # GPU: bf16, Llama-3.1-8B's heads
    PYTHONPATH=src python benchmarks/padded_prefill.py --tiny --device cpu   # CPU smoke test (seconds)
    PYTHONPATH=src python benchmarks/padded_prefill.py --model llama-3.1-8b-shape --batches 8x2K-16K,4x12K-32K

Methods, each over the same random q, k, v (B sequences left-padded to the longest):
- tca-one-call: tca.prefill(starts=...) on triton (the kernels read each sequence's start; one launch each);
- tca-per-sequence: the same, one sequence at a time, caches joined (what a backend without "varlen" does);
- dense-masked: SDPA over the padded batch with a [B, 1, L, L] mask (what transformers' sdpa runs for a padded
  batch), when the mask fits in memory;
- dense-per-sequence: causal SDPA on each sequence's own tokens (the fastest dense path, no mask).
Reported: ms (median of --reps after a warm-up), the ratio against the fastest dense method, and the cache's
bytes. With --model, instead the time to first token of a whole model (random weights of that shape,
tca.models.random_shapes) on the padded batch's token ids and attention mask: transformers' sdpa against
enable_tca(model) (backend "auto"). Results go to $OUT/padded_prefill.json (or --out); a table is printed last.

Shape letters: B batch, HQ query heads, HKV key/value heads, L padded length, D head dim.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

BATCHES = {  # name -> sequence lengths (the batch is padded to the longest)
    "8x2K-16K": [16384, 14336, 12288, 10240, 8192, 6144, 4096, 2048],
    "4x12K-32K": [32768, 28672, 20480, 12288],
    "2x64K-128K": [131072, 65536],
}
TINY = {"tiny": [300, 170, 90]}


def timed(fn, device, reps: int) -> float:
    fn()  # warm-up (compiles kernels)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def dense_masked(q, k, v, starts):
    B, _, L, _ = q.shape
    pos = torch.arange(L, device=q.device)
    keep = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] >= torch.tensor(starts, device=q.device)[:, None, None])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], enable_gqa=True)


def dense_per_sequence(q, k, v, starts):
    out = torch.zeros_like(q)
    for b, s in enumerate(starts):
        out[b : b + 1, :, s:] = F.scaled_dot_product_attention(
            q[b : b + 1, :, s:], k[b : b + 1, :, s:], v[b : b + 1, :, s:], is_causal=True, enable_gqa=True
        )
    return out


def run(name, lengths, args, device, dtype):
    import tca
    from tca.api import prefill_one_by_one
    from tca.budgets import default_budgets
    from tca.padding import LeftPadding

    HQ, HKV, D = args.heads
    L = max(lengths)
    starts = [L - n for n in lengths]
    config = tca.TCAConfig(block_size=args.block_size, window=args.window)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(len(lengths), h, L, D, generator=gen).to(device, dtype) for h in (HQ, HKV, HKV))
    budgets = default_budgets(args.block_size).expand(HKV, -1).to(device, torch.float64).contiguous()
    padding = LeftPadding.of(starts, len(lengths), L)
    scale = D**-0.5
    methods = {
        "tca-one-call": lambda: tca.prefill(q, k, v, config=config, backend=args.backend, starts=starts),
        "tca-per-sequence": lambda: prefill_one_by_one(q, k, v, padding, budgets, config, scale, args.backend),
        "dense-per-sequence": lambda: dense_per_sequence(q, k, v, starts),
    }
    if len(lengths) * L * L <= args.max_mask_bytes:
        methods["dense-masked"] = lambda: dense_masked(q, k, v, starts)
    rows = {}
    for method, fn in methods.items():
        rows[method] = {"ms": timed(fn, device, args.reps)}
    out_one, cache_one = methods["tca-one-call"]()
    out_seq, cache_seq = methods["tca-per-sequence"]()
    same = bool(torch.equal(out_one, out_seq)) and bool(torch.equal(cache_one.lengths, cache_seq.lengths))
    fastest_dense = min(r["ms"] for m, r in rows.items() if m.startswith("dense"))
    for r in rows.values():
        r["speedup_vs_fastest_dense"] = fastest_dense / r["ms"]
    rows["tca-one-call"]["cache_bytes"] = cache_one.nbytes
    rows["tca-per-sequence"]["cache_bytes"] = cache_seq.nbytes
    rows["tca-one-call"]["one_call_vs_per_sequence"] = rows["tca-per-sequence"]["ms"] / rows["tca-one-call"]["ms"]
    dense_bytes = 2 * sum(lengths) * HKV * D * q.element_size()
    return {"batch": name, "lengths": lengths, "outputs_equal": same, "dense_kv_bytes": dense_bytes, "methods": rows}


def run_model(name, lengths, model, args, device):
    """Time to first token of the padded batch: dense (transformers' sdpa, its padding mask) and enable_tca."""
    from tca.models import TCACache, cache_kwargs, enable_tca

    L = max(lengths)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, L - n :] = torch.randint(1, model.config.vocab_size, (n,), generator=gen)
        mask[b, L - n :] = 1
    ids, mask = ids.to(device), mask.to(device)
    rows = {}
    for method in ("dense", "tca-auto"):
        if method == "dense":
            model.set_attn_implementation("sdpa")
        else:
            enable_tca(model)

        def first_token(method=method):
            import transformers

            cache = transformers.DynamicCache(config=model.config) if method == "dense" else TCACache(model)
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1,
                            **cache_kwargs(model, cache))
            return out.logits[:, -1].argmax(-1)

        rows[method] = {"ms": timed(first_token, device, args.reps), "token": first_token().tolist()}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows["tca-auto"]["ttft_speedup_vs_dense"] = rows["dense"]["ms"] / rows["tca-auto"]["ms"]
    return {"batch": name, "lengths": lengths, "model": args.model, "methods": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--heads", type=int, nargs=3, default=[32, 8, 128], metavar=("HQ", "HKV", "D"))
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batches", default=",".join(BATCHES))
    parser.add_argument("--max-mask-bytes", type=float, default=8e9, help="skip dense-masked above this mask size")
    parser.add_argument("--tiny", action="store_true", help="a small batch (CPU smoke test)")
    parser.add_argument("--model", default=None, help="time a whole model of this shape (tca.models.random_shapes)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "padded_prefill.json"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.heads, args.block_size, args.window, args.reps = [4, 2, 32], 16, 64, 1
        if args.backend == "triton" and args.device == "cpu":
            args.backend = "torch"  # the interpreter is too slow for timings; the one-call path needs triton
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batches = TINY if args.tiny else {n: BATCHES[n] for n in args.batches.split(",")}
    from tqdm import tqdm

    if args.model:
        from tca.models.random_shapes import SHAPES, random_model

        model = random_model(SHAPES[args.model], 1 << 17, dtype, device)
        results = [run_model(name, lengths, model, args, device) for name, lengths in tqdm(batches.items(), desc="batches")]
    else:
        results = []
        for name, lengths in tqdm(batches.items(), desc="batches"):
            results.append(run(name, lengths, args, device, dtype))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the batch's tensors are gone: hand their memory to the next one
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "dtype": args.dtype, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.model:  # the model's own heads; enable_tca's defaults (backend "auto", b 128, w 4096)
        meta.update(model=args.model, backend="auto")
    else:
        meta.update(heads=args.heads, block_size=args.block_size, window=args.window, backend=args.backend)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    if args.model:
        print("| batch | method | time to first token, ms | vs dense |")
        print("|---|---|---|---|")
        for r in results:
            for method, m in r["methods"].items():
                print(f"| {r['batch']} | {method} | {m['ms']:.0f} | {m.get('ttft_speedup_vs_dense', 1.0):.2f}x |")
        return 0
    print("| batch | method | ms | vs fastest dense | one call vs per sequence | cache MiB | equal |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for method, m in r["methods"].items():
            per = m.get("one_call_vs_per_sequence")
            cache = m.get("cache_bytes")
            print(f"| {r['batch']} | {method} | {m['ms']:.2f} | {m['speedup_vs_fastest_dense']:.2f}x | "
                  f"{'' if per is None else f'{per:.2f}x'} | {'' if cache is None else f'{cache / 2**20:.0f}'} | "
                  f"{r['outputs_equal']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

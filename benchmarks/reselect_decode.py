"""Decode with re-selection (docs/semantics.md section 5c): time per decode step and bytes, one attention layer.

    PYTHONPATH=src python benchmarks/reselect_decode.py                    # GPU: bf16, 8K and 32K, two head shapes
    PYTHONPATH=src python benchmarks/reselect_decode.py --tiny --device cpu  # CPU smoke test (seconds)

For each head shape (Qwen2.5-0.5B: 14 query / 2 KV heads of dim 64; Llama-3.1-8B: 32 / 8 of dim 128), prompt
length and method, one layer's cache is prefilled from random q, k, v (tca.prefill, paper defaults b = 128,
w = 4096, default budgets) and decoded --steps tokens with tca.decode. Methods: the paper's rule (policy None),
re-selection every 1, 16 and 64 steps with the store on the device, every 16 and 64 steps with the store
offloaded to pinned host memory, and every step over 8 candidate blocks (store on the device, and offloaded). Reported per run: ms per decode step (mean over the timed steps, after --warmup
untimed ones; every step is synchronised), the KV bytes on the device and in host memory after decoding, and the
bytes one step reads (the active keys and values, plus the candidates' keys once per period).

Results go to $OUT/reselect_decode.json (or --out); a table is printed last.

Shape letters: B batch (1), HQ query heads, HKV key/value heads, L prompt tokens, D head dim.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "llama-3.1-8b": (32, 8, 128)}
METHODS = {  # name -> (every, offload, candidate blocks); None: the paper's rule
    "paper": None, "reselect1": (1, False, None), "reselect16": (16, False, None), "reselect64": (64, False, None),
    "reselect16-offload": (16, True, None), "reselect64-offload": (64, True, None),
    "reselect1-blocks8": (1, False, 8), "reselect1-blocks8-offload": (1, True, 8),
}


def bytes_read(cache, every: int | None) -> int:
    """Keys and values attention reads per step, plus the candidates' keys once per `every` steps (section 5c)."""
    from tca.backends.common.cache_protocol import reselection_read_bytes

    return reselection_read_bytes(cache) if every else int(cache.used_nbytes)


def run_one(shape, L, method, args, device, dtype):
    import tca

    HQ, HKV, D = shape
    config = tca.TCAConfig(block_size=args.block_size, window=args.window)
    gen = torch.Generator(device="cpu").manual_seed(0)
    total = L + args.warmup + args.steps
    q, k, v = (torch.randn(1, h, total, D, generator=gen).to(device, dtype) for h in (HQ, HKV, HKV))
    policy = None if METHODS[method] is None else tca.Reselect(*METHODS[method][:2], blocks=METHODS[method][2])
    # A named prefill backend: "auto" would run the dense path below the crossover, where nothing is evicted.
    prefill_backend = args.backend if args.backend != "auto" else ("triton" if torch.device(device).type == "cuda" else "torch")
    _, cache = tca.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], config=config, backend=prefill_backend, policy=policy)
    times = []
    for i in range(L, total):
        sync(device)
        start = time.perf_counter()
        tca.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache, backend=args.backend)
        sync(device)
        if i >= L + args.warmup:
            times.append(time.perf_counter() - start)
    offloaded = int(getattr(cache, "offloaded_nbytes", 0))
    return {
        "shape": args.shape_name, "L": L, "method": method, "ms_per_step": 1e3 * sum(times) / len(times),
        "device_bytes": int(cache.nbytes) - offloaded, "offloaded_bytes": offloaded,
        "summary_bytes": int(getattr(cache, "summary_nbytes", 0)),  # on the device, within device_bytes
        "dense_bytes": 2 * HKV * (total) * D * q.element_size(),
        "read_bytes_per_step": bytes_read(cache, None if policy is None else policy.every),
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", help="decode backend (auto: Triton on a GPU)")
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke sizes: 512 tokens, b=16, w=64, fp32, 8 steps")
    parser.add_argument("--out", help="results JSON (default: $OUT/reselect_decode.json when $OUT is set)")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.tiny:
        args.lengths, args.block_size, args.window, args.steps, args.warmup = "512", 16, 64, 8, 2
        args.shapes = "qwen2.5-0.5b"
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    rows = []
    for name in args.shapes.split(","):
        if name not in SHAPES:
            raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
        args.shape_name = name
        for L in (int(x) for x in args.lengths.split(",")):
            for method in args.methods.split(","):
                rows.append(run_one(SHAPES[name], L, method, args, args.device, dtype))
                print(json.dumps(rows[-1]), flush=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {"device": device_name, "dtype": str(dtype).removeprefix("torch."), "block_size": args.block_size,
              "window": args.window, "steps": args.steps, "rows": rows}
    out = args.out or (os.path.join(os.environ["OUT"], "reselect_decode.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{'shape':<14}{'L':>7}  {'method':<20}{'ms/step':>9}{'device MB':>11}{'host MB':>9}{'read MB/step':>14}")
    for r in rows:
        print(f"{r['shape']:<14}{r['L']:>7}  {r['method']:<20}{r['ms_per_step']:>9.3f}{r['device_bytes'] / 2**20:>11.2f}"
              f"{r['offloaded_bytes'] / 2**20:>9.2f}{r['read_bytes_per_step'] / 2**20:>14.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

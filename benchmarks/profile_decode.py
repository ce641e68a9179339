"""Where the host time of an eager decode step goes: cProfile over a model's single-token forward calls.

Eager decoding of a small model is host-bound (the GPU waits for Python and kernel launches), so the lever is
host work per layer and step. This prints, per method, the wall time per step and the functions with the most
cumulative time (model of a real shape with random weights; tca.models.random_shapes).

    python benchmarks/profile_decode.py --shape qwen2.5-0.5b-shape --length 16384 --methods dense,tca-auto,tca-triton
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch

import tca
from tca.models import TCACache, cache_kwargs, disable_tca, enable_tca
from tca.models.random_shapes import SHAPES, random_model


def steps(model, cache, token, position, n: int):
    kwargs = cache_kwargs(model, cache)
    for _ in range(n):
        token = model(input_ids=token, position_ids=position, use_cache=True, **kwargs).logits[:, -1:].argmax(-1)
        position = position + 1
    return token, position


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b-shape", choices=sorted(SHAPES))
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--methods", default="dense,tca-auto,tca-triton")
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=None, help="JSON of the per-step times")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(SHAPES[args.shape], 1 << 18, dtype, device)
    config = tca.TCAConfig(block_size=args.block_size, window=args.window)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), device=device)
    results = {"shape": args.shape, "length": args.length, "device": str(device), "rows": []}
    for method in args.methods.split(","):
        disable_tca(model)
        if method != "dense":
            enable_tca(model, config=config, backend=method.removeprefix("tca-"))
        import transformers

        cache = transformers.DynamicCache(config=model.config) if method == "dense" else TCACache(model)
        with torch.no_grad():
            token = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
            position = torch.tensor([[args.length]], device=device)
            token, position = steps(model, cache, token, position, 4)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            token, position = steps(model, cache, token, position, args.steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - start) / args.steps
            profiler = cProfile.Profile()
            profiler.enable()
            steps(model, cache, token, position, args.steps)
            profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.top)
        print(f"== {method}: {per_step * 1e3:.2f} ms per eager step at {args.length}", flush=True)
        print(text.getvalue(), flush=True)
        results["rows"].append({"method": method, "ms_per_step": per_step * 1e3, "profile": text.getvalue()})
        del cache
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

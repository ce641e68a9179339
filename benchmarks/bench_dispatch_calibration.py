"""Two costs outside the kernels: backend dispatch (routing.resolve, memoised) and calibration's retained mass
(the torch backend's chunked version beside the reference's), on whatever device is present.

    PYTHONPATH=src python benchmarks/bench_dispatch_calibration.py                      # GPU if present, else CPU
    PYTHONPATH=src python benchmarks/bench_dispatch_calibration.py --lengths 512 --heads 4,2 --device cpu  # quick

Retained mass: one layer of SmolLM2's shape by default (9 query / 3 KV heads, D = 64), default config (b = 128,
w = 4096 scaled down with --window), 14 candidates, R = 256 rows. Prints one JSON line per measurement.
Shape letters: B batch, HQ, HKV heads, L tokens, D head dim.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from timing import median_ms


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", default="8192,16384")
    parser.add_argument("--heads", default="9,3", help="HQ,HKV")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-reference", action="store_true", help="the oracle is O(R L) memory per head")
    args = parser.parse_args(argv)

    import tca
    from tca import reference
    from tca.backends import registry, routing
    from tca.budgets import calibration_candidates
    from tca.models.calibration import retained_mass

    device, D = args.device, args.head_dim
    HQ, HKV = (int(x) for x in args.heads.split(","))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    routing.resolve("auto", device, dtype, D)  # the first call probes the environment
    n = 1000
    start = time.perf_counter()
    for _ in range(n):
        routing.resolve("auto", device, dtype, D)
    print(json.dumps({"what": "routing.resolve (memoised)", "us": (time.perf_counter() - start) / n * 1e6}))
    start = time.perf_counter()
    for _ in range(20):
        registry.forget()
        routing.resolve("auto", device, dtype, D)
    print(json.dumps({"what": "routing.resolve (probing)", "us": (time.perf_counter() - start) / 20 * 1e6}))

    config = tca.TCAConfig(block_size=128 if args.window >= 256 else 16, window=args.window)
    candidates = calibration_candidates(config.block_size, config.num_candidates, config.sigma).to(device)
    for L in (int(x) for x in args.lengths.split(",")):
        gen = torch.Generator().manual_seed(L)
        q = torch.randn(1, HQ, L, D, generator=gen).to(device, dtype)
        k = torch.randn(1, HKV, L, D, generator=gen).to(device, dtype)
        row = {"what": "retained_mass", "device": device, "L": L, "HQ": HQ, "HKV": HKV, "D": D}
        row["torch_backend_ms"] = median_ms(lambda q=q, k=k: retained_mass(q, k, candidates, config, D**-0.5),
                                            args.reps, device=device)
        if not args.skip_reference:
            row["reference_ms"] = median_ms(
                lambda q=q, k=k: reference.retained_mass(q, k, candidates, config, D**-0.5), args.reps, device=device)
            ours = retained_mass(q, k, candidates, config, D**-0.5)
            row["max_abs_diff"] = float((ours - reference.retained_mass(q, k, candidates, config, D**-0.5)).abs().max())
        print(json.dumps(row))


if __name__ == "__main__":
    main()

"""GPU timing of tca's flash backend beside the triton backend and dense kernels, in the same run.

    PYTHONPATH=src python benchmarks/flash_bench.py --out benchmarks/results/flash_h100.json

bf16, B=1, one attention layer of Llama-3.1-8B's shape (32 query / 8 KV heads, D=128), default config
(b=128, w=4096) and default budgets. Prefill: tca flash (selection + two varlen calls + merge, and each
piece alone), tca triton, dense FA4 (flash_attn.cute) and cuDNN SDPA. Decode: one token over the compressed
cache (flash vs triton) after a prefill, at --decode-lengths. Also: max |flash - triton| given the same selection, peak extra memory.
Shape letters: B, HQ, HKV, L, D, b, w as in the package.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
from timing import median_ms


def log(msg: str) -> None:
    print(msg, flush=True)


def peak_extra_gib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def bench_length(L, args, rows):
    import tca
    from tca.backends.flash import impl as flash_impl
    from tca.backends.flash.impl import select_indices
    from tca.backends.flash.segments import global_prefix_counts, global_segments, local_segments, query_blocks
    from tca.budgets import default_budgets
    from tca.config import TCAConfig

    HQ, HKV, D = 32, 8, 128
    config = TCAConfig()
    b, w = config.block_size, config.window
    scale = D**-0.5
    gen = torch.Generator(device="cuda").manual_seed(L)
    q, k, v = (torch.randn(1, h, L, D, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (HQ, HKV, HKV))
    budgets = default_budgets(b).cuda().expand(HKV, -1).contiguous()
    row = {"L": L, "HQ": HQ, "HKV": HKV, "D": D}

    def record(name, fn):
        try:
            ms = median_ms(fn, reps=5)
        except Exception as e:  # noqa: BLE001 - one failing implementation must not stop the table
            log(f"  {name:22s} L={L:6d} failed: {type(e).__name__}: {str(e)[:200]}")
            row[name] = None
            return None
        row[name] = ms
        log(f"  {name:22s} L={L:6d} {ms:9.3f} ms")
        return ms

    # Dense ceilings.
    try:
        from flash_attn.cute import flash_attn_func

        qb, kb, vb = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        record("dense_fa4", lambda: flash_attn_func(qb, kb, vb, causal=True))
    except ImportError:
        row["dense_fa4"] = None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    record("dense_cudnn", cudnn)

    # tca triton.
    has_triton = "triton" in tca.available_backends()
    if has_triton:
        from tca.backends.triton.ops import TritonBackend

        record("tca_triton", lambda: TritonBackend.attention(q, k, v, budgets, config, scale))

    # tca flash, whole and in pieces.
    record("tca_flash", lambda: flash_impl.FlashBackend.attention(q, k, v, budgets, config, scale))
    row["tca_flash_peak_gib"] = peak_extra_gib(lambda: flash_impl.FlashBackend.attention(q, k, v, budgets, config, scale))
    indices, counts = select_indices(q, k, budgets, config, scale)
    record("flash_select", lambda: select_indices(q, k, budgets, config, scale))
    record("flash_attend", lambda: flash_impl.attend_indices(q, k, v, indices, counts, b, w, scale))
    adapter = flash_impl.get_adapter()
    row["generation"] = adapter.generation
    qf = q.view(-1, 1, D)
    kf, vf = k.view(-1, 1, D), v.view(-1, 1, D)
    local = local_segments(1, HQ, HKV, L, L, b, w, "cuda")
    record("flash_local_call", lambda: flash_impl._call(adapter, qf, kf, vf, local, scale))
    n_max = indices.shape[-1]
    row["selected_per_head"] = float(counts.double().mean())
    row["kv_kept"] = 1.0
    if n_max:
        from tca.geometry import num_budgeted_blocks

        J = num_budgeted_blocks(L, b, w)
        row["kv_kept"] = float((counts.double().mean() + L - J * b) / L)
        prefix = global_prefix_counts(indices, query_blocks(L, L, b, w, "cuda").lo)
        glob = global_segments(prefix, 1, HQ, HKV, L, L, b, w, n_max, "cuda")
        rows_ = (torch.arange(HKV, device="cuda").view(1, HKV, 1) * L + indices.clamp(0, L - 1)).reshape(-1)
        ks, vs = kf.index_select(0, rows_), vf.index_select(0, rows_)
        record("flash_global_call", lambda: flash_impl._call(adapter, qf, ks, vs, glob, scale))
        a = flash_impl._call(adapter, qf, kf, vf, local, scale)
        g = flash_impl._call(adapter, qf, ks, vs, glob, scale)
        from tca.backends.flash.merge import merge
        from tca.backends.flash.segments import rows_with_keys

        has = rows_with_keys(glob, qf.shape[0])
        record("flash_merge", lambda: merge(a.out, a.lse, g.out, g.lse, has, q.dtype))
    if has_triton:
        from tca.backends.triton import ops

        tri = ops.TritonBackend.attention(q, k, v, budgets, config, scale)
        fl = flash_impl.FlashBackend.attention(q, k, v, budgets, config, scale)
        row["max_abs_flash_vs_triton"] = float((tri.float() - fl.float()).abs().max())
        log(f"  max |flash - triton| = {row['max_abs_flash_vs_triton']:.3e}")

    # Decode: one token after a prefill (the cache grows by one token per timed call; negligible here).
    if L in [int(x) for x in args.decode_lengths.split(",") if x]:
        qd, kd, vd = (torch.randn(1, h, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (HQ, HKV, HKV))
        impls = {"flash": flash_impl.FlashBackend}
        if has_triton:
            from tca.backends.triton.ops import TritonBackend

            impls["triton"] = TritonBackend
        for name, impl in impls.items():
            try:
                _, cache = impl.prefill(q, k, v, budgets, config, scale)
                record(f"decode_{name}", lambda impl=impl, cache=cache: impl.decode(qd, kd, vd, cache))
            except Exception as e:  # noqa: BLE001
                log(f"  decode {name} failed: {type(e).__name__}: {str(e)[:200]}")
    rows.append(row)
    torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--out", default="benchmarks/results/flash_h100.json")
    parser.add_argument("--decode-lengths", default="32768", help="lengths at which one decode step is timed")
    args = parser.parse_args(argv)
    import triton

    meta = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "command": " ".join(sys.argv),
        "dtype": "bfloat16", "batch": 1, "config": "default (b=128, w=4096), default budgets",
    }
    try:
        import flash_attn.cute as fa4

        meta["flash_attn_cute"] = getattr(fa4, "__version__", "?")
    except ImportError:
        meta["flash_attn_cute"] = None
    log(json.dumps(meta))
    rows = []
    for L in [int(x) for x in args.lengths.split(",")]:
        log(f"== L={L}")
        bench_length(L, args, rows)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    cols = ["L", "dense_fa4", "dense_cudnn", "tca_triton", "tca_flash", "flash_select", "flash_local_call",
            "flash_global_call", "flash_merge", "decode_flash", "decode_triton"]
    log("| " + " | ".join(cols) + " |")
    for r in rows:
        log("| " + " | ".join("-" if r.get(c) is None else (f"{r[c]:.3f}" if c != "L" else str(r[c])) for c in cols) + " |")


if __name__ == "__main__":
    main()

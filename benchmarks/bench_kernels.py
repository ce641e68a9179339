"""Per-layer GPU benchmark of the Triton backend against the fastest dense kernels in the same run.

    PYTHONPATH=src python benchmarks/bench_kernels.py --out benchmarks/results/h100.json
    PYTHONPATH=src python benchmarks/bench_kernels.py --report benchmarks/results/h100.json   # plot + table (CPU)

bf16, B=1, one attention layer; shapes Llama-3.1-8B (32 query / 8 KV heads, D=128) and SmolLM2 (9/3, D=64).
Prefill: selection + sparse attention (and each alone) at the default budgets and at budgets keeping ~39% of
the budgeted blocks' tokens, against cuDNN SDPA, FA2 (SDPA flash), FA4 (flash_attn.cute, if it imports) and the
tca `flash` backend (if registered and usable). Decode: one query over the compressed cache vs dense decode.
Reported: ms (median), speedup vs the fastest dense, effective TFLOP/s on the (query, key) pairs computed,
selection share, KV kept fraction, peak extra memory, relative error vs an fp32 computation on sampled rows
(given the same selection) and agreement of the selection with tca.reference.select.
Shape letters: B, HQ, HKV, G, L, D, J, b as in the package.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import torch
from timing import median_ms

TIMING = dict(min_time=0.25)  # each measurement repeats for at least a quarter of a second

LOG = sys.stdout
SHAPES = {"llama-3.1-8b": (32, 8, 128), "smollm2": (9, 3, 64)}
KEEP_39 = 0.37  # fraction of each budgeted block kept on average (+ the local window ~ 39% of the KV at 128K)


def log(msg: str) -> None:
    print(msg, file=LOG, flush=True)


def timeit_graph(fn, reps: int = 50) -> float | None:
    """Median ms of fn replayed from a CUDA graph (removes launch overhead, for microsecond decode kernels)."""
    try:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return median_ms(graph.replay, reps=reps)
    except Exception as e:  # noqa: BLE001
        log(f"  cuda graph failed: {type(e).__name__}: {str(e)[:160]}")
        return None


def peak_extra(fn) -> float:
    """Peak GPU memory (GiB) allocated by fn beyond what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**30


def budgets_keeping(fraction: float, block_size: int) -> tuple[float, torch.Tensor]:
    """The log-Gaussian (sigma 1) whose expected cost keeps `fraction` of each budgeted block: (mu, p)."""
    from tca.budgets import expected_cost, log_gaussian_budgets

    lo, hi = 0.0, math.log2(block_size)
    for _ in range(60):
        mu = (lo + hi) / 2
        if float(expected_cost(log_gaussian_budgets(mu, 1.0, block_size))) / block_size < fraction:
            lo = mu
        else:
            hi = mu
    return mu, log_gaussian_budgets(mu, 1.0, block_size)


def dense_impls():
    """name -> fn(q, k, v) for causal prefill and for decode (one query), in bhsd bf16."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    impls = {}

    def sdpa(backend, causal):
        def run(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

        return run

    impls["cudnn-sdpa"] = (sdpa(SDPBackend.CUDNN_ATTENTION, True), sdpa(SDPBackend.CUDNN_ATTENTION, False))
    impls["fa2-sdpa"] = (sdpa(SDPBackend.FLASH_ATTENTION, True), sdpa(SDPBackend.FLASH_ATTENTION, False))
    try:
        from flash_attn.cute import flash_attn_func

        def fa4(causal):
            def run(q, k, v):
                out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
                return out[0] if isinstance(out, tuple) else out

            return run

        impls["fa4"] = (fa4(True), fa4(False))
    except Exception as e:  # noqa: BLE001
        log(f"fa4 unavailable: {type(e).__name__}: {str(e)[:120]}")
    return impls


def kept_pairs(offsets: torch.Tensor, L: int, b: int, w: int) -> int:
    """Sum over query rows and KV heads of |S(i)|: offsets [B, HKV, J+1] (selected below each block)."""
    from tca.geometry import window_start

    pos = torch.arange(L, device=offsets.device)
    lo = window_start(pos, b, w)
    glob = offsets[..., lo // b].long()  # [B, HKV, L]
    return int((glob + (pos - lo + 1)).sum())


def sampled_error(q, k, v, out, indices, counts, b, w, scale, rows) -> float:
    """Relative error (Frobenius over sampled rows, all heads) of `out` vs fp32 attention on the same kept set."""
    from tca.geometry import window_start

    HQ, HKV = q.shape[1], k.shape[1]
    G = HQ // HKV
    num, den = 0.0, 0.0
    for i in rows:
        lo = window_start(i, b, w)
        for h in range(HKV):
            sel = indices[0, h, : int(counts[0, h])].long()
            keys = torch.cat([sel[sel < lo], torch.arange(lo, i + 1, device=q.device)])
            kk, vv = k[0, h, keys].float(), v[0, h, keys].float()
            qq = q[0, h * G : (h + 1) * G, i].float()
            ref = torch.softmax(qq @ kk.T * scale, -1) @ vv
            num += float((out[0, h * G : (h + 1) * G, i].float() - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
    return math.sqrt(num / den)


def bench_prefill(name, shape, L, config, budgets_by_name, dense, args, tiles=None) -> list[dict]:
    from tca import reference
    from tca.backends.common import selection_triton
    from tca.backends.triton import ops

    HQ, HKV, D = shape
    b, w = config.block_size, config.window
    scale = D**-0.5
    gen = torch.Generator(device="cuda").manual_seed(L)
    q = torch.randn(1, HQ, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    rows_out = []
    dense_pairs = HQ * L * (L + 1) // 2
    dense_ms = {}
    for dname, (causal_fn, _) in dense.items():
        if L > args.max_dense_len:
            continue
        try:
            ms = median_ms(lambda fn=causal_fn: fn(q, k, v), **TIMING)
            dense_ms[dname] = ms
            mem = peak_extra(lambda fn=causal_fn: fn(q, k, v))
            rows_out.append(
                {"shape": name, "L": L, "phase": "prefill", "impl": dname, "ms": ms,
                 "tflops": 4 * D * dense_pairs / ms / 1e9, "kv_kept": 1.0, "peak_gib": mem}
            )
            log(f"  {dname:12s} prefill L={L:6d} {ms:9.3f} ms {4 * D * dense_pairs / ms / 1e9:6.1f} TF/s")
        except Exception as e:  # noqa: BLE001
            log(f"  {dname} prefill L={L} failed: {type(e).__name__}: {str(e)[:160]}")
    fastest = min(dense_ms.items(), key=lambda kv: kv[1]) if dense_ms else (None, float("nan"))
    sample = sorted({L - 1, L - 2, *[int(x) for x in torch.linspace(0, L - 1, 6).long().tolist()]})
    for bname, p in budgets_by_name.items():
        budgets = p.to("cuda").expand(HKV, -1).contiguous()
        sel = selection_triton.select_on_device(q, k, budgets, config, scale)
        sel_ms = median_ms(lambda budgets=budgets: selection_triton.select_on_device(q, k, budgets, config, scale), **TIMING)
        attn = lambda sel=sel: ops.sparse_attention(  # noqa: E731
            q, k, v, sel["indices"], sel["offsets"], b, w, scale, tiles=tiles)
        attn_ms = median_ms(attn, **TIMING)

        def total(budgets=budgets):  # the backend's attention (select, attend) with the tiles picked for this shape
            s = selection_triton.select_on_device(q, k, budgets, config, scale)
            return ops.sparse_attention(q, k, v, s["indices"], s["offsets"], b, w, scale, tiles=tiles)

        total_ms = median_ms(total, **TIMING)
        mem = peak_extra(total)
        pairs = kept_pairs(sel["offsets"], L, b, w) * (HQ // HKV)
        J = sel["offsets"].shape[-1] - 1
        kv_kept = float((sel["counts"].double() + (L - J * b)).mean() / L)
        out = attn()
        err = sampled_error(q, k, v, out, sel["indices"], sel["counts"], b, w, scale, sample)
        agree = None
        if J > 0:
            ref_sel = reference.select(q, k, budgets, config, scale)
            mine = selection_triton.to_selection(sel, config, L)
            union = (ref_sel.mask | mine.mask).sum().item()
            agree = (ref_sel.mask & mine.mask).sum().item() / max(union, 1)
            del ref_sel
        row = {
            "shape": name, "L": L, "phase": "prefill", "impl": f"tca-triton-{bname}", "ms": total_ms,
            "select_ms": sel_ms, "attention_ms": attn_ms, "select_share": sel_ms / total_ms,
            "tflops": 4 * D * pairs / attn_ms / 1e9, "pairs_fraction": pairs / dense_pairs,
            "kv_kept": kv_kept, "peak_gib": mem, "rel_err_sampled": err, "selection_jaccard_vs_reference": agree,
            "fastest_dense": fastest[0], "speedup_vs_fastest_dense": fastest[1] / total_ms,
        }
        rows_out.append(row)
        log(
            f"  tca-{bname:8s} prefill L={L:6d} total {total_ms:8.3f} ms (select {sel_ms:6.3f}, attn {attn_ms:8.3f}) "
            f"{row['tflops']:6.1f} TF/s kept {kv_kept:.3f} x{row['speedup_vs_fastest_dense']:.2f} vs {fastest[0]} "
            f"err {err:.2e} jaccard {agree}"
        )
    if args.flash_backend:
        try:
            import tca

            if "flash" in tca.available_backends():
                fl = lambda: tca.attention(q, k, v, config=config, backend="flash")  # noqa: E731
                ms = median_ms(fl, **TIMING)
                rows_out.append({"shape": name, "L": L, "phase": "prefill", "impl": "tca-flash-default", "ms": ms,
                                 "speedup_vs_fastest_dense": fastest[1] / ms})
                log(f"  tca-flash    prefill L={L:6d} {ms:9.3f} ms")
        except Exception as e:  # noqa: BLE001
            log(f"  tca flash backend failed: {type(e).__name__}: {str(e)[:160]}")
    # decode at this context length: dense over all L keys vs the compressed cache after prefill
    q1 = q[:, :, -1:].contiguous()
    dense_dec = {}
    for dname, (_, plain) in dense.items():
        try:
            ms = median_ms(lambda fn=plain: fn(q1, k, v), **TIMING)
            msg = timeit_graph(lambda fn=plain: fn(q1, k, v))
            dense_dec[dname] = min(ms, msg or ms)
            rows_out.append({"shape": name, "L": L, "phase": "decode", "impl": dname, "ms": ms, "ms_graph": msg,
                             "gbps": 2 * HKV * L * D * 2 / (min(ms, msg or ms) * 1e6), "kv_kept": 1.0})
            log(f"  {dname:12s} decode  L={L:6d} {ms:8.4f} ms (graph {msg})")
        except Exception as e:  # noqa: BLE001
            log(f"  {dname} decode L={L} failed: {type(e).__name__}: {str(e)[:160]}")
    fastest_dec = min(dense_dec.items(), key=lambda kv: kv[1]) if dense_dec else (None, float("nan"))
    from tca.backends.common.packed_cache import PackedKVCache
    from tca.budgets import block_keep_count

    for bname, p in budgets_by_name.items():
        budgets = p.to("cuda").expand(HKV, -1).contiguous()
        sel = selection_triton.select_on_device(q[:, :, :-1], k[:, :, :-1], budgets, config, scale)
        cache = PackedKVCache.from_indices(
            k[:, :, :-1], v[:, :, :-1], sel["indices"], sel["counts"], block_keep_count(budgets), config, scale,
            kernels=ops.CacheKernels,
        )
        cache.append(k[:, :, -1:], v[:, :, -1:])
        step = lambda cache=cache: cache.attend(q1)  # noqa: E731
        ms = median_ms(step, **TIMING)
        msg = timeit_graph(step)
        best = min(ms, msg or ms)
        n_read = int(cache.lengths.sum())
        nbytes = 2 * n_read * D * 2
        # correctness of the decode kernel: fp32 over the cache's own tokens
        out = step()
        ref_num, ref_den = 0.0, 0.0
        G = HQ // HKV
        for h in range(HKV):
            kk, vv = cache.keys_of(0, h).float(), cache.values_of(0, h).float()
            ref = torch.softmax(q1[0, h * G : (h + 1) * G, 0].float() @ kk.T * scale, -1) @ vv
            ref_num += float((out[0, h * G : (h + 1) * G, 0].float() - ref).pow(2).sum())
            ref_den += float(ref.pow(2).sum())
        rows_out.append({
            "shape": name, "L": L, "phase": "decode", "impl": f"tca-triton-{bname}", "ms": ms, "ms_graph": msg,
            "gbps": nbytes / (best * 1e6), "kv_kept": n_read / (HKV * L), "cache_nbytes": cache.nbytes,
            "rel_err": math.sqrt(ref_num / ref_den), "fastest_dense": fastest_dec[0],
            "speedup_vs_fastest_dense": fastest_dec[1] / best,
        })
        log(f"  tca-{bname:8s} decode  L={L:6d} {ms:8.4f} ms (graph {msg}) {nbytes / (best * 1e6):7.1f} GB/s "
            f"kept {n_read / (HKV * L):.3f} x{fastest_dec[1] / best:.2f} vs {fastest_dec[0]}")
        # the whole decode step (compression every b steps, ring write, attention), eager, over b steps
        steps = b
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            ops.TritonBackend.decode(q1, k[:, :, -1:], v[:, :, -1:], cache)
        torch.cuda.synchronize()
        rows_out[-1]["full_step_ms_eager"] = (time.perf_counter() - t0) * 1e3 / steps
        log(f"    full decode step (eager, mean over {steps}): {rows_out[-1]['full_step_ms_eager']:.4f} ms")
        del cache
    return rows_out


def sweep(args):
    """Time the sparse attention kernel under several tile configurations at one length (to pick defaults)."""
    from tca.backends.common import selection_triton
    from tca.budgets import default_budgets
    from tca.config import TCAConfig

    config = TCAConfig()
    for name in args.shapes.split(","):
        HQ, HKV, D = SHAPES[name]
        L = args.sweep_len
        q = torch.randn(1, HQ, L, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16)
        budgets = default_budgets(128).cuda().expand(HKV, -1).contiguous()
        sel = selection_triton.select_on_device(q, k, budgets, config, D**-0.5)
        _sweep_tiles(name, L, q, k, v, sel, D)


def _sweep_tiles(name, L, q, k, v, sel, D, candidates=None) -> dict | None:
    """Time the attention kernel under tile candidates; returns the fastest {"block_q", ...} (or None)."""
    from tca.backends.triton import ops

    if candidates is None:
        candidates = [
            {"block_q": bq, "block_n": bn, "num_warps": nw, "num_stages": ns}
            for bq in (16, 32, 64) for bn in (32, 64, 128) for nw in (4, 8) for ns in (2, 3)
        ]
    best = (float("inf"), None)
    for tiles in candidates:
        try:
            ms = median_ms(lambda tiles=tiles: ops.sparse_attention(
                q, k, v, sel["indices"], sel["offsets"], 128, 4096, D**-0.5, tiles=tiles), min_time=0.1)
            log(f"sweep {name} L={L} {tiles} {ms:.3f} ms")
            best = min(best, (ms, tiles), key=lambda x: x[0])
        except Exception as e:  # noqa: BLE001
            log(f"sweep {name} {tiles} failed: {type(e).__name__}: {str(e)[:100]}")
    return best[1]


SHORT_SWEEP = [
    {"block_q": 32, "block_n": 64, "num_warps": 8, "num_stages": 3},
    {"block_q": 32, "block_n": 64, "num_warps": 4, "num_stages": 3},
    {"block_q": 16, "block_n": 64, "num_warps": 4, "num_stages": 3},
    {"block_q": 32, "block_n": 32, "num_warps": 8, "num_stages": 3},
    {"block_q": 32, "block_n": 128, "num_warps": 8, "num_stages": 2},
    {"block_q": 64, "block_n": 64, "num_warps": 8, "num_stages": 2},
]


def pick_tiles(name, config) -> dict | None:
    """A short sweep at 16K tokens; the winner drives every length of this shape (like triton.autotune)."""

    from tca.backends.common import selection_triton
    from tca.budgets import default_budgets

    HQ, HKV, D = SHAPES[name]
    L = 16384
    q = torch.randn(1, HQ, L, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16)
    budgets = default_budgets(config.block_size).cuda().expand(HKV, -1).contiguous()
    sel = selection_triton.select_on_device(q, k, budgets, config, D**-0.5)
    best = _sweep_tiles(name, L, q, k, v, sel, D, SHORT_SWEEP)
    log(f"tiles for {name}: {best}")
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    parser.add_argument("--shapes", default="llama-3.1-8b,smollm2")
    parser.add_argument("--out", default="benchmarks/results/bench_kernels.json")
    parser.add_argument("--max-dense-len", type=int, default=131072)
    parser.add_argument("--flash-backend", action="store_true", help="also time tca's flash backend")
    parser.add_argument("--sweep-len", type=int, default=0, help="only sweep attention tiles at this length")
    parser.add_argument("--no-sweep", action="store_true", help="keep the default tiles (no short sweep)")
    parser.add_argument("--report", default=None, help="write the plot and markdown table from a results JSON")
    args = parser.parse_args(argv)
    if args.report:
        return report(args.report)
    if args.sweep_len:
        return sweep(args)
    import triton

    import tca
    from tca.budgets import default_budgets
    from tca.config import TCAConfig

    config = TCAConfig()
    mu39, p39 = budgets_keeping(KEEP_39, config.block_size)
    budgets_by_name = {"default": default_budgets(config.block_size), "keep39": p39}
    dense = dense_impls()
    meta = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "tca": tca.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "command": " ".join(sys.argv),
        "config": config.to_dict(), "keep39_mu": mu39, "dtype": "bfloat16", "batch": 1,
        "dense_impls": list(dense),
    }
    log(json.dumps(meta))
    rows = []
    meta["tiles"] = {}
    for name in args.shapes.split(","):
        meta["tiles"][name] = pick_tiles(name, config) if not args.no_sweep else None
        for L in [int(x) for x in args.lengths.split(",")]:
            log(f"== {name} L={L}")
            rows += bench_prefill(name, SHAPES[name], L, config, budgets_by_name, dense, args, meta["tiles"][name])
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    log("done")


def report(path: str) -> None:
    """From a results JSON: docs/benchmarks_<shape>.png (log-log time vs L) and a markdown table on stdout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(path))
    rows = data["rows"]
    for shape in sorted({r["shape"] for r in rows}):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, phase in zip(axes, ("prefill", "decode"), strict=True):
            for impl in sorted({r["impl"] for r in rows if r["shape"] == shape and r["phase"] == phase}):
                pts = sorted((r["L"], min(r["ms"], r.get("ms_graph") or r["ms"])) for r in rows
                             if r["shape"] == shape and r["phase"] == phase and r["impl"] == impl)
                style = "-o" if impl.startswith("tca") else "--s"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length L")
            ax.set_ylabel("ms per layer")
            ax.set_title(f"{shape}: {phase} (bf16, B=1)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"docs/benchmarks_{shape}.png", dpi=110)
    print("| shape | L | phase | impl | ms | speedup vs fastest dense | TFLOP/s or GB/s | select share | KV kept | peak GiB | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = min(r["ms"], r.get("ms_graph") or r["ms"])
        rate = f"{r['tflops']:.0f} TF/s" if "tflops" in r else (f"{r['gbps']:.0f} GB/s" if "gbps" in r else "")
        sp = f"{r['speedup_vs_fastest_dense']:.2f}x" if "speedup_vs_fastest_dense" in r else ""
        share = f"{100 * r['select_share']:.1f}%" if "select_share" in r else ""
        err = r.get("rel_err_sampled", r.get("rel_err"))
        kept = f"{r['kv_kept']:.3f}" if "kv_kept" in r else ""  # blank where not measured, never a made-up 1.0
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else ""
        print(f"| {r['shape']} | {r['L'] // 1024}K | {r['phase']} | {r['impl']} | {ms:.3f} | {sp} | {rate} | {share} | "
              f"{kept} | {peak} | {'' if err is None else f'{err:.1e}'} |")


if __name__ == "__main__":
    main()

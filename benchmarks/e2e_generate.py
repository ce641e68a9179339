"""End-to-end generation, dense vs TCA, on a model of a real shape (default Llama-3.1-8B) with random bf16 weights.

Per prompt length: time to first token, decode ms per token (mean over --new-tokens), peak memory, KV bytes;
for dense (`sdpa`) and TCA in the same run, on two execution paths compared like with like: eager (one
model call per token, as `generate` runs) and graph (one CUDA-graph replay per token: transformers' StaticCache
for dense, TCACache for TCA, both through tca.models.graphs.StepGraph). At the longest length, the largest batch
that fits and its decode tokens/s (the batch's caches are replicas of the measured prompt's: decode speed does not
depend on the values).

    python benchmarks/e2e_generate.py --lengths 16384,32768,65536,131072 --out $OUT/e2e.json
    python benchmarks/e2e_generate.py --shape qwen2.5-0.5b-shape --methods dense,tca-auto --lengths 4096,32768
    python benchmarks/e2e_generate.py --tiny --lengths 256 --new-tokens 4 --device cpu   # plumbing check on a CPU

Methods: dense (transformers' sdpa and its caches), dense-kernels (dense budgets on tca's cache and kernels),
tca-<backend> (the plan's budgets on that prefill backend), and tca-auto: what `enable_tca(model)` gives by default,
the dense path below the crossover measured for the device and shape, TCA above it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
from tqdm import tqdm

import tca
from tca.models import TCACache, cache_kwargs, enable_tca
from tca.models.graphs import StepGraph, prepare_static
from tca.models.random_shapes import SHAPES, random_model

TINY = SHAPES["llama-tiny-shape"]


def build_model(shape: dict, device, dtype):
    return random_model(shape, 1 << 21, dtype, device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device):
    sync(device)
    return time.perf_counter()


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device):
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def kv_bytes(cache) -> int:
    if isinstance(cache, TCACache):
        return cache.nbytes
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def use(model, method: str, config) -> None:
    """Switch the model to `method`: "dense" (sdpa), "tca-<backend>" (TCA prefill on that backend; decode on
    the fastest decode kernels, chosen per phase), or "dense-kernels" (dense budgets: every token kept, exact
    dense attention decoded by tca's split-K kernels over a static cache: a second dense baseline that a CUDA
    graph captures without transformers' masked StaticCache attention)."""
    if method == "dense":
        model.set_attn_implementation("sdpa")
    elif method == "dense-kernels":
        from tca.models import dense_plan, model_shape

        # A named backend: "auto" would take the dense path below the crossover, whose eager cache is not this one.
        backend = "triton" if next(model.parameters()).is_cuda else "torch"
        enable_tca(model, plan=dense_plan(model_shape(model), config), backend=backend)
    else:
        enable_tca(model, config=config, backend=method.removeprefix("tca-"))


def prefill(model, method: str, ids: torch.Tensor):
    """Prefill ids [B, L] into a fresh cache (TCACache, or a DynamicCache for dense). -> (cache, token, seconds)."""
    import transformers

    device = ids.device
    cache = transformers.DynamicCache(config=model.config) if method == "dense" else TCACache(model)
    with torch.no_grad():
        start = now(device)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        seconds = now(device) - start
    return cache, token, seconds


def to_static(model, cache, extra: int):
    """A transformers StaticCache holding a DynamicCache's tokens, with room for `extra` more (graph decoding)."""
    import transformers

    L = cache.get_seq_length()
    static = transformers.StaticCache(config=model.config, max_cache_len=L + extra)
    positions = torch.arange(L, device=cache.layers[0].keys.device)
    for index, layer in enumerate(cache.layers):
        static.update(layer.keys, layer.values, index, {"cache_position": positions})
    return static


def decode(model, cache, token, mode: str, new_tokens: int) -> float:
    """Seconds per decoded token (mean over new_tokens, after one warm-up step), eager or graph-replayed."""
    device = token.device
    B = token.shape[0]
    L = cache.get_seq_length() if not isinstance(cache, TCACache) else cache.seq_len
    positions = torch.full((B, 1), L, device=device)
    with torch.no_grad():
        if mode == "graph":
            if isinstance(cache, TCACache):
                prepare_static(cache, new_tokens + 4)
            graph = StepGraph(model, cache, token, positions, torch.tensor([L], device=device))
            token = graph.capture().argmax(-1, keepdim=True)
            start = now(device)
            for _ in range(new_tokens):
                token = graph.step(token).argmax(-1, keepdim=True)
            return (now(device) - start) / new_tokens
        kwargs = cache_kwargs(model, cache)
        step = lambda t, p: model(input_ids=t, position_ids=p, use_cache=True, **kwargs).logits[:, -1]
        token = step(token, positions).argmax(-1, keepdim=True)  # warm-up step
        positions = positions + 1
        start = now(device)
        for _ in range(new_tokens):
            token = step(token, positions).argmax(-1, keepdim=True)
            positions = positions + 1
        return (now(device) - start) / new_tokens


def measure(model, method: str, ids: torch.Tensor, new_tokens: int, repeats: int, modes) -> list[dict]:
    """TTFT over `repeats` prefills (median, spread), then decode on the last cache in each mode."""
    device = ids.device
    B, L = ids.shape
    ttfts = []
    for _ in range(repeats):
        cache = None
        peak_reset(device)
        cache, token, seconds = prefill(model, method, ids)
        ttfts.append(seconds)
    prefill_peak = peak(device)
    kv = kv_bytes(cache)
    ttfts.sort()
    base = {"method": method, "batch": B, "length": L, "ttft_s": ttfts[len(ttfts) // 2],
            "ttft_spread_s": ttfts[-1] - ttfts[0], "ttft_repeats": repeats, "kv_bytes": kv, "peak_bytes": prefill_peak}
    if method != "dense":
        base["kept_fraction"] = cache.kept_fraction()
    rows, prefilled = [], cache
    for mode in modes:
        if mode == "graph" and method == "dense":
            cache = to_static(model, cache, 2 * new_tokens + 16)
        peak_reset(device)
        seconds = decode(model, cache, token, mode, new_tokens)
        rows.append(dict(base, mode=mode, decode_ms=seconds * 1e3, tokens_per_s=B / seconds,
                         decode_peak_bytes=peak(device), decode_tokens=new_tokens))
    return rows, prefilled


def largest_batch(model, method, template_cache, L, new_tokens, free_bytes, mode) -> dict:
    """Decode throughput of the largest batch whose caches fit: replicas of one measured prompt's cache."""
    import transformers

    from tca.backends.common.packed_cache import PackedKVCache

    device = next(model.parameters()).device
    per_sequence = kv_bytes(template_cache)
    B = max(1, int(free_bytes // (per_sequence * 1.02))) + 1  # one more than the estimate: out of memory steps down
    while B >= 1:
        cache = None
        try:
            if method != "dense":
                cache = TCACache(model)
                for layer, src in zip(cache.layers, template_cache.layers, strict=True):
                    layer.state = PackedKVCache.concat([_copy_state(src.state) for _ in range(B)])
                    layer.seen, layer.is_initialized = src.seen, True
                    layer.device, layer.dtype = src.device, src.dtype
                    layer.decode_backend = src.decode_backend
            else:
                cache = transformers.DynamicCache(config=model.config)
                for index, src in enumerate(template_cache.layers):
                    cache.update(src.keys.expand(B, -1, -1, -1).contiguous(), src.values.expand(B, -1, -1, -1).contiguous(), index)
            token = torch.zeros(B, 1, dtype=torch.long, device=device)
            peak_reset(device)
            seconds = decode(model, cache, token, mode, new_tokens)
            return {"method": method, "mode": mode, "batch": B, "length": L, "decode_ms": seconds * 1e3,
                    "tokens_per_s": B / seconds, "kv_bytes": kv_bytes(cache), "peak_bytes": peak(device)}
        except torch.OutOfMemoryError:
            cache = None
            torch.cuda.empty_cache()
            B -= 1
    return {"method": method, "batch": 0}


def _copy_state(state):
    import copy

    clone = copy.copy(state)
    for name, value in vars(state).items():
        if isinstance(value, torch.Tensor):
            setattr(clone, name, value.clone())
    clone.seq_lens = list(state.seq_lens)
    return clone


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="16384,32768,65536,131072")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="prefills timed per point (median kept, spread kept)")
    parser.add_argument("--modes", default="eager,graph")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="llama-3.1-8b-shape", choices=sorted(SHAPES), help="the model's shape")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer toy of the Llama architecture (plumbing)")
    parser.add_argument("--batch-search", action="store_true", help="largest batch at the longest length")
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--methods", default="dense,dense-kernels,tca-triton,tca-flash",
                        help="dense and tca-<prefill backend>; a TCA backend that cannot run here is skipped")
    parser.add_argument("--warmup", type=int, default=4096, help="prompt length of the untimed warm-up runs")
    parser.add_argument("--out", default="e2e.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(TINY if args.tiny else SHAPES[args.shape], device, dtype)
    config = tca.TCAConfig(block_size=args.block_size, window=args.window)
    lengths = [int(x) for x in args.lengths.split(",")]
    modes = args.modes.split(",")
    results = {"shape": "llama-tiny-shape" if args.tiny else args.shape,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    import transformers

    results["transformers"] = transformers.__version__
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        pass
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    methods = [m for m in args.methods.split(",")
               if m in ("dense", "dense-kernels") or _usable(m.removeprefix("tca-"), device, dtype, head_dim)]
    results["methods"] = methods
    for method in methods:  # compile kernels, pick cuBLAS/cuDNN algorithms, fill the allocator: not timed
        use(model, method, config)
        ids = torch.randint(0, model.config.vocab_size, (1, args.warmup), device=device)
        measure(model, method, ids, 4, 1, modes)
    # At the longest length each method's prompt cache is the template of its largest-batch run, done right away
    # so that one template at a time is in memory. Dense: transformers' DynamicCache (eager; it concatenates,
    # so a step briefly holds the cache twice) and dense budgets on tca's static cache (graph); TCA: graph.
    batch_modes = {"dense": "eager", "dense-kernels": "graph", "tca-triton": "graph"}
    for L, method in tqdm([(L, m) for L in lengths for m in methods], desc="e2e"):
        use(model, method, config)
        ids = torch.randint(0, model.config.vocab_size, (1, L), device=device)
        repeats = 1 if method == "dense-kernels" else args.repeats  # a decode baseline: its prefill is not compared
        rows, cache = measure(model, method, ids, args.new_tokens, repeats, modes)
        if args.batch_search and device.type == "cuda" and L == lengths[-1] and method in batch_modes:
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info(device)[0] - 4 * 2**30  # room for activations of a decode step
            rows.append(largest_batch(model, method, cache, L, args.new_tokens, free + kv_bytes(cache), batch_modes[method]))
        del cache
        for row in rows:
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print_table(results)


def _usable(backend: str, device, dtype, head_dim: int) -> bool:
    from tca.backends import registry, routing

    try:
        routing.resolve(backend, device, dtype, head_dim, phase="prefill")
        return True
    except (registry.BackendUnavailableError, ValueError) as error:
        print(f"skipping tca-{backend}: {error}")
        return False


def print_table(results):
    rows = {(r["length"], r.get("mode"), r["method"], r["batch"]): r for r in results["rows"] if "ttft_s" in r}
    print(f"{results['device']}  torch {results['torch']}  transformers {results.get('transformers')}")
    print(f"{'L':>7} {'mode':>6} {'method':>11} {'TTFT s (x dense)':>18} {'decode ms (x dense)':>20} {'KV GiB':>7} {'kept':>5}")
    print("(x dense: against the fastest dense path of the same mode in this run: TTFT speed-up, decode time ratio)")
    for (L, mode, method, B), r in sorted(rows.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2])):
        dense = [rows[key] for key in ((L, mode, "dense", 1), (L, mode, "dense-kernels", 1)) if "ttft_s" in rows.get(key, {})]
        if B != 1 or not dense or "ttft_s" not in r:
            continue
        ttft = min(d["ttft_s"] for d in dense)
        decode = min(d["decode_ms"] for d in dense)
        print(f"{L:>7} {mode:>6} {method:>13} {r['ttft_s']:>8.3f} ({ttft / r['ttft_s']:4.2f}x) "
              f"{r['decode_ms']:>9.2f} ({r['decode_ms'] / decode:4.2f}x) {r['kv_bytes'] / 2**30:>7.2f} "
              f"{r.get('kept_fraction', 1.0):>5.2f}")
    for r in results["rows"]:
        if "ttft_s" not in r:
            print(f"largest batch {r['method']}: B={r['batch']} at L={r.get('length')}: "
                  f"{r.get('tokens_per_s', math.nan):.1f} tokens/s")


if __name__ == "__main__":
    main()

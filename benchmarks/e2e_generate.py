"""End-to-end generation, dense vs TCA, on a model of the Llama-3.1-8B shape with random bf16 weights (no download).

Per prompt length: time to first token, decode ms per token (mean over --new-tokens), peak memory, KV bytes;
for dense (`sdpa`) and TCA in the same run, on two execution paths compared like with like: eager (one
model call per token, as `generate` runs) and graph (one CUDA-graph replay per token: transformers' StaticCache
for dense, TCACache for TCA, both through tca.models.graphs.StepGraph). At the longest length, the largest batch
that fits and its decode tokens/s (the batch's caches are replicas of the measured prompt's: decode speed does not
depend on the values).

    python benchmarks/e2e_generate.py --lengths 16384,32768,65536,131072 --out $OUT/e2e.json
    python benchmarks/e2e_generate.py --tiny --lengths 256 --new-tokens 4 --device cpu   # plumbing check on a CPU
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

LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=1 << 21, rope_theta=500000.0, eos_token_id=None,
    pad_token_id=None, tie_word_embeddings=False,
)
TINY = dict(LLAMA_8B, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def build_model(shape: dict, device, dtype):
    import transformers

    config = transformers.LlamaConfig(**shape)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval()


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


def make_cache(model, method: str, mode: str, B: int, max_len: int):
    import transformers

    if method == "tca":
        return TCACache(model)
    if mode == "graph":
        return transformers.StaticCache(config=model.config, max_cache_len=max_len)
    return transformers.DynamicCache(config=model.config)


def run(model, method: str, mode: str, ids: torch.Tensor, new_tokens: int) -> dict:
    """Prefill ids [B, L], then decode new_tokens tokens greedily; times both phases separately."""
    device = ids.device
    B, L = ids.shape
    cache = make_cache(model, method, mode, B, L + new_tokens + 4)
    kwargs = cache_kwargs(model, cache)
    peak_reset(device)
    with torch.no_grad():
        start = now(device)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, cache_position=torch.arange(L, device=device), **kwargs)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ttft = now(device) - start
        del out
        positions = torch.full((B, 1), L, device=device)
        if mode == "graph":
            if method == "tca":
                prepare_static(cache, new_tokens + 4)
            graph = StepGraph(model, cache, token, positions, torch.tensor([L], device=device))
            token = graph.capture().argmax(-1, keepdim=True)
            start = now(device)
            for _ in range(new_tokens):
                token = graph.step(token).argmax(-1, keepdim=True)
            decode = (now(device) - start) / new_tokens
        else:
            step = lambda t, p: model(input_ids=t, position_ids=p, use_cache=True, **kwargs).logits[:, -1]
            token = step(token, positions).argmax(-1, keepdim=True)  # warm-up step
            positions = positions + 1
            start = now(device)
            for _ in range(new_tokens):
                token = step(token, positions).argmax(-1, keepdim=True)
                positions = positions + 1
            decode = (now(device) - start) / new_tokens
    result = {"method": method, "mode": mode, "batch": B, "length": L, "ttft_s": ttft, "decode_ms": decode * 1e3,
              "tokens_per_s": B / decode, "peak_bytes": peak(device), "kv_bytes": kv_bytes(cache)}
    if method == "tca":
        result["kept_fraction"] = cache.kept_fraction()
    return result


def largest_batch(model, method, template_cache, L, new_tokens, free_bytes) -> dict:
    """Decode throughput of the largest batch whose caches fit: replicas of one measured prompt's cache."""
    device = next(model.parameters()).device
    per_sequence = kv_bytes(template_cache)
    B = max(1, int(free_bytes // (per_sequence * 1.05)))
    import transformers

    from tca.backends.common.packed_cache import PackedKVCache

    while B >= 1:
        try:
            if method == "tca":
                cache = TCACache(model)
                for layer, src in zip(cache.layers, template_cache.layers, strict=True):
                    layer.state = PackedKVCache.concat([_copy_state(src.state) for _ in range(B)])
                    layer.state.num_query_heads = src.state.num_query_heads
                    layer.seen, layer.is_initialized = src.seen, True
                    layer.device, layer.dtype = src.device, src.dtype
                prepare_static(cache, new_tokens + 4)
            else:
                cache = transformers.StaticCache(config=model.config, max_cache_len=L + new_tokens + 4)
                for layer, src in zip(cache.layers, template_cache.layers, strict=True):
                    layer.lazy_initialization(src.keys.expand(B, -1, -1, -1), src.values.expand(B, -1, -1, -1))
                    layer.keys.copy_(src.keys.expand(B, -1, -1, -1))
                    layer.values.copy_(src.values.expand(B, -1, -1, -1))
            token = torch.zeros(B, 1, dtype=torch.long, device=device)
            positions = torch.full((B, 1), L, device=device)
            with torch.no_grad():
                graph = StepGraph(model, cache, token, positions, torch.tensor([L], device=device))
                graph.capture()
                start = now(device)
                for _ in range(new_tokens):
                    graph.step(token)
                decode = (now(device) - start) / new_tokens
            return {"method": method, "mode": "graph", "batch": B, "length": L, "decode_ms": decode * 1e3,
                    "tokens_per_s": B / decode, "kv_bytes": kv_bytes(cache), "peak_bytes": peak(device)}
        except torch.OutOfMemoryError:
            cache = graph = None
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
    parser.add_argument("--tiny", action="store_true", help="a 2-layer toy of the same architecture (plumbing)")
    parser.add_argument("--batch-search", action="store_true", help="largest batch at the longest length")
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--out", default="e2e.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(TINY if args.tiny else LLAMA_8B, device, dtype)
    config = tca.TCAConfig(block_size=args.block_size, window=args.window)
    lengths = [int(x) for x in args.lengths.split(",")]
    modes = args.modes.split(",")
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    import transformers

    results["transformers"] = transformers.__version__
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        pass
    points = [(L, mode, method) for L in lengths for mode in modes for method in ("dense", "tca")]
    templates = {}
    for L, mode, method in tqdm(points, desc="e2e"):
        if method == "tca":
            enable_tca(model, config=config)
        else:
            model.set_attn_implementation("sdpa")
        ids = torch.randint(0, model.config.vocab_size, (1, L), device=device)
        runs = []
        for _ in range(args.repeats):
            row = run(model, method, mode, ids, args.new_tokens)
            runs.append(row)
        ttfts = sorted(r["ttft_s"] for r in runs)
        decodes = sorted(r["decode_ms"] for r in runs)
        row = dict(runs[len(runs) // 2], ttft_s=ttfts[len(ttfts) // 2], ttft_spread_s=ttfts[-1] - ttfts[0],
                   decode_ms=decodes[len(decodes) // 2], decode_spread_ms=decodes[-1] - decodes[0])
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    if args.batch_search and device.type == "cuda":
        L = lengths[-1]
        ids = torch.randint(0, model.config.vocab_size, (1, L), device=device)
        for method in ("dense", "tca"):
            if method == "tca":
                enable_tca(model, config=config)
            else:
                model.set_attn_implementation("sdpa")
            import transformers

            cache = TCACache(model) if method == "tca" else transformers.DynamicCache(config=model.config)
            with torch.no_grad():
                model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info(device)[0] - 3 * 2**30  # room for activations and the graph pool
            row = largest_batch(model, method, cache, L, args.new_tokens, free + kv_bytes(cache))
            del cache
            torch.cuda.empty_cache()
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print_table(results)


def print_table(results):
    rows = {(r["length"], r.get("mode"), r["method"], r["batch"]): r for r in results["rows"]}
    print(f"{results['device']}  torch {results['torch']}  transformers {results.get('transformers')}")
    print(f"{'L':>7} {'mode':>6} {'TTFT dense/tca (s)':>20} {'ratio':>6} {'decode ms dense/tca':>22} {'ratio':>6} {'KV GiB dense/tca':>18}")
    for (L, mode, method, B), r in sorted(rows.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][3])):
        if method != "tca" or B != 1:
            continue
        d = rows.get((L, mode, "dense", 1))
        if d is None:
            continue
        print(f"{L:>7} {mode:>6} {d['ttft_s']:>9.3f}/{r['ttft_s']:<9.3f} {d['ttft_s'] / r['ttft_s']:>6.2f} "
              f"{d['decode_ms']:>10.2f}/{r['decode_ms']:<10.2f} {r['decode_ms'] / d['decode_ms']:>6.2f} "
              f"{d['kv_bytes'] / 2**30:>8.2f}/{r['kv_bytes'] / 2**30:<8.2f}")
    for r in results["rows"]:
        if r["batch"] > 1 or r.get("mode") == "graph" and "ttft_s" not in r:
            if "ttft_s" not in r:
                print(f"largest batch {r['method']}: B={r['batch']} at L={r.get('length')}: "
                      f"{r.get('tokens_per_s', math.nan):.1f} tokens/s")


if __name__ == "__main__":
    main()

"""vLLM with the TCA plugin against vLLM's own attention backend: time to first token, decode step, KV read.

    PYTHONPATH=src python benchmarks/vllm_serving.py --tiny --lengths 256 1024 --max-tokens 16      # CPU smoke run
    PYTHONPATH=src python benchmarks/vllm_serving.py --shape llama-3.1-8b --lengths 16384 32768 65536 131072 \
        --batch 1 --max-tokens 33 --dtype bfloat16 --no-enforce-eager --backends vllm --out vllm.json   # GPU
    PYTHONPATH=src python benchmarks/vllm_serving.py --shape qwen2.5-0.5b --lengths 16384 32000 --batch 1 \
        --max-tokens 33 --dtype bfloat16 --no-enforce-eager --backends tca --dense-below 0 --out qwen.json
    PYTHONPATH=src python benchmarks/vllm_serving.py --model DIR --plan plan.json --lengths 16384 65536 \
        --batch 4 --dtype bfloat16 --tensor-parallel-size 2 --out benchmarks/results/vllm.json

One in-process engine per backend (VLLM_ENABLE_V1_MULTIPROCESSING=0 is set here, so kv_usage() sees the layers),
on the same seeded random prompts, prefix caching off for both. For each prompt length: time to first token =
wall time of a run with max_tokens=1 (the whole batch's prefill); decode step = each request's last-token time minus
its first-token time over N - 1, from the engine's request metrics (else (t(max_tokens=N) - t(1)) / (N - 1));
output tokens/s = batch x N / t(N); --saturate adds a run of as many longest prompts as the pool admits at once;
for TCA also kv_usage(): vLLM's pool bytes, and the KV bytes a dense backend would read over the decode steps
against the bytes TCA read. Printed as one JSON object per (backend, length); --out saves them all.
Shape letters: L prompt length.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import tempfile
import time

from tqdm.auto import tqdm

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


SHAPES = {  # --shape: a config alone, filled with random weights by vLLM (load_format="dummy"): no download
    "llama-3.1-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0)),
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
}


def shape_dir(name: str, max_len: int) -> str:
    import transformers

    directory = tempfile.mkdtemp(prefix=f"tca-vllm-{name}-")
    config_class, shape = SHAPES[name]
    shape = {**shape, "max_position_embeddings": max(max_len, shape["max_position_embeddings"])}
    getattr(transformers, config_class)(**shape, torch_dtype="bfloat16").save_pretrained(directory)
    return directory


def pool_tokens(llm) -> int | None:
    """Tokens vLLM's KV pool holds (pages x page size), as the engine allocated it."""
    cache = llm.llm_engine.vllm_config.cache_config
    blocks = getattr(cache, "num_gpu_blocks", None)
    return None if blocks is None else blocks * cache.block_size


def tiny_llama_dir() -> str:
    """A seeded random Llama (2 layers, 4/2 heads, head dim 32) saved for vLLM."""
    from tca.models.tiny_random import tiny_model

    directory = tempfile.mkdtemp(prefix="tca-vllm-bench-")
    tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32, max_position_embeddings=8192).save_pretrained(directory)
    return directory


def timed_generate(llm, requests, max_tokens: int) -> tuple[float, float | None]:
    """(wall seconds of the whole run, the mean decode step in seconds from the engine's own per-request first- and
    last-token times, or None where the engine keeps no such times)."""
    import vllm

    params = vllm.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    wall = time.perf_counter() - start
    stats = [output.metrics for output in outputs]
    if max_tokens < 2 or any(getattr(s, "last_token_ts", 0.0) <= getattr(s, "first_token_ts", 0.0) for s in stats):
        return wall, None
    steps = [(s.last_token_ts - s.first_token_ts) / (max_tokens - 1) for s in stats]
    return wall, sum(steps) / len(steps)


def run_backend(name: str, args, model: str, vocab: int) -> list[dict]:
    import vllm

    from tca.serving.vllm import kv_usage

    engine = {"attention_backend": "CUSTOM"} if name == "tca" else {}
    if args.shape:
        engine["load_format"] = "dummy"
    if args.max_num_batched_tokens:
        engine["max_num_batched_tokens"] = args.max_num_batched_tokens
    max_len = max(args.lengths) + args.max_tokens
    start = time.perf_counter()
    llm = vllm.LLM(
        model=model, dtype=args.dtype, enforce_eager=args.enforce_eager, enable_prefix_caching=False,
        max_model_len=max_len, tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization, skip_tokenizer_init=True, seed=0,
        disable_log_stats=False,  # keeps each request's first- and last-token times (the decode step)
        **engine,
    )
    started = time.perf_counter() - start
    pool = pool_tokens(llm)
    rows = []
    try:
        rng = random.Random(0)
        # Warm-up: kernels compile on first use (TCA's at the first prompt past the crossover), not in the timings.
        warm = min(args.lengths)
        timed_generate(llm, [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(warm)]}], 3)
        runs = [(length, args.batch) for length in args.lengths]
        if args.saturate and pool is not None:  # as many of the longest prompts as the pool admits at once
            longest = max(args.lengths)
            runs.append((longest, min(args.saturate, pool // (longest + args.max_tokens))))
        for length, batch in tqdm(runs, desc=f"{name}: prompt lengths", disable=None):
            requests = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(length)]} for _ in range(batch)]
            before = kv_usage()
            first, _ = timed_generate(llm, requests, 1)
            full, step = timed_generate(llm, requests, args.max_tokens)
            after = kv_usage()
            # The engine's own token times where it keeps them: the difference of two whole runs also carries the
            # run-to-run spread of their prefills, which at long prompts exceeds all the decode steps together.
            step = (full - first) / max(1, args.max_tokens - 1) if step is None else step
            row = {
                "backend": name, "L": length, "batch": batch, "ttft_s": first, "engine_start_s": started,
                "pool_tokens": pool, "admits_at_L": None if pool is None else pool // (length + args.max_tokens),
                "decode_step_ms": 1000 * step,
                "decode_tokens_per_s": batch / step,
                # what a client sees: every output token of the batch over the whole run, prefill included
                "output_tokens_per_s": batch * args.max_tokens / max(1e-9, full),
            }
            if name == "tca":
                row.update(
                    pool_bytes=after.pool_bytes, decode_dense_bytes=after.dense_bytes - before.dense_bytes,
                    decode_read_bytes=after.read_bytes - before.read_bytes,
                )
                row["decode_read_fraction"] = row["decode_read_bytes"] / max(1, row["decode_dense_bytes"])
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        del llm
        gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a Hugging Face model folder vLLM can load")
    source.add_argument("--tiny", action="store_true", help="a tiny random Llama (CPU smoke runs)")
    source.add_argument("--shape", choices=sorted(SHAPES), help="a model shape with random weights (no download)")
    parser.add_argument("--plan", default="default", help="TCA_VLLM_PLAN: a plan JSON, 'default' or 'dense'")
    parser.add_argument("--block-size", type=int, help="TCA_VLLM_BLOCK_SIZE (default/dense plans)")
    parser.add_argument("--window", type=int, help="TCA_VLLM_WINDOW")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-num-batched-tokens", type=int, help="vLLM's prefill chunk limit (default: vLLM's)")
    parser.add_argument("--dense-below", type=int, help="TCA_VLLM_DENSE_BELOW (default: the measured crossover)")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--saturate", type=int, metavar="N",
                        help="also run min(N, what the pool admits) of the longest prompts at once (output tokens/s)")
    parser.add_argument("--backends", nargs="+", default=["vllm", "tca"], choices=["vllm", "tca"])
    parser.add_argument("--out", help="save all rows as JSON here")
    args = parser.parse_args()
    if args.max_tokens < 2:
        parser.error("--max-tokens must be at least 2 (the decode step is timed after the first token)")
    os.environ["TCA_VLLM_PLAN"] = args.plan
    for variable, value in (("TCA_VLLM_BLOCK_SIZE", args.block_size), ("TCA_VLLM_WINDOW", args.window),
                            ("TCA_VLLM_DENSE_BELOW", args.dense_below)):
        if value is not None:
            os.environ[variable] = str(value)
    import tca.serving.vllm

    tca.serving.vllm.register()  # what the entry point does when tca is installed
    if args.tiny:
        model, vocab = tiny_llama_dir(), 128
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    elif args.shape:
        model, vocab = shape_dir(args.shape, max(args.lengths) + args.max_tokens), SHAPES[args.shape][1]["vocab_size"]
    else:
        from transformers import AutoConfig

        model, vocab = args.model, AutoConfig.from_pretrained(args.model).vocab_size
    rows = [row for name in args.backends for row in run_backend(name, args, model, vocab)]
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"args": vars(args), "environment": environment(), "rows": rows}, handle, indent=1)


def environment() -> dict:
    import platform

    import torch
    import vllm

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": device, "torch": torch.__version__, "vllm": vllm.__version__,
            "date": time.strftime("%Y-%m-%d")}


if __name__ == "__main__":
    main()

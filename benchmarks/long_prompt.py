"""A very long prompt through a Llama-3.1-8B-shaped model, chunk by chunk: streaming and exact chunked prefill.

    PYTHONPATH=src python benchmarks/long_prompt.py                             # GPU, the full run (triton)
    PYTHONPATH=src python benchmarks/long_prompt.py --tiny                      # CPU smoke test (seconds)
    PYTHONPATH=src python benchmarks/long_prompt.py --cache mymodule:make_cache # another cache implementation

Model: random bf16 weights from a LlamaConfig of Llama-3.1-8B's shape (hidden 4096, 32 layers, 32 query / 8 KV
heads of dim 128, intermediate 14336, vocab 128256, rope theta 500000); no download. The script drives it layer
by layer through transformers' own modules (norms, projections, rotary embedding, MLP) and hands attention to a
cache object, so only one chunk's activations are ever live:

1. streaming: a prompt of --long-length tokens (default 1,048,576) prefilled in streaming chunks of --chunk
   tokens, then --decode-tokens (32) greedy tokens. Reports time to first token (the whole prefill, the final
   norm and lm_head on the last position), decode ms per token, peak GPU memory, and the KV bytes held after the
   prefill beside what the dense KV would take.
2. exact vs one-shot: a prompt of --short-length tokens (default 131,072) prefilled exactly in chunks of
   --chunk tokens, and in one pass (tca.prefill per layer). Reports both times, their ratio, and whether the
   first generated token agrees (not guaranteed in a model: see docs/semantics.md section 5b.1).

Results go to $OUT/long_prompt.json (or --out); a short table is printed last.

--backend names the tca backend behind the default cache (tca.start_prefill / prefill_chunk / finish_prefill /
decode per layer, and tca.prefill for the one-shot run): it must declare chunked prefill (`python -m tca info`,
docs/backends.md). "auto" (the default) resolves once to the fastest such backend for the device (triton on a
GPU, torch elsewhere), so chunked and one-shot runs use the same one; the resolved name is recorded. The
reference also declares chunked prefill but is only practical at --tiny sizes.

The cache interface (what --cache must build; LongPromptCache below is tca's public API):

    make_cache(mode: str, num_layers: int, config: tca.TCAConfig, backend: str) -> cache
        mode: "streaming", "exact" or "oneshot" (one chunk holding the whole prompt, as tca.prefill).
    cache.prefill_chunk(layer: int, q, k, v) -> out
        q [B, HQ, n, D] and k, v [B, HKV, n, D] ("bhsd", rotary embedding applied) of the prompt's next n tokens
        at this layer; out [B, HQ, n, D]. Layers are called in order 0..num_layers-1 for each chunk.
    cache.finish() -> None          the prompt is complete (exact mode compresses here)
    cache.decode(layer: int, q, k, v) -> out      one new token, shapes as above with n = 1
    cache.nbytes -> int             bytes of keys and values held now, all layers together

Shape letters: B batch (1 here), HQ query heads, HKV key/value heads, n chunk tokens, D head dim.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import warnings

import torch

from tca.models.random_shapes import SHAPES, random_model

LLAMA_8B, TINY = SHAPES["llama-3.1-8b-shape"], SHAPES["llama-tiny-shape"]


class LongPromptCache:
    """The interface above on tca's public chunked prefill: one tca.ChunkedPrefill, then one cache, per layer."""

    def __init__(self, mode: str, num_layers: int, config, backend: str):
        import tca

        if mode not in ("streaming", "exact", "oneshot"):
            raise ValueError(f"mode must be 'streaming', 'exact' or 'oneshot', got {mode!r}")
        self.mode, self.config, self.backend = mode, config, backend
        self.states = [
            None if mode == "oneshot" else tca.start_prefill(mode=mode, config=config, backend=backend)
            for _ in range(num_layers)
        ]
        self.caches = [None] * num_layers

    def prefill_chunk(self, layer, q, k, v):
        import tca

        if self.mode == "oneshot":
            if self.caches[layer] is not None:
                raise ValueError("mode 'oneshot' takes the whole prompt as one chunk")
            out, self.caches[layer] = tca.prefill(q, k, v, config=self.config, backend=self.backend)
            return out
        return tca.prefill_chunk(q, k, v, self.states[layer])

    def finish(self):
        import tca

        if self.mode != "oneshot":
            self.caches = [tca.finish_prefill(state) for state in self.states]

    def decode(self, layer, q, k, v):
        import tca

        return tca.decode(q, k, v, self.caches[layer])

    @property
    def nbytes(self) -> int:
        held = [c.nbytes for c in self.caches if c is not None]
        held += [s.nbytes for s in self.states if s is not None and not s.finished]
        return sum(held)


def make_tca_cache(mode, num_layers, config, backend):
    return LongPromptCache(mode, num_layers, config, backend)


def load_factory(spec: str | None):
    if spec is None:
        return make_tca_cache
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "make_cache")


def build_model(shape: dict, max_positions: int, dtype: torch.dtype, device: str, seed: int):
    return random_model(shape, max_positions, dtype, device, seed)


class Driver:
    """Runs the model layer by layer over chunks of token ids, handing attention to the cache."""

    def __init__(self, model):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.model, self.rotate = model, apply_rotary_pos_emb
        c = model.config
        self.HQ, self.HKV, self.D = c.num_attention_heads, c.num_key_value_heads, c.head_dim

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, start: int, attend) -> torch.Tensor:
        """ids [B, n] at positions start..start+n-1  ->  final hidden states [B, n, hidden]."""
        inner = self.model.model
        hidden = inner.embed_tokens(ids)
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        cos, sin = inner.rotary_emb(hidden, positions)
        B, n, _ = hidden.shape
        for index, layer in enumerate(inner.layers):
            x = layer.input_layernorm(hidden)
            proj = layer.self_attn
            q = proj.q_proj(x).view(B, n, self.HQ, self.D).transpose(1, 2)
            k = proj.k_proj(x).view(B, n, self.HKV, self.D).transpose(1, 2)
            v = proj.v_proj(x).view(B, n, self.HKV, self.D).transpose(1, 2)
            q, k = self.rotate(q, k, cos, sin)
            out = attend(index, q, k, v).transpose(1, 2).reshape(B, n, self.HQ * self.D)
            hidden = hidden + proj.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            del x, q, k, v, out
        return inner.norm(hidden)

    @torch.no_grad()
    def next_token(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """Greedy next token from the final hidden state of the last position [B, hidden] -> [B, 1]."""
        return self.model.lm_head(hidden_last).argmax(-1, keepdim=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prefill(driver, cache, ids, chunk: int, device: str, label: str):
    """Feed ids [B, L] chunk by chunk; returns the first generated token [B, 1]."""
    from tqdm import tqdm

    L = ids.shape[1]
    hidden = None
    for start in tqdm(range(0, L, chunk), desc=label, unit="chunk", file=sys.stdout, mininterval=5):
        hidden = driver.forward(ids[:, start : start + chunk], start, cache.prefill_chunk)[:, -1]
    cache.finish()
    token = driver.next_token(hidden)
    sync(device)
    return token


def dense_kv_bytes(model, length: int, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * length * torch.finfo(dtype).bits // 8


def run_streaming(model, factory, args, config, device, dtype) -> dict:
    from tqdm import tqdm

    driver = Driver(model)
    L = args.long_length
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(model.config.vocab_size, (1, L), generator=gen).to(device)
    cache = factory("streaming", model.config.num_hidden_layers, config, args.backend)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    token = prefill(driver, cache, ids, args.chunk, device, f"streaming prefill of {L} tokens")
    ttft = time.perf_counter() - t0
    kv_after_prefill = cache.nbytes
    step_ms = []
    for i in tqdm(range(args.decode_tokens), desc="decode", unit="token", file=sys.stdout, mininterval=5):
        t = time.perf_counter()
        hidden = driver.forward(token, L + i, cache.decode)[:, -1]
        token = driver.next_token(hidden)
        sync(device)
        step_ms.append(1000 * (time.perf_counter() - t))
    return {
        "prompt_tokens": L,
        "chunk": args.chunk,
        "time_to_first_token_s": ttft,
        "decode_tokens": args.decode_tokens,
        "decode_ms_per_token": sum(step_ms) / len(step_ms) if step_ms else None,
        "decode_ms_median": sorted(step_ms)[len(step_ms) // 2] if step_ms else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
        "kv_bytes_after_prefill": kv_after_prefill,
        "kv_bytes_after_decode": cache.nbytes,
        "dense_kv_bytes": dense_kv_bytes(model, L, dtype),
    }


def run_exact_vs_oneshot(model, factory, args, config, device) -> dict:
    driver = Driver(model)
    L = args.short_length
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(model.config.vocab_size, (1, L), generator=gen).to(device)
    row = {"prompt_tokens": L, "chunk": args.chunk}
    tokens = {}
    for mode, chunk in (("oneshot", L), ("exact", args.chunk)):
        times = []
        for _ in range(args.repeats):
            cache = factory(mode, model.config.num_hidden_layers, config, args.backend)
            sync(device)
            t0 = time.perf_counter()
            tokens[mode] = prefill(driver, cache, ids, chunk, device, f"{mode} prefill of {L} tokens")
            times.append(time.perf_counter() - t0)
            del cache
        row[f"{mode}_prefill_s"] = sorted(times)[len(times) // 2]
    row["exact_over_oneshot"] = row["exact_prefill_s"] / row["oneshot_prefill_s"]
    # Informational: per layer, the last exact chunk gives the one-shot rows for the same inputs, but from the
    # second layer on the earlier chunks' keys differ (each chunk selected with its own last query), so the
    # first token may differ once a chunk before the last exceeds the window.
    row["same_first_token"] = bool(torch.equal(tokens["exact"], tokens["oneshot"]))
    return row


def human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a (CPU)"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def table(result: dict) -> str:
    lines = ["", "| run | prompt | figure | value |", "|---|---|---|---|"]
    s = result.get("streaming")
    if s:
        run = f"streaming, chunks of {s['chunk']}"
        lines += [
            f"| {run} | {s['prompt_tokens']} | time to first token | {s['time_to_first_token_s']:.2f} s |",
            f"| {run} | {s['prompt_tokens']} | decode | {s['decode_ms_per_token']:.2f} ms/token |",
            f"| {run} | {s['prompt_tokens']} | peak memory | {human_bytes(s['peak_memory_bytes'])} |",
            f"| {run} | {s['prompt_tokens']} | KV after prefill | {human_bytes(s['kv_bytes_after_prefill'])} "
            f"(dense: {human_bytes(s['dense_kv_bytes'])}) |",
        ]
    e = result.get("exact_vs_oneshot")
    if e:
        lines += [
            f"| one-shot | {e['prompt_tokens']} | prefill | {e['oneshot_prefill_s']:.2f} s |",
            f"| exact chunks of {e['chunk']} | {e['prompt_tokens']} | prefill | {e['exact_prefill_s']:.2f} s "
            f"({e['exact_over_oneshot']:.3f}x one-shot; same first token: {e['same_first_token']}) |",
        ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model and lengths on the CPU (a smoke test)")
    parser.add_argument("--backend", default="auto", help="tca backend for the attention (default auto)")
    parser.add_argument("--cache", default=None, help="module:factory building the cache (default: tca's API)")
    parser.add_argument("--long-length", type=int, default=1 << 20, help="streaming prompt tokens")
    parser.add_argument("--short-length", type=int, default=1 << 17, help="exact vs one-shot prompt tokens")
    parser.add_argument("--chunk", type=int, default=16384, help="chunk tokens (a multiple of the block size)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats of exact vs one-shot (median)")
    parser.add_argument("--skip", choices=("streaming", "exact"), action="append", default=[], help="skip a run")
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/long_prompt.json)")
    args = parser.parse_args(argv)

    import tca

    warnings.simplefilter("ignore", tca.BackendChoiceWarning)
    if args.tiny:
        shape, device, dtype = TINY, "cpu", torch.float32
        config = tca.TCAConfig(block_size=16, window=32)
        if args.long_length == 1 << 20:
            args.long_length, args.short_length, args.chunk, args.decode_tokens = 256, 96, 64, 4
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the full run needs a CUDA GPU; pass --tiny for the CPU smoke test")
        shape, device, dtype = LLAMA_8B, "cuda", torch.bfloat16
        config = tca.TCAConfig()
    if args.chunk % config.block_size:
        raise SystemExit(f"--chunk must be a multiple of the block size {config.block_size} (streaming chunks)")
    if args.cache is None:  # one concrete backend for every run (auto could pick another for tca.prefill)
        from tca.backends import routing

        chosen = routing.resolve(args.backend, device, dtype, shape["head_dim"], phase="chunked_prefill")
        args.backend = chosen.name
    max_positions = max(args.long_length + args.decode_tokens, args.short_length)
    model = build_model(shape, max_positions, dtype, device, seed=0)
    factory = load_factory(args.cache)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "backend": args.backend,
        "cache": args.cache or "tca API (LongPromptCache)",
        "model": {k: v for k, v in shape.items()},
        "dtype": str(dtype).removeprefix("torch."),
        "config": {"block_size": config.block_size, "window": config.window},
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    if "streaming" not in args.skip:
        result["streaming"] = run_streaming(model, factory, args, config, device, dtype)
    if "exact" not in args.skip:
        result["exact_vs_oneshot"] = run_exact_vs_oneshot(model, factory, args, config, device)
    out = args.out or os.path.join(os.environ.get("OUT", "."), "long_prompt.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"results: {out}")
    print(table(result), flush=True)
    return result


if __name__ == "__main__":
    main()

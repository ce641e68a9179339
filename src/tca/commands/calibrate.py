"""`python -m tca calibrate`: one forward pass over real text -> a budget plan JSON for a model.

    python -m tca calibrate --model smollm2 --block-size 64 --window 512 --length 2048 --out plan.json
    python -m tca calibrate --model path/or/hub-id [--gguf-file F.gguf] --out plan.json [--text FILE]

The default text is the pydoc topic documentation shipped with Python (no download).
"""

from __future__ import annotations

import time
from pathlib import Path

HELP = "calibrate per-layer, per-KV-head budgets of a model in one forward pass; writes a plan JSON"


def configure(parser) -> None:
    parser.add_argument("--model", required=True,
                        help='a transformers model path or hub id, or a named model: "smollm2", "qwen2.5-0.5b"')
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model (for GGUF checkpoints)")
    parser.add_argument("--out", required=True, help="where to write the plan JSON")
    parser.add_argument("--text", default=None, help="a UTF-8 text file (default: Python's pydoc topics)")
    parser.add_argument("--length", type=int, default=None, help="tokens of calibration text (default: 2 x window)")
    parser.add_argument("--tau", type=float, default=0.9, help="retained attention mass to reach (default 0.9)")
    parser.add_argument("--block-size", type=int, default=128, help="block size b (default 128)")
    parser.add_argument("--window", type=int, default=4096, help="local window w (default 4096)")
    parser.add_argument("--alpha", type=float, default=0.5, help="redundancy weight of the block priority (0.5)")
    parser.add_argument("--num-rows", type=int, default=256, help="query rows evaluated per layer (default 256)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def load_model(name: str, gguf_file: str | None, dtype, device: str):
    """(model, tokenizer): a named model (tca.models.registry), else AutoModelForCausalLM.from_pretrained."""
    from tca.models.registry import MODELS, load_named

    if name in MODELS:
        model, tokenizer = load_named(name, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        extra = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(name, **extra)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **extra).eval()
    return model.to(device), tokenizer


def run(args) -> int:
    import torch

    import tca
    from tca.models import calibrate_model, calibration_ids, default_calibration_text
    from tca.models.registry import MODELS

    config = tca.TCAConfig(block_size=args.block_size, window=args.window, alpha=args.alpha, tau=args.tau)
    length = args.length or 2 * config.window
    if args.text:
        text, source = Path(args.text).read_text(encoding="utf-8"), str(args.text)
    else:
        text, source = default_calibration_text(), "pydoc_data.topics (Python's own documentation)"
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, args.gguf_file, getattr(torch, args.dtype), args.device)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s")
    ids = calibration_ids(tokenizer, length, text)
    plan = calibrate_model(model, ids, config=config, tau=args.tau, num_rows=args.num_rows, text_source=source)
    plan.metadata["model"] = args.model if args.model not in MODELS else plan.metadata["model"]
    if args.gguf_file:
        plan.metadata["gguf_file"] = args.gguf_file
    plan.save(args.out)
    dense = sum(h.candidate is None for layer in plan.layers for h in layer)
    heads = plan.num_layers * plan.num_kv_heads
    print(f"wrote {args.out}: {plan.num_layers} layers x {plan.num_kv_heads} KV heads, "
          f"mean keep ratio of budgeted blocks {plan.mean_keep_ratio():.3f}, {dense}/{heads} heads dense "
          f"(b={config.block_size}, w={config.window}, tau={config.tau}, L={length})")
    return 0

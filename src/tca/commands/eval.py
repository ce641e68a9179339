"""`python -m tca eval`: needle tasks and perplexity on SmolLM2-135M, dense vs TCA, JSON + plots + tables.

    python -m tca eval                     # the "quick" preset on SmolLM2 (1-2 minutes on a 2-core CPU) -> tca_eval.json
    python -m tca eval --preset main --out benchmarks/results/quality_main.json --plots docs/quality
    python -m tca eval --preset ablation --out benchmarks/results/quality_ablation.json --plots docs/quality_ablation
    python -m tca eval --from-json benchmarks/results/quality_main.json --plots docs/quality   # tables/plots only
    python -m tca eval --model qwen2.5-0.5b --preset ruler-cpu --out benchmarks/results/ruler_4k_cpu.json \
        --plots docs/quality_ruler                   # RULER (13 tasks) with the kvpress peers; GPU: benchmarks/ruler_gpu.py
"""

from __future__ import annotations

import json
from pathlib import Path

from ._args import (
    SHIPPED_MODELS,
    UsageError,
    check_backend,
    check_context,
    check_fractions,
    check_plots_possible,
    check_positive,
    lengths,
    resolve_device,
    resolve_model,
)

DEFAULT_OUT = "tca_eval.json"
HELP = "quality harness: RULER-style needles and perplexity, dense vs TCA (JSON, tables, plots)"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def configure(parser) -> None:
    from tca.eval.presets import DEFAULT_PRESET, PRESETS
    from tca.eval.ruler_presets import RULER_PRESETS

    parser.add_argument("--preset", choices=PRESETS + RULER_PRESETS, default=DEFAULT_PRESET,
                        help=f"methods and grid to run (default: {DEFAULT_PRESET}, 1-2 minutes on a 2-core CPU; "
                        "ruler*: RULER tasks and the kvpress peers)")
    shipped = "; ".join(f"{name}: {what}" for name, what in SHIPPED_MODELS.items())
    parser.add_argument("--model", default="smollm2",
                        help=f"a shipped model ({shipped}), a local Hugging Face model directory or a .gguf file")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"results JSON, written after every method ({DEFAULT_OUT})")
    parser.add_argument("--resume", action="store_true", help="skip methods already in --out (same grid)")
    parser.add_argument("--from-json", help="only make tables/plots from an existing results JSON")
    parser.add_argument("--plots", help="plot path prefix, e.g. docs/quality -> docs/quality_tradeoff.png")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--backend", default="auto", help="TCA backend (auto: the best available)")
    parser.add_argument("--methods", help="comma-separated method names to keep from the preset")
    parser.add_argument("--tasks", help="comma-separated tasks (niah_single,niah_multikey,niah_multivalue,vt; RULER's for ruler*)")
    parser.add_argument("--lengths", type=lengths, help="needle context lengths in tokens, e.g. 2048,4096 or 2k,4k")
    parser.add_argument("--depths", type=_floats, help="needle depths in [0, 1], e.g. 0.1,0.5,0.9")
    parser.add_argument("--samples", type=int, help="samples per (task, length, depth)")
    parser.add_argument("--ppl-lengths", type=lengths, help="perplexity text lengths in tokens (empty: none)")
    parser.add_argument("--ppl-docs", type=int, help="texts per perplexity length")
    parser.add_argument("--ppl-tokens", type=int, help="scored tokens at the end of each text")
    parser.add_argument("--ppl-modes", help="decode,prefill")
    parser.add_argument("--calibration-length", type=int, help="calibration tokens (from the calibration split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="show the model loader's progress bars")


def _grid(args, grid):
    if args.tasks:
        grid.tasks = args.tasks.split(",")
    for name in ("lengths", "depths", "samples", "ppl_lengths", "ppl_docs", "ppl_tokens"):
        value = getattr(args, name)
        if value is not None:
            setattr(grid, name, value)
    if args.ppl_modes:
        grid.ppl_modes = args.ppl_modes.split(",")
    grid.seed = args.seed
    grid.__post_init__()
    return grid


def interrupted_hint(args) -> str:
    """What the one-line message after Ctrl-C says: where the finished part is and how to continue."""
    if args.from_json or not args.out or not Path(args.out).is_file():
        return ("no method had finished, so nothing was saved (results are written after every method, and "
                "--resume continues from them)")
    from tca.eval.ruler_presets import RULER_PRESETS

    if args.preset in RULER_PRESETS:  # RULER runs always continue from their --out
        return f"the finished samples are in {args.out}; run the same command again to continue"
    again = "run the same command again" if args.resume else "add --resume to the same command"
    return f"the finished methods are in {args.out}; {again} to continue"


def _print_report(results: dict, plots: str | None) -> None:
    from tca.eval import report

    print(report.markdown_table(results))
    print(report.KEPT_LEGEND)
    for method in results["methods"]:
        if method != report.BASELINE:
            checks = report.targets(results, method)
            if checks:
                print(f"{method}: needle misses vs dense {checks['needle_misses']}/{checks['needle_cells_dense_succeeds']}, "
                      + ", ".join(f"ppl@{L} {100 * v['ppl_increase']:+.2f}% (KV kept @{L}: {v['kept_fraction']:.3f})"
                                  for L, v in checks["perplexity"].items()))
    if plots:
        from tca.eval import plots as P

        written = [P.tradeoff(results, f"{plots}_tradeoff.png"), P.needle_grid(results, f"{plots}_needle_grid.png"),
                   P.task_bars(results, f"{plots}_tasks.png")]
        print("plots:", ", ".join(str(p) for p in written))


def check_args(args):
    """Every argument and file checked before the model loads. Returns (model choice, methods, grid, calibration
    length); raises UsageError (printed as one line)."""
    import torch

    from tca.eval.presets import preset

    if args.plots:
        check_plots_possible()
    if args.depths is not None:
        check_fractions("--depths", args.depths)
    for option in ("samples", "ppl_docs", "ppl_tokens", "calibration_length"):
        check_positive("--" + option.replace("_", "-"), getattr(args, option))
    if args.from_json:
        if not Path(args.from_json).is_file():
            raise UsageError(f"--from-json {args.from_json}: file not found")
        return None, [], None, None
    check_context("--lengths", args.lengths or [], args.model)
    check_context("--ppl-lengths", args.ppl_lengths or [], args.model)
    check_backend(args.backend, resolve_device(args.device), getattr(torch, args.dtype))
    from tca.eval.ruler_presets import RULER_PRESETS

    if args.preset in RULER_PRESETS:  # the RULER grid is built from the RULER preset when it runs
        return resolve_model(args.model), None, None, None
    methods, grid, calibration_length = preset(args.preset)
    try:
        grid = _grid(args, grid)
    except ValueError as error:  # unknown task or perplexity mode, lengths too short
        raise UsageError(str(error)) from None
    if args.methods:
        wanted = args.methods.split(",")
        unknown = [m for m in wanted if m not in {x.name for x in methods}]
        if unknown:
            raise UsageError(f"unknown methods {unknown} for preset {args.preset!r}; known: {', '.join(m.name for m in methods)}")
        by_name = {m.name: m for m in methods}
        methods = [by_name[name] for name in wanted]  # run in the order asked
    return resolve_model(args.model), methods, grid, args.calibration_length or calibration_length


def _print_ruler(results: dict, plots: str | None) -> None:
    from tca.eval import ruler_report

    print(ruler_report.summary_table(results))
    for length in ruler_report.lengths_of(results):
        print(f"\n{length} tokens\n" + ruler_report.task_table(results, length))
    if plots:
        print("plot:", ruler_report.plot_score_vs_kept(results, f"{plots}_score_vs_kept.png"))
    print(ruler_report.short_table(results))


def _run_ruler(args, device: str, dtype, choice) -> int:
    import torch

    from tca.eval.corpus import calibration_text
    from tca.eval.methods import Runner
    from tca.eval.ruler_harness import RulerRunner, evaluate_ruler
    from tca.eval.ruler_presets import ruler_preset

    methods, grid, calibration_length = ruler_preset(args.preset)
    if args.tasks:
        grid.tasks = args.tasks.split(",")
    if args.lengths:
        grid.lengths = args.lengths
    if args.samples:
        grid.samples = args.samples
    grid.seed = args.seed if args.seed else grid.seed
    grid.__post_init__()
    methods = _pick(methods, args)
    model, tokenizer = choice.load(device, dtype, seed=args.seed, verbose=args.verbose)
    calibration_length = args.calibration_length or calibration_length
    calibration = torch.tensor([tokenizer.encode(calibration_text(), add_special_tokens=False)[:calibration_length]])
    probes = None
    if any(getattr(m, "calibration", "paper") != "paper" for m in methods):
        from tca.models.calibration_variants import retrieval_probes

        probes = retrieval_probes(tokenizer, min(4096, 2 * calibration_length), 4, calibration_text())
    runner = Runner(model, args.backend, calibration, progress=not args.quiet, probes=probes)
    print(f"tca eval: preset {args.preset}, {len(methods)} methods, model {args.model} on {device} ({args.dtype})", flush=True)
    results = evaluate_ruler(RulerRunner(runner, tokenizer), methods, grid, out=args.out, progress=not args.quiet)
    if args.out:  # the calibrated plans, next to the results, to reuse or ship
        from pathlib import Path

        folder = Path(args.out).with_suffix("")
        for name, plan in runner.plans.items():
            plan.save(folder.parent / f"{folder.name}_plan_{name}.json")
    _print_ruler(results, args.plots)
    return 0


def _pick(methods: list, args) -> list:
    if not args.methods:
        return methods
    wanted = args.methods.split(",")
    by_name = {m.name: m for m in methods}
    unknown = [m for m in wanted if m not in by_name]
    if unknown:
        raise ValueError(f"unknown methods {unknown} for preset {args.preset!r}; known: {', '.join(by_name)}")
    return [by_name[name] for name in wanted]  # run in the order asked


def run(args) -> int:
    import torch

    choice, methods, grid, calibration_length = check_args(args)
    if args.from_json:
        with open(args.from_json) as f:
            try:
                results = json.load(f)
            except json.JSONDecodeError as error:
                raise UsageError(f"--from-json {args.from_json}: not valid JSON ({error})") from None
        _print_ruler(results, args.plots) if "samples" in results else _print_report(results, args.plots)
        return 0

    from tca.eval.corpus import calibration_text
    from tca.eval.estimate import estimate_seconds, format_duration, seconds_per_token, workload
    from tca.eval.harness import evaluate
    from tca.eval.methods import Runner

    device = str(resolve_device(args.device))
    dtype = getattr(torch, args.dtype)
    if methods is None:
        return _run_ruler(args, device, dtype, choice)
    model, tokenizer = choice.load(device, dtype, seed=args.seed, verbose=args.verbose)
    calibration = tokenizer.encode(calibration_text(), add_special_tokens=False)[:calibration_length]
    runner = Runner(model, args.backend, torch.tensor([calibration]), progress=not args.quiet)
    work = workload(methods, grid, calibration_length)
    per_token, per_step = seconds_per_token(model)
    print(f"tca eval: preset {args.preset}, model {args.model} on {device} ({args.dtype}); results -> {args.out}")
    print(f"  will run {work.describe()}")
    print(f"  methods: {', '.join(m.name for m in methods)}; estimated time: about "
          f"{format_duration(estimate_seconds(work, per_token, per_step))} (from the dense model's speed here)",
          flush=True)
    results = evaluate(runner, tokenizer, methods, grid, out=args.out, resume=args.resume, progress=not args.quiet)
    _print_report(results, args.plots)
    print("wrote", args.out)
    return 0

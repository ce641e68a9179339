"""benchmarks/bench_selection.py's parts that run without a GPU: another revision's selection loads as its own
module (relative imports made absolute) and selects what the current one does; the run itself refuses a CPU."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import ROOT, load_script, require_triton

pytestmark = pytest.mark.triton


def test_another_revision_loads_apart_and_selects_the_same(tmp_path):
    device = require_triton()
    bench = load_script("benchmarks/bench_selection.py")
    for name in ("selection_triton.py", "kernels_selection.py"):
        shutil.copy(ROOT / "src/tca/backends/common" / name, tmp_path / name)
    other = bench.load_version(str(tmp_path))
    from tca.backends.common import selection_triton
    from tca.budgets import default_budgets
    from tca.config import TCAConfig

    assert other is not selection_triton and other.__name__ == "selection_before.selection_triton"
    config = TCAConfig(block_size=16, window=32)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 150, 32, generator=gen).to(device)
    k = torch.randn(1, 2, 150, 32, generator=gen).to(device)
    budgets = default_budgets(16).to(device).expand(2, -1).contiguous()
    mine = selection_triton.select_on_device(q, k, budgets, config, 32**-0.5)
    assert bench.same_selection(other.select_on_device(q, k, budgets, config, 32**-0.5), mine)
    assert not bench.same_selection(dict(mine, counts=mine["counts"] + 1), mine)


def test_the_run_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    bench = load_script("benchmarks/bench_selection.py")
    with pytest.raises(SystemExit):
        bench.main(["--lengths", "256"])

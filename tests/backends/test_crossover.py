"""backend="auto" by length: below the device's measured crossover it runs exact dense attention (TCA with
dense budgets, every token kept), so enabling TCA never costs more than dense where TCA cannot win; a named
backend always runs the plan's budgets."""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import dense_causal, force_crossover, make_qkv
from tca.backends import crossover as crossover_module
from tca.backends.crossover import CPU

CONFIG = tca.TCAConfig(block_size=16, window=32)


@pytest.fixture
def dense_below_200(monkeypatch):
    force_crossover(monkeypatch, 200)


def test_auto_runs_dense_below_the_crossover(dense_below_200):
    q, k, v = make_qkv(1, 4, 2, 150, 16, dtype=torch.float32, seed=1)
    torch.testing.assert_close(tca.attention(q, k, v, config=CONFIG), dense_causal(q, k, v, 0.25), atol=1e-5, rtol=1e-5)
    sparse = tca.attention(q, k, v, config=CONFIG, backend="torch")  # named: the plan's budgets
    assert (sparse - dense_causal(q, k, v, 0.25)).abs().max() > 1e-3


def test_auto_prefill_below_the_crossover_keeps_every_token_and_decodes_densely(dense_below_200):
    q, k, v = make_qkv(1, 4, 2, 190, 16, dtype=torch.float32, seed=2)
    out, cache = tca.prefill(q[:, :, :150], k[:, :, :150], v[:, :, :150], config=CONFIG)
    assert int(cache.lengths.min()) == 150  # nothing dropped
    for i in range(150, 190):
        step = tca.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache)
        want = dense_causal(q[:, :, : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], 0.25)[:, :, -1:]
        torch.testing.assert_close(step, want, atol=1e-5, rtol=1e-5)
    assert int(cache.lengths.min()) == 190


def test_auto_runs_tca_from_the_crossover_on(dense_below_200):
    q, k, v = make_qkv(1, 4, 2, 260, 16, dtype=torch.float32, seed=3)
    torch.testing.assert_close(tca.attention(q, k, v, config=CONFIG), tca.attention(q, k, v, config=CONFIG, backend="torch"))


def test_cpu_has_no_crossover():
    assert crossover_module.crossover(torch.device("cpu")) == CPU and CPU.dense_below == 0


def test_every_measured_crossover_says_where_it_came_from():
    for name, entry in [*crossover_module.MEASURED.items(), *crossover_module.MEASURED_SHAPES.items()]:
        assert entry.measured and entry.dense_below > 0 and entry.flash_from > 0, name


def test_a_shape_measured_on_its_own_overrides_the_device_default():
    h100, lookup = "NVIDIA H100 80GB HBM3", crossover_module.lookup
    qwen = crossover_module.MEASURED_SHAPES[("H100", 14, 2, 64)]
    assert lookup(h100, (14, 2, 64)) == qwen and qwen.dense_below > crossover_module.MEASURED["H100"].dense_below
    assert lookup(h100, (32, 8, 128)) == lookup(h100) == crossover_module.MEASURED["H100"]
    assert lookup("NVIDIA B200", (14, 2, 64)) == crossover_module.DEFAULT_CUDA  # another device: its own or the default


def test_auto_asks_the_crossover_for_the_calls_shape(monkeypatch):
    seen = []

    def record(device, shape=None):
        seen.append(shape)
        return CPU

    monkeypatch.setattr("tca.backends.routing.crossover", record)
    q, k, v = make_qkv(1, 6, 2, 64, 16, dtype=torch.float32, seed=4)
    tca.attention(q, k, v, config=CONFIG)
    assert seen and all(shape == (6, 2, 16) for shape in seen)

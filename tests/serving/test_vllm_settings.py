"""The vLLM plugin's settings, refusals and entry point, checked without vLLM (plain objects stand in for its config).

Shape letters: HKV key/value heads, K retain counts.
"""

from __future__ import annotations

import tomllib
from types import SimpleNamespace

import pytest
import torch

import tca
from helpers import ROOT
from tca.models.budget_plans import default_plan
from tca.models.shape import ModelShape
from tca.serving.vllm.checks import engine_problems, layer_problems
from tca.serving.vllm.settings import Settings, layer_index


def engine(prefix_caching=False, cache_dtype="auto", speculative=None, dcp=1, pcp=1, dbo=False, ubatch=0,
           connector=None, sleep=False):
    return SimpleNamespace(
        cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching, cache_dtype=cache_dtype),
        speculative_config=speculative, kv_transfer_config=connector,
        model_config=SimpleNamespace(enable_sleep_mode=sleep),
        parallel_config=SimpleNamespace(decode_context_parallel_size=dcp, prefill_context_parallel_size=pcp,
                                        enable_dbo=dbo, ubatch_size=ubatch),
    )


def test_entry_point_is_declared_for_vllm():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"tca": "tca.serving.vllm:register"}
    import tca.serving.vllm as plugin

    assert callable(plugin.register)


def test_import_tca_does_not_import_vllm():
    import subprocess
    import sys

    code = "import sys, tca, tca.serving.vllm; print('vllm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_default_settings():
    settings = Settings.from_environment({})
    assert settings.config == tca.TCAConfig() and settings.backend == "auto" and settings.plan is None
    assert torch.equal(settings.layer_budgets(5, 2), tca.default_budgets(128).expand(2, -1))


def test_dense_settings_with_block_size_and_window():
    settings = Settings.from_environment({"TCA_VLLM_PLAN": "dense", "TCA_VLLM_BLOCK_SIZE": "16", "TCA_VLLM_WINDOW": "32"})
    assert settings.config == tca.TCAConfig(block_size=16, window=32)
    assert torch.equal(settings.layer_budgets(0, 3)[2], tca.dense_budgets(16))


def test_plan_file_budgets_and_tensor_parallel_slices(tmp_path):
    shape = ModelShape(name="toy", num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16)
    plan = default_plan(shape, tca.TCAConfig(block_size=16, window=64))
    plan.layers[1][3] = plan.layers[1][3].__class__([0, 0, 0, 0, 1.0], 1.0, 16.0, None)  # head 3 of layer 1: dense
    path = tmp_path / "plan.json"
    plan.save(path)
    settings = Settings.from_environment({"TCA_VLLM_PLAN": str(path), "TCA_VLLM_WINDOW": "128"})
    assert settings.config == tca.TCAConfig(block_size=16, window=128)
    assert torch.equal(settings.layer_budgets(1, 4), plan.budgets(1))
    # Two tensor-parallel ranks hold heads 0-1 and 2-3.
    assert torch.equal(settings.layer_budgets(1, 2, rank=1, world_size=2), plan.budgets(1)[2:])
    with pytest.raises(ValueError, match="4 KV heads per layer, but the model has 3"):
        settings.layer_budgets(0, 3)
    with pytest.raises(ValueError, match="has 2 layers, but vLLM asks for layer 2"):
        settings.layer_budgets(2, 4)
    with pytest.raises(ValueError, match="differs from the plan's block size 16"):
        Settings.from_environment({"TCA_VLLM_PLAN": str(path), "TCA_VLLM_BLOCK_SIZE": "32"})
    # Checked when the model is built, before its weights load: a plan for another model, fewer or more layers.
    cpu = torch.device("cpu")
    settings.check_model(2, 2, 2, cpu, torch.float32, 16)
    for layers, heads in ((2, 3), (3, 4), (1, 4)):
        with pytest.raises(ValueError, match="TCA_VLLM_PLAN=.* is a plan for 2 layers of 4 KV heads"):
            settings.check_model(layers, heads, 1, cpu, torch.float32, 16)


def test_a_backend_that_cannot_run_here_is_refused_naming_the_variable():
    settings = Settings.from_environment({"TCA_VLLM_BACKEND": "flash"})
    with pytest.raises(ValueError, match="TCA_VLLM_BACKEND='flash' cannot run here"):
        settings.check_model(2, 2, 1, torch.device("cpu"), torch.float32, 16)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TCA_VLLM_PLAN": "missing.json"}, "no such plan file"),
        ({"TCA_VLLM_WINDOW": "lots"}, "whole number of tokens"),
        ({"TCA_VLLM_BLOCK_SIZE": "100"}, "power of two"),
        ({"TCA_VLLM_BLOCK_SIZE": "64", "TCA_VLLM_WINDOW": "100"}, "TCA_VLLM_WINDOW.*multiple"),
        ({"TCA_VLLM_BACKEND": "trition"}, "TCA_VLLM_BACKEND='trition' is not a tca backend"),
        ({"TCA_VLLM_DENSE_BELOW": "-1"}, "TCA_VLLM_DENSE_BELOW"),
    ],
)
def test_bad_settings_are_explained(environ, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_environment(environ)


def test_layer_index_from_vllm_names():
    assert layer_index("model.layers.17.self_attn.attn") == 17
    with pytest.raises(ValueError, match="layer number"):
        layer_index("attn")


def test_supported_engine_has_no_problems():
    assert engine_problems(engine()) == []


@pytest.mark.parametrize(
    ("settings", "flag"),
    [
        ({"prefix_caching": True}, "--no-enable-prefix-caching"),
        ({"cache_dtype": "fp8"}, "--kv-cache-dtype auto"),
        ({"speculative": object()}, "--speculative-config"),
        ({"dcp": 2}, "--decode-context-parallel-size 1"),
        ({"pcp": 2}, "--prefill-context-parallel-size 1"),
        ({"dbo": True}, "--enable-dbo"),
        ({"ubatch": 2}, "--ubatch-size"),
        ({"connector": object()}, "--kv-transfer-config"),
        ({"sleep": True}, "--enable-sleep-mode"),
    ],
)
def test_refused_engine_settings_name_their_flag(settings, flag):
    problems = engine_problems(engine(**settings))
    assert len(problems) == 1 and flag in problems[0]


def test_layer_features_tca_cannot_honour():
    plain = dict(alibi_slopes=None, sliding_window=None, logits_soft_cap=None, sinks=None, attn_type="decoder",
                 decoder="decoder")
    assert layer_problems(**plain) == []
    assert layer_problems(**{**plain, "sliding_window": 4096}) == [
        "a sliding window (TCA already keeps a local window of its own)"
    ]
    assert "encoder" in layer_problems(**{**plain, "attn_type": "encoder"})[0]


@pytest.mark.parametrize("version", ["0.26.0", "0.28.1", "0.32.0", "0.32.1+cpu"])
def test_supported_vllm_versions(version):
    from tca.serving.vllm.compat import version_problem

    assert version_problem(version) is None


@pytest.mark.parametrize("version", ["0.25.1", "0.33.0", "1.0.0", "nightly"])
def test_other_vllm_versions_are_refused_with_the_ones_to_use(version):
    from tca.serving.vllm.compat import version_problem

    assert "0.26 to 0.32" in version_problem(version)


def test_dense_below_is_read_and_checked():
    from tca.serving.vllm.settings import Settings

    assert Settings.from_environment({"TCA_VLLM_DENSE_BELOW": "0"}).dense_below(torch.device("cpu"), (4, 2, 16)) == 0
    default = Settings.from_environment({"TCA_VLLM_BLOCK_SIZE": "16", "TCA_VLLM_WINDOW": "64"})
    assert default.dense_below(torch.device("cpu"), (4, 2, 16)) == 64  # the CPU has no crossover: the window

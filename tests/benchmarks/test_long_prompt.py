"""benchmarks/long_prompt.py on the CPU with a tiny model: its layer-by-layer driver is the model's own forward,
and both runs (streaming, exact vs one-shot) complete and report what they promise."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import load_script

pytest.importorskip("transformers")
pytest.importorskip("tqdm")


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/long_prompt.py")


def test_the_driver_is_the_models_forward(bench):
    model = bench.build_model(bench.TINY, 64, torch.float32, "cpu", seed=0)
    ids = torch.randint(model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))

    def causal(layer, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    hidden = bench.Driver(model).forward(ids, 0, causal)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_tiny_run_reports_every_figure(bench, tmp_path, backend):
    out = tmp_path / "long_prompt.json"
    args = ["--tiny", "--backend", backend, "--long-length", "128", "--short-length", "64", "--chunk", "32"]
    bench.main([*args, "--decode-tokens", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["backend"] == backend
    s = result["streaming"]
    assert s["prompt_tokens"] == 128 and s["decode_tokens"] == 2
    assert s["time_to_first_token_s"] > 0 and s["decode_ms_per_token"] > 0
    assert 0 < s["kv_bytes_after_prefill"] < s["dense_kv_bytes"]  # streaming never held the dense KV
    e = result["exact_vs_oneshot"]
    assert e["oneshot_prefill_s"] > 0 and e["exact_prefill_s"] > 0
    # Here the first chunk (32 tokens) fits the window (--tiny: w = 32), so every layer's earlier keys are the
    # one-shot prefill's and the last chunk's rows are too: the first token must agree.
    assert e["same_first_token"]


def test_the_default_cache_runs_on_the_fastest_backend_with_chunked_prefill(bench, tmp_path):
    out = tmp_path / "long_prompt.json"
    args = ["--tiny", "--long-length", "64", "--chunk", "32", "--decode-tokens", "1", "--skip", "exact"]
    result = bench.main([*args, "--out", str(out)])
    assert result["backend"] not in ("auto", "reference")  # torch on a CPU, triton on a GPU

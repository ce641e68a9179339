"""GPU: hybrid models (sliding-window and full-attention layers) with TCA on the Triton backend.

Marked `gpu` and `triton`; they skip without a CUDA device. The CPU twin is tests/models/test_hybrid.py.
"""

from __future__ import annotations

import pytest
import torch

import tca

pytestmark = [pytest.mark.gpu, pytest.mark.triton]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

CONFIG = tca.TCAConfig(block_size=16, window=64)
PROMPT, STEPS = 400, 8


def _ids(L: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (1, L), generator=torch.Generator().manual_seed(seed)).cuda()


def _generate(model, ids, cache):
    from tca.models import cache_kwargs

    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **cache_kwargs(model, cache),
        )


@pytest.mark.parametrize("arch", ["gemma3", "ministral"])
def test_dense_budgets_on_triton_give_the_models_own_logits(arch):
    from tca.models import TCACache, dense_plan, enable_tca, model_shape
    from tca.models.tiny_random import tiny_model

    model = tiny_model(arch, seed=3).cuda()
    ids = _ids(PROMPT, seed=1)
    own = _generate(model, ids, transformers.DynamicCache(config=model.config))
    enable_tca(model, plan=dense_plan(model_shape(model), CONFIG), backend="triton")
    out = _generate(model, ids, TCACache(model))
    # fp32 on Triton's tensor cores (TF32 products): close, not bit-equal
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(own.logits), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("arch", ["gemma3", "ministral"])
def test_default_budgets_on_triton_compress_the_full_attention_layers(arch):
    from tca.models import TCACache, enable_tca
    from tca.models.tiny_random import SLIDING_WINDOW, tiny_model

    model = enable_tca(tiny_model(arch, seed=4, dtype=torch.bfloat16).cuda(), config=CONFIG, backend="triton")
    cache = TCACache(model)
    out = _generate(model, _ids(PROMPT, seed=2), cache)
    assert out.sequences.shape == (1, PROMPT + STEPS)
    assert not torch.isnan(torch.stack(out.logits)).any()
    assert cache.layers[0].keys.shape[2] == SLIDING_WINDOW - 1
    assert cache.kept_fraction() < 0.8 and cache.nbytes < cache.dense_nbytes()

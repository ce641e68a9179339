"""The model path (transformers attention + the compressed cache) on the GPU backends, against the reference twin.

GPU only (marked `gpu`; skipped elsewhere). A tiny random Llama in bfloat16 (flash runs fp16/bf16 only): logits of a
prompt through "tca" on the named backend against "tca_reference", then greedy generation with a TCACache on that
backend against the same generation on the torch backend.
Shape letters: B batch, L tokens, D head dim.
"""

from __future__ import annotations

import pytest
import torch

import tca

transformers = pytest.importorskip("transformers")
from tca.backends import registry  # noqa: E402
from tca.models import TCACache, cache_kwargs, enable_tca  # noqa: E402
from tca.models.tiny_random import tiny_model  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CONFIG = tca.TCAConfig(block_size=16, window=64)
D = 64  # a head dim every GPU backend runs (FlashAttention's smallest common one)


def _model(seed: int):
    model = tiny_model("llama", seed=seed, dtype=torch.bfloat16, hidden_size=4 * D, head_dim=D)
    return model.cuda()


def _require(backend: str):
    reasons = registry.get(backend).reasons("cuda", torch.bfloat16, D)
    if reasons:
        pytest.skip(f"{backend} cannot run here: {'; '.join(reasons)}")


@pytest.mark.parametrize("backend", ["triton", "flash"])
def test_prompt_logits_match_the_reference_twin(backend):
    _require(backend)
    model = _model(seed=1)
    ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(0)).cuda()
    enable_tca(model, config=CONFIG, backend=backend)
    with torch.no_grad():
        mine = model(ids, use_cache=False).logits.float()
        model.set_attn_implementation("tca_reference")
        reference = model(ids, use_cache=False).logits.float()
    assert torch.isfinite(mine).all()
    torch.testing.assert_close(mine, reference, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", ["triton", "flash"])
def test_generation_with_the_compressed_cache_matches_the_torch_backend(backend):
    _require(backend)
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(1)).cuda()
    tokens = {}
    for name in (backend, "torch"):
        model = _model(seed=2)
        enable_tca(model, config=CONFIG, backend=name)
        cache = TCACache(model)
        with torch.no_grad():
            out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=24, do_sample=False)
        tokens[name] = out[0, ids.shape[1]:]
        assert cache.nbytes > 0
    # Greedy tokens of a random model can flip on a near-tie between bf16 kernels; most must agree.
    agree = (tokens[backend] == tokens["torch"]).float().mean().item()
    assert agree >= 0.75, (tokens[backend].tolist(), tokens["torch"].tolist())

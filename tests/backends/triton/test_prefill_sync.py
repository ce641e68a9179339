"""GPU: a prefill issues no host synchronisation (after the first call of a shape, which compiles kernels), so
a model's host runs ahead of its GPU across layers: the cache sizes come from the budgets on the host, the
budgets reach the device through pinned memory, and the padding mask is read once per forward call.

Marked `gpu` and `triton`; they skip without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

import tca

pytestmark = [pytest.mark.gpu, pytest.mark.triton]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

CONFIG = tca.TCAConfig(block_size=64, window=256)


def _no_sync(fn):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_prefill_never_synchronises():
    backend = "triton"  # the GPU prefill backend of "auto"; the torch backend still synchronises (not needed on a GPU)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, H, 1500, 64, device="cuda", generator=gen, dtype=torch.bfloat16) for H in (8, 2, 2))
    budgets = tca.default_budgets(CONFIG.block_size)
    want, first = tca.prefill(q, k, v, budgets=budgets, config=CONFIG, backend=backend)  # compiles, checks budgets
    out, cache = _no_sync(lambda: tca.prefill(q, k, v, budgets=budgets, config=CONFIG, backend=backend))
    torch.testing.assert_close(out, want)
    assert torch.equal(cache.lengths, first.lengths) and torch.equal(cache.global_len.cpu(), cache.global_len_host)


def test_model_prefill_never_synchronises():
    from tca.models import TCACache, cache_kwargs, enable_tca
    from tca.models.tiny_random import tiny_model

    model = enable_tca(tiny_model("llama", dtype=torch.bfloat16).cuda(), config=tca.TCAConfig(block_size=16, window=64),
                       backend="triton")
    ids = torch.randint(1, 128, (1, 700), device="cuda")
    with torch.no_grad():
        model(ids, use_cache=True, **cache_kwargs(model, TCACache(model)))  # compiles
        cache = TCACache(model)
        _no_sync(lambda: model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)))
    assert all(layer.state is not None for layer in cache.layers)

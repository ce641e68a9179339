"""GPU: decode with no host synchronisation, and the whole per-token step of a model captured in a CUDA graph.

Marked `gpu` (and `triton`: the decode kernels are Triton's); they skip without a CUDA device.
Shape letters: B batch, HQ query heads, HKV key/value heads, L keys, D head dim.
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


def _qkv(B, HQ, HKV, L, D, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(B, H, L, D, device="cuda", generator=gen, dtype=dtype) for H in (HQ, HKV, HKV))


def test_decode_steps_never_synchronise():
    """Steady-state decode on the Triton kernels: window moves, ring writes, segment growth, attention."""
    q, k, v = _qkv(2, 8, 2, 1000, 64)
    _, cache = tca.prefill(q, k, v, config=CONFIG, backend="triton")
    torch.cuda.synchronize()
    steps = [tuple(_qkv(2, 8, 2, 1, 64, seed=step)) for step in range(3 * CONFIG.block_size)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for q1, k1, v1 in steps:  # three blocks leave the window
            tca.decode(q1, k1, v1, cache)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cache.seq_len == 1000 + 3 * CONFIG.block_size
    assert torch.equal(cache.global_len.cpu(), cache.global_len_host)


# "auto" below the crossover: the dense path's cache (every token, SDPA); "triton": the compressed cache.
PATHS = ["auto", "triton"]


@pytest.mark.parametrize("backend", PATHS)
def test_model_decode_step_never_synchronises(backend):
    from tca.models import TCACache, cache_kwargs, enable_tca
    from tca.models.tiny_random import tiny_model

    model = enable_tca(tiny_model("llama", dtype=torch.bfloat16).cuda(), config=tca.TCAConfig(block_size=16, window=64),
                       backend=backend)
    cache = TCACache(model)
    ids = torch.randint(1, 128, (1, 300), device="cuda")
    with torch.no_grad():
        token = model(ids, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        position = torch.tensor([[300]], device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(40):
                logits = model(token, position_ids=position, use_cache=True, **cache_kwargs(model, cache)).logits
                token = logits[:, -1:].argmax(-1)
                position = position + 1
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("padded", [False, True])
def test_generate_with_graph_decoding_equals_eager_generate(padded, backend):
    from tca.models import TCACache, cache_kwargs, enable_tca
    from tca.models.graphs import graph_decoding
    from tca.models.tiny_random import tiny_model

    model = enable_tca(tiny_model("llama").cuda(), config=tca.TCAConfig(block_size=16, window=64), backend=backend)
    ids = torch.randint(1, 128, (2, 200), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :37] = 0
        ids[1, :37] = 0
    common = dict(attention_mask=mask, max_new_tokens=60, do_sample=False, pad_token_id=0)
    eager = model.generate(ids, **common, **cache_kwargs(model, TCACache(model)))
    graph = model.generate(ids, custom_generate=graph_decoding, **common, **cache_kwargs(model, TCACache(model)))
    assert torch.equal(graph, eager)


def test_graph_replays_equal_eager_steps_for_a_dense_static_cache():
    """The same StepGraph captures a dense model over transformers' StaticCache (the benchmark's dense baseline)."""
    import transformers

    from tca.models import cache_kwargs
    from tca.models.graphs import StepGraph
    from tca.models.tiny_random import tiny_model

    model = tiny_model("llama").cuda()
    ids = torch.randint(1, 128, (1, 100), device="cuda")
    with torch.no_grad():
        dynamic = transformers.DynamicCache(config=model.config)
        token = model(ids, use_cache=True, **cache_kwargs(model, dynamic)).logits[:, -1:].argmax(-1)
        static = transformers.StaticCache(config=model.config, max_cache_len=200)
        for index, layer in enumerate(dynamic.layers):
            static.update(layer.keys, layer.values, index, {"cache_position": torch.arange(100, device="cuda")})
        position = torch.tensor([[100]], device="cuda")
        eager_tokens, t, p = [], token, position
        for _ in range(20):
            t = model(t, position_ids=p, use_cache=True, **cache_kwargs(model, dynamic)).logits[:, -1:].argmax(-1)
            eager_tokens.append(t)
            p = p + 1
        graph = StepGraph(model, static, token, position, torch.tensor([100], device="cuda"))
        graph_tokens = [graph.capture().argmax(-1, keepdim=True)]
        for _ in range(19):
            graph_tokens.append(graph.step(graph_tokens[-1]).argmax(-1, keepdim=True))
    assert torch.equal(torch.cat(graph_tokens, 1), torch.cat(eager_tokens, 1))

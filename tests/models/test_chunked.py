"""A long prompt through a transformers model in chunks (TCACache.begin_chunked_prefill, tca.models.prefill_in_chunks;
docs/semantics.md section 5b) on tiny random Llama and Qwen2.

Exact chunks equal one forward call while every chunk but the last ends within the window; streaming keeps the
cache at the window plus the kept tokens; generate goes on after either; wrong chunks fail clearly and leave the
cache as it was. Shape letters: B batch, L tokens.
"""

from __future__ import annotations

import pytest
import torch

import tca
from tca.geometry import window_start

transformers = pytest.importorskip("transformers")
from tca.models import TCACache, cache_kwargs, enable_tca, prefill_in_chunks  # noqa: E402
from tca.models.tiny_random import tiny_model  # noqa: E402

CONFIG = tca.TCAConfig(block_size=16, window=48)
ARCHS = ("llama", "qwen2")


def _ids(L: int, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (B, L), generator=torch.Generator().manual_seed(seed))


def _model(arch: str, config=CONFIG):
    return enable_tca(tiny_model(arch, dtype=torch.float64), config=config, backend="torch")


def _positions(cache):
    return [[layer.state.positions_of(b, h).tolist() for b in range(layer.state.batch_size) for h in range(2)]
            for layer in cache.layers]


def _forward(model, ids, cache, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=True, **cache_kwargs(model, cache), **kwargs).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_chunks_ending_within_the_window_equal_one_forward_call(arch):
    model, ids = _model(arch), _ids(150)
    one_shot = TCACache(model)
    want = _forward(model, ids, one_shot)
    cache = TCACache(model)
    cache.begin_chunked_prefill("exact")
    for s, e in ((0, 20), (20, 48), (48, 150)):  # the first two end within the window (48)
        got = _forward(model, ids[:, s:e], cache)
    cache.end_chunked_prefill()
    torch.testing.assert_close(got, want[:, 48:], rtol=1e-10, atol=1e-10)  # every row of the last chunk
    assert _positions(cache) == _positions(one_shot) and cache.nbytes == one_shot.nbytes
    first = want[:, -1].argmax(-1, keepdim=True)
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    after_chunks = model.generate(torch.cat([ids, first], 1), **cache_kwargs(model, cache), **kwargs)
    after_one_shot = model.generate(torch.cat([ids, first], 1), **cache_kwargs(model, one_shot), **kwargs)
    assert torch.equal(after_chunks, after_one_shot)


def test_prefill_in_chunks_then_generate_equals_generate():
    config = tca.TCAConfig(block_size=16, window=96)
    model, ids = _model("llama", config), _ids(150, B=1)
    cache = TCACache(model)
    logits = prefill_in_chunks(model, ids, cache, chunk_size=80)  # [0, 80) ends within the window
    first = logits.argmax(-1, keepdim=True)
    chunked = model.generate(torch.cat([ids, first], 1), **cache_kwargs(model, cache), max_new_tokens=7, do_sample=False)
    plain = model.generate(ids, **cache_kwargs(model, TCACache(model)), max_new_tokens=8, do_sample=False)
    assert cache.seq_len == 157 and torch.equal(chunked, plain)


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_keeps_the_cache_at_window_plus_kept_tokens(arch):
    model, ids = _model(arch), _ids(320)
    cache = TCACache(model)
    cache.begin_chunked_prefill("streaming")
    element = 2 * 16 * 8  # key + value of one token: head dim 16, float64
    for e in range(32, 321, 32):
        _forward(model, ids[:, e - 32 : e], cache)
        window = e - window_start(e - 1, CONFIG.block_size, CONFIG.window)
        for layer in cache.layers:
            held = layer.chunked._state
            assert torch.equal(held.lengths, held.global_len_host + window)  # kept tokens + the window, no more
            assert held.window_slots <= CONFIG.window
            # Allocated: the ring (B * HKV * w), the kept tokens and the room a segment gets when it grows (a
            # quarter of what it holds then, rounded down per segment), plus the scratch row.
            kept = int(held.global_len_host.sum())
            assert held.nbytes <= element * (2 * 2 * CONFIG.window + kept + kept // 4 + 2 * 2 + 1)
        assert cache.nbytes == sum(layer.chunked.nbytes for layer in cache.layers)
    cache.end_chunked_prefill()
    assert cache.used_nbytes < cache.dense_nbytes() and cache.nbytes < cache.dense_nbytes()
    assert cache.used_nbytes == element * cache.kept_tokens()
    out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape == (2, 325)  # generate fed only the uncached token (the last) and decoded


def test_streaming_continues_a_filled_cache():
    model, ids = _model("llama"), _ids(200, B=1)
    cache = TCACache(model)
    _forward(model, ids[:, :100], cache)
    _forward(model, ids[:, 100:103], cache)  # three decode steps: the cache stands inside a block
    logits = prefill_in_chunks(model, ids[:, 103:], cache, chunk_size=32, mode="streaming")
    assert cache.seq_len == 200 and torch.isfinite(logits).all()
    assert [layer.state.seq_lens for layer in cache.layers] == [[200], [200]]
    assert _forward(model, logits.argmax(-1, keepdim=True), cache).shape == (1, 1, 128)


def test_wrong_chunks_fail_clearly_and_leave_the_cache_intact():
    model, ids = _model("llama"), _ids(96)
    cache = TCACache(model)
    cache.begin_chunked_prefill("streaming")
    _forward(model, ids[:, :32], cache)
    with pytest.raises(ValueError, match="starts at position 40 but 32 tokens were prefilled"):
        _forward(model, ids[:, 32:48], cache, position_ids=torch.arange(40, 56).expand(2, -1))
    assert cache.seq_len == 32
    with pytest.raises(ValueError, match="no padding"):
        mask = torch.ones(2, 48, dtype=torch.long)
        mask[0, 32] = 0
        _forward(model, ids[:, 32:48], cache, attention_mask=mask)
    assert cache.seq_len == 32
    _forward(model, ids[:, 32:40], cache)  # ends inside a block: only a last chunk may
    with pytest.raises(ValueError, match="ended inside a block"):
        _forward(model, ids[:, 40:48], cache)
    assert cache.seq_len == 40 and all(layer.chunked.seq_len == 40 for layer in cache.layers)
    with pytest.raises(ValueError, match="'streaming' chunked prefill is already open"):
        cache.begin_chunked_prefill("exact")
    cache.end_chunked_prefill()
    with pytest.raises(ValueError, match="no chunked prefill is open"):
        cache.end_chunked_prefill()
    with pytest.raises(ValueError, match="exact chunked prefill needs an empty cache"):
        cache.begin_chunked_prefill("exact")
    with pytest.raises(ValueError, match="mode must be one of"):
        cache.begin_chunked_prefill("stream")
    with pytest.raises(ValueError, match="multiples of the block size"):
        prefill_in_chunks(model, ids, TCACache(model), chunk_size=20, mode="streaming")
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        prefill_in_chunks(model, ids, TCACache(model), chunk_size=32.0)
    with pytest.raises(TypeError, match="must be a tca.models.TCACache"):
        prefill_in_chunks(model, ids, transformers.DynamicCache(), chunk_size=32)


def test_without_a_chunked_prefill_later_calls_still_decode_token_by_token():
    model, ids = _model("llama"), _ids(120, B=1)
    cache, stepped = TCACache(model), TCACache(model)
    _forward(model, ids[:, :100], cache)
    _forward(model, ids[:, :100], stepped)
    several = _forward(model, ids[:, 100:104], cache)
    one_by_one = torch.cat([_forward(model, ids[:, i : i + 1], stepped) for i in range(100, 104)], 1)
    torch.testing.assert_close(several, one_by_one, rtol=1e-10, atol=1e-10)
    assert cache.chunk_mode is None

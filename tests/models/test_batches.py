"""Batches through generate with a TCACache: left-padded prompts of different lengths and equal-length batches
give, per sequence, the tokens and logits of that prompt alone; the cache keeps each sequence's own length.
Plus the cache's clear errors (another model, bad arguments, beam search) and inference-mode switches."""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import left_padded

transformers = pytest.importorskip("transformers")
from tca.models import TCACache, cache_kwargs, enable_tca  # noqa: E402
from tca.models.tiny_random import tiny_model  # noqa: E402

CONFIG = tca.TCAConfig(block_size=16, window=48)
NEW = 40  # several blocks leave the window while decoding


def _ids(L: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 128, (1, L), generator=torch.Generator().manual_seed(seed))  # 0 is the pad token


def _generate(model, ids, mask=None):
    cache = TCACache(model)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=0, **cache_kwargs(model, cache),
    )
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1), cache


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_left_padded_batch_equals_each_prompt_alone(arch, backend):
    model = tiny_model(arch)
    enable_tca(model, config=CONFIG, backend=backend if backend != "reference" else "torch")
    prompts = [_ids(150, 1), _ids(97, 2), _ids(40, 3)]
    ids, mask = left_padded(prompts)
    tokens, logits, cache = _generate(model, ids, mask)
    for b, prompt in enumerate(prompts):
        alone_tokens, alone_logits, alone_cache = _generate(model, prompt)
        assert torch.equal(tokens[b], alone_tokens[0]), b
        torch.testing.assert_close(logits[b], alone_logits[0], atol=2e-4, rtol=2e-4)
        for layer, alone in zip(cache.layers, alone_cache.layers, strict=True):
            assert torch.equal(layer.lengths[b], alone.lengths[0])
            assert layer.state.seq_lens[b] == alone.state.seq_lens[0] == prompt.shape[1] + NEW - 1


def test_equal_length_batch_equals_each_prompt_alone():
    model = tiny_model("llama")
    enable_tca(model, config=CONFIG, backend="torch")
    prompts = [_ids(120, 4), _ids(120, 5)]
    tokens, logits, _ = _generate(model, torch.cat(prompts))
    for b, prompt in enumerate(prompts):
        alone_tokens, alone_logits, _ = _generate(model, prompt)
        assert torch.equal(tokens[b], alone_tokens[0])
        torch.testing.assert_close(logits[b], alone_logits[0], atol=2e-4, rtol=2e-4)


def test_right_padding_is_refused_with_a_hint():
    model = tiny_model("llama")
    enable_tca(model, config=CONFIG, backend="torch")
    ids = torch.cat([_ids(60, 6), _ids(60, 7)])
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0, **cache_kwargs(model, TCACache(model)))


def test_beam_search_is_refused_clearly():
    model = tiny_model("llama")
    enable_tca(model, config=CONFIG, backend="torch")
    with pytest.raises((NotImplementedError, ValueError), match="beam search|repeat"):
        model.generate(_ids(60, 8), num_beams=2, max_new_tokens=3, pad_token_id=0, **cache_kwargs(model, TCACache(model)))


def test_cache_made_for_another_model_is_refused():
    small = enable_tca(tiny_model("llama"), config=CONFIG, backend="torch")
    other = tiny_model("llama", num_key_value_heads=4)
    enable_tca(other, config=CONFIG, backend="torch")
    cache = TCACache(small)
    with pytest.raises(ValueError, match="made for a model with 2 KV heads"):
        other(_ids(30, 9), use_cache=True, **cache_kwargs(other, cache))
    deeper = tiny_model("llama", num_hidden_layers=3)
    enable_tca(deeper, config=CONFIG, backend="torch")
    with pytest.raises(ValueError, match="has 2 layers"):
        deeper(_ids(30, 9), use_cache=True, **cache_kwargs(deeper, TCACache(small)))


@pytest.mark.parametrize(
    "kwargs, error",
    [({"model": object()}, TypeError), ({"num_layers": 0}, ValueError), ({"num_layers": "2"}, ValueError),
     ({"num_layers": 2, "decode_backend": "nope"}, ValueError), ({"num_layers": 2, "decode_backend": 3}, TypeError)],
)
def test_nonsense_arguments_are_refused(kwargs, error):
    with pytest.raises(error):
        TCACache(**kwargs)


@pytest.mark.parametrize("prefill_mode, decode_mode", [(True, False), (False, True)])
def test_inference_mode_may_change_between_prefill_and_decode(prefill_mode, decode_mode):
    model = tiny_model("llama")
    enable_tca(model, config=CONFIG, backend="torch")
    ids = _ids(100, 10)
    expected, _ = _manual(model, ids, True, True)
    got, _ = _manual(model, ids, prefill_mode, decode_mode)
    assert torch.equal(got, expected)


def _manual(model, ids, prefill_inference: bool, decode_inference: bool):
    cache = TCACache(model)
    with torch.inference_mode(prefill_inference), torch.no_grad():
        logits = model(ids, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]
    tokens = []
    for _ in range(40):
        tokens.append(logits.argmax(-1, keepdim=True))
        with torch.inference_mode(decode_inference), torch.no_grad():
            logits = model(tokens[-1], use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]
    return torch.cat(tokens, 1), cache

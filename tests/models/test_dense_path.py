"""A model whose prompts are below the measured crossover (backend="auto"): TCA runs its dense path, and a
generation with a TCACache gives the dense model's tokens and logits from a dense cache of dense bytes, alone
and in left-padded batches; a padded batch straddling the crossover runs one path for every sequence."""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import force_crossover, left_padded
from tca.backends.common.dense_cache import DenseKVCache
from tca.backends.common.packed_cache import PackedKVCache

transformers = pytest.importorskip("transformers")
from tca.models import TCACache, cache_kwargs, disable_tca, enable_tca  # noqa: E402
from tca.models.tiny_random import tiny_model  # noqa: E402

CONFIG = tca.TCAConfig(block_size=16, window=32)
NEW = 24


def _ids(L: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 128, (1, L), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, cache, mask=None):
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=NEW, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0, **cache_kwargs(model, cache),
    )
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_below_the_crossover_generation_is_the_dense_models(monkeypatch, arch):
    force_crossover(monkeypatch, 1 << 20)
    model = tiny_model(arch)
    ids = _ids(150, 1)
    dense_tokens, dense_logits = _generate(model, ids, transformers.DynamicCache(config=model.config))
    enable_tca(model, config=CONFIG)  # backend="auto"
    cache = TCACache(model)
    tokens, logits = _generate(model, ids, cache)
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, atol=1e-4, rtol=1e-4)
    assert all(isinstance(layer.state, DenseKVCache) for layer in cache.layers)
    held = 150 + NEW - 1
    assert cache.used_nbytes == cache.dense_nbytes()
    spare = 2 * 2 * CONFIG.block_size * 16 * 4 * len(cache.layers)  # one block per KV head and layer at most
    assert cache.dense_nbytes() <= cache.nbytes <= cache.dense_nbytes() + spare
    assert cache.kept_fraction() == 1.0 and cache.seq_len == held
    disable_tca(model)


def test_below_the_crossover_a_padded_batch_is_each_prompt_alone(monkeypatch):
    force_crossover(monkeypatch, 1 << 20)
    model = enable_tca(tiny_model("llama"), config=CONFIG)
    prompts = [_ids(150, 2), _ids(61, 3), _ids(100, 4)]
    ids, mask = left_padded(prompts)
    cache = TCACache(model)
    tokens, logits = _generate(model, ids, cache, mask)
    assert all(isinstance(layer.state, DenseKVCache) for layer in cache.layers)
    for b, prompt in enumerate(prompts):
        alone_tokens, alone_logits = _generate(model, prompt, TCACache(model))
        assert torch.equal(tokens[b], alone_tokens[0]), b
        torch.testing.assert_close(logits[b], alone_logits[0], atol=2e-4, rtol=2e-4)


def test_a_padded_batch_across_the_crossover_runs_one_path(monkeypatch):
    """The padded length decides: a short prompt in a long batch runs TCA like the rest (one cache type)."""
    force_crossover(monkeypatch, 120)
    model = enable_tca(tiny_model("llama"), config=CONFIG)
    prompts = [_ids(150, 5), _ids(70, 6)]
    ids, mask = left_padded(prompts)
    cache = TCACache(model)
    tokens, logits = _generate(model, ids, cache, mask)
    assert all(isinstance(layer.state, PackedKVCache) for layer in cache.layers)
    named = enable_tca(tiny_model("llama"), config=CONFIG, backend="torch")  # what auto resolved to on the CPU
    for b, prompt in enumerate(prompts):
        alone_tokens, alone_logits = _generate(named, prompt, TCACache(named))
        assert torch.equal(tokens[b], alone_tokens[0]), b
        torch.testing.assert_close(logits[b], alone_logits[0], atol=2e-4, rtol=2e-4)

"""generate on a left-padded batch with the triton backend, whose prefill takes the whole batch in one call
(docs/semantics.md section 9.1): each sequence's tokens and logits equal those of its prompt alone."""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import left_padded, require_triton

pytestmark = pytest.mark.triton
DEVICE = require_triton()
transformers = pytest.importorskip("transformers")
from tca.models import TCACache, cache_kwargs, enable_tca  # noqa: E402
from tca.models.tiny_random import tiny_model  # noqa: E402

CONFIG = tca.TCAConfig(block_size=16, window=32)
NEW = 5  # decode steps after the joint prefill (decoding joined caches is tested on every backend elsewhere)


def _generate(model, ids, mask):
    cache = TCACache(model)
    out = model.generate(
        ids.to(DEVICE), attention_mask=mask.to(DEVICE), max_new_tokens=NEW, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=0, **cache_kwargs(model, cache),
    )
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1), cache


def test_left_padded_batch_on_triton_equals_each_prompt_alone():
    model = tiny_model("qwen2").to(DEVICE)
    enable_tca(model, config=CONFIG, backend="triton")
    prompts = [torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in (120, 70, 33)]
    ids, mask = left_padded(prompts)
    tokens, logits, cache = _generate(model, ids, mask)
    assert cache.layers[0].state.seq_lens == [n.shape[1] + NEW - 1 for n in prompts]
    for b, prompt in enumerate(prompts):
        alone_tokens, alone_logits, _ = _generate(model, prompt, torch.ones_like(prompt))
        assert torch.equal(tokens[b], alone_tokens[0]), b
        torch.testing.assert_close(logits[b], alone_logits[0], atol=2e-4, rtol=2e-4)

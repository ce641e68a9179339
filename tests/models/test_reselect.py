"""TCACache(model, policy=tca.Reselect(...)): decode with re-selection (semantics.md section 5c) in a model.

Checked against the "tca_reference" twin (the reference's re-selecting cache), against section 5 for every=0,
against the model's own dense generation with dense budgets, and for a left-padded batch against each prompt alone.
"""

from __future__ import annotations

import pytest
import torch

import tca

transformers = pytest.importorskip("transformers")
from tca.models import TCACache, cache_kwargs, dense_plan, enable_tca, model_shape  # noqa: E402
from tca.models.budget_plans import uniform_plan  # noqa: E402
from tca.models.tiny_random import tiny_model  # noqa: E402

CONFIG = tca.TCAConfig(block_size=16, window=48)
NEW = 40  # several blocks leave the window while decoding


def _ids(L: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 128, (1, L), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, policy, mask=None):
    cache = TCACache(model, policy=policy)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=NEW, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0, **cache_kwargs(model, cache),
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1), cache


def _sparse(model, backend="torch"):
    fixed = tca.log_gaussian_budgets(1.0, 1.0, CONFIG.block_size)  # about 2.7 of 16 tokens per budgeted block
    return enable_tca(model, uniform_plan(model_shape(model), CONFIG, fixed, "fixed"), backend=backend)


@pytest.mark.parametrize("every", [1, 8])
def test_torch_cache_equals_reference_twin(every):
    ids = _ids(150, 1)
    policy = tca.Reselect(every=every)
    tokens, logits, cache = _generate(_sparse(tiny_model("llama", seed=2)), ids, policy)
    twin_tokens, twin_logits, twin = _generate(_sparse(tiny_model("llama", seed=2), "reference"), ids, policy)
    assert torch.equal(tokens, twin_tokens)
    torch.testing.assert_close(logits, twin_logits, atol=2e-4, rtol=2e-4)
    for layer, ref in zip(cache.layers, twin.layers, strict=True):
        assert torch.equal(layer.lengths, ref.lengths)
        assert torch.equal(layer.state.evicted_lengths, ref.state.evicted_lengths)
    # Nothing is dropped: the active set (what attention reads) plus the store is every token seen.
    seen = ids.shape[1] + NEW - 1
    for layer in cache.layers:
        assert int(layer.lengths.sum() + layer.state.evicted_lengths.sum()) == seen * layer.lengths.shape[1]
    assert cache.offloaded_nbytes == 0 and cache.device_nbytes == cache.nbytes


def test_every_zero_is_the_paper_rule_and_reselection_reads_as_many_tokens():
    ids = _ids(150, 3)
    model = _sparse(tiny_model("qwen2", seed=1))
    plain_tokens, plain_logits, plain = _generate(model, ids, None)
    zero_tokens, zero_logits, zero = _generate(model, ids, tca.Reselect(every=0))
    assert torch.equal(zero_tokens, plain_tokens) and torch.equal(zero_logits, plain_logits)
    _, _, every1 = _generate(model, ids, tca.Reselect(every=1, offload=True))
    assert every1.kept_tokens() == plain.kept_tokens()  # the same tokens read per step
    assert every1.device_nbytes == plain.nbytes and every1.offloaded_nbytes > 0  # the store went to host memory


def test_dense_budgets_give_the_models_own_generation():
    ids = _ids(150, 4)
    model = tiny_model("llama", seed=3)
    dense = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    enable_tca(model, dense_plan(model_shape(model), CONFIG), backend="torch")
    tokens, _, cache = _generate(model, ids, tca.Reselect(every=1))
    assert torch.equal(tokens, dense[:, ids.shape[1] :])
    assert all(int(layer.state.evicted_lengths.sum()) == 0 for layer in cache.layers)


def test_left_padded_batch_equals_each_prompt_alone():
    model = _sparse(tiny_model("llama", seed=4))
    policy = tca.Reselect(every=4)
    prompts = [_ids(150, 5), _ids(97, 6)]
    L = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, L - p.shape[1] :], mask[b, L - p.shape[1] :] = p[0], 1
    tokens, logits, _ = _generate(model, ids, policy, mask)
    for b, prompt in enumerate(prompts):
        alone_tokens, alone_logits, _ = _generate(model, prompt, policy)
        assert torch.equal(tokens[b], alone_tokens[0])
        torch.testing.assert_close(logits[b], alone_logits[0], atol=2e-4, rtol=2e-4)


def test_a_policy_that_is_not_one_is_refused():
    with pytest.raises(TypeError, match="policy must be None"):
        TCACache(tiny_model("llama"), policy=16)


def test_graph_decoding_refuses_a_reselecting_cache_before_the_prefill():
    """The check runs before the CUDA device check, so it is reached on the CPU; the prefill never runs."""
    from tca.models.graphs import graph_decoding, prepare_static

    model = _sparse(tiny_model("llama", seed=2))
    ids = _ids(40, 5)
    cache = TCACache(model, policy=tca.Reselect(every=4))
    with torch.no_grad(), pytest.raises(ValueError, match=r"re-selecting cache.*TCACache\(model\) \(the default"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0,
                       custom_generate=graph_decoding, **cache_kwargs(model, cache))
    assert all(layer.state is None for layer in cache.layers)
    # A cache already filled with re-selecting states is refused before any layer changes.
    filled = TCACache(model, policy=tca.Reselect(every=4))
    with torch.no_grad():
        model(_ids(60, 5), **cache_kwargs(model, filled))
    states = [layer.state for layer in filled.layers]
    with pytest.raises(ValueError, match="layer 0 holds a ReselectingCache"):
        prepare_static(filled, 8)
    assert [layer.state for layer in filled.layers] == states
    # every=0 is the paper's rule: the packed cache, which graph decoding takes
    graphs_ok = TCACache(model, policy=tca.Reselect(every=0))
    with torch.no_grad(), pytest.raises(ValueError, match="CUDA device"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0,
                       custom_generate=graph_decoding, **cache_kwargs(model, graphs_ok))

"""The token loop of graph_decoding (tca.models.token_loop), with an eager step on the CPU: the same sequences as
transformers' own `generate` when sequences stop early, late, at once or never, greedy and sampled; streamed
tokens; one host read per CHECK_EVERY tokens.

The CUDA-graph step itself is tested on a GPU (tests/models/test_decode_gpu.py).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tca.models import TCACache, cache_kwargs, enable_tca, graph_decoding  # noqa: E402
from tca.models.cache_argument import cache_argument  # noqa: E402
from tca.models.tiny_random import tiny_model  # noqa: E402
from tca.models.token_loop import CHECK_EVERY, token_loop  # noqa: E402

PROMPT = 12
MAX_NEW = 2 * CHECK_EVERY + 5  # more than two checks, and not a multiple of them


def eager_loop(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
               streamer=None, **model_kwargs):
    """A custom_generate with graph_decoding's loop around an eager single-token step (a DynamicCache)."""
    cache = transformers.DynamicCache()
    max_new = generation_config.max_new_tokens

    def next_logits(step, token):
        return model(input_ids=token, use_cache=True, **{cache_argument(model): cache}).logits[:, -1].float()

    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=True, **{cache_argument(model): cache}).logits[:, -1].float()
        return token_loop(logits, next_logits, input_ids, max_new, logits_processor, stopping_criteria,
                          generation_config)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def prompts():
    return torch.randint(0, 128, (2, PROMPT), generator=torch.Generator().manual_seed(0))


def generate_both(model, ids, **kwargs):
    kwargs = {"max_new_tokens": MAX_NEW, "do_sample": False, "pad_token_id": 0, **kwargs}
    expected = model.generate(ids, **kwargs)
    got = model.generate(ids, custom_generate=eager_loop, **kwargs)
    return expected, got


def test_runs_to_the_end_like_generate(model, prompts):
    expected, got = generate_both(model, prompts)
    assert expected.shape[1] == PROMPT + MAX_NEW
    assert torch.equal(got, expected)


@pytest.mark.parametrize("stops", [(3, None), (3, 5), (0, 0), (CHECK_EVERY - 1, CHECK_EVERY + 2)])
def test_stops_and_trims_like_generate(model, prompts, stops):
    """End tokens chosen so that each sequence stops at a given step (None: never): pads after a sequence
    stops, and a result cut at the step where the last one stopped, also between two host checks."""
    free = model.generate(prompts, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)[:, PROMPT:]
    eos = [int(free[row, step]) for row, step in enumerate(stops) if step is not None]
    expected, got = generate_both(model, prompts, eos_token_id=eos)
    assert torch.equal(got, expected)
    if None not in stops:
        assert expected.shape[1] <= PROMPT + max(stops) + 1 < PROMPT + MAX_NEW


def test_sampling_draws_like_generate(model, prompts):
    kwargs = {"do_sample": True, "top_k": 20, "temperature": 0.8}
    torch.manual_seed(3)
    expected = model.generate(prompts, max_new_tokens=MAX_NEW, pad_token_id=0, **kwargs)
    torch.manual_seed(3)
    got = model.generate(prompts, max_new_tokens=MAX_NEW, pad_token_id=0, custom_generate=eager_loop, **kwargs)
    assert torch.equal(got, expected)


def test_streamer_gets_every_token_and_ends(model, prompts):
    """The loop itself (transformers drops `streamer` for a callable custom_generate): one put per token."""
    class Collect:
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.append(value)

    streamer = Collect()
    one = prompts[:1]
    expected = model.generate(one, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
    cache = transformers.DynamicCache()
    config = transformers.GenerationConfig(do_sample=False, pad_token_id=0)
    config._pad_token_tensor = torch.tensor(0)

    def next_logits(step, token):
        return model(input_ids=token, use_cache=True, **{cache_argument(model): cache}).logits[:, -1].float()

    with torch.no_grad():
        logits = model(input_ids=one, use_cache=True, **{cache_argument(model): cache}).logits[:, -1].float()
        got = token_loop(logits, next_logits, one, MAX_NEW, lambda ids, scores: scores, never_stop, config, streamer)
    assert torch.equal(got, expected)
    assert torch.equal(torch.cat(streamer.tokens, dim=-1)[0], got[0, PROMPT:])


def never_stop(ids, scores):
    return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)


def test_checks_the_host_only_every_few_tokens(model, prompts, monkeypatch):
    """Reading the stop flag is the loop's only wait for the device: count the reads of a bool tensor."""
    reads = []
    original = torch.Tensor.__bool__

    def counting(self):
        reads.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting)
    logits = torch.randn(2, 50)
    config = transformers.GenerationConfig(do_sample=False, pad_token_id=0)
    config._pad_token_tensor = torch.tensor(0)
    out = token_loop(logits, lambda step, token: logits, prompts, MAX_NEW, lambda ids, s: s, never_stop,
                                 config)
    assert out.shape == (2, PROMPT + MAX_NEW)
    assert len(reads) == MAX_NEW // CHECK_EVERY


def test_graph_decoding_refuses_a_used_cache(model, prompts):
    tca_model = tiny_model("llama")
    enable_tca(tca_model)
    cache = TCACache(tca_model)
    tca_model.generate(prompts, max_new_tokens=2, do_sample=False, pad_token_id=0, **cache_kwargs(tca_model, cache))
    with pytest.raises(ValueError, match="empty cache"):
        tca_model.generate(prompts, max_new_tokens=2, do_sample=False, pad_token_id=0, custom_generate=graph_decoding,
                           **cache_kwargs(tca_model, cache))

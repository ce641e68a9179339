"""TCAPress on the tiny model: after the prefill the cache holds what tca.prefill's cache holds, per layer and
KV head, and the next token attends over exactly that (docs/kvpress.md)."""

from __future__ import annotations

import contextlib
import warnings

import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402

from tca.eval import presses as _presses  # noqa: E402

try:
    _presses.import_kvpress()  # kvpress, with its unused imports stood in for
except ImportError as error:
    pytest.skip(f"kvpress is not installed: {error}", allow_module_level=True)

import tca  # noqa: E402
from tca.eval.presses import held_positions  # noqa: E402
from tca.eval.tca_press import TCAPress  # noqa: E402
from tca.eval.tiny import tiny_llama  # noqa: E402

CONFIG = tca.TCAConfig(block_size=16, window=64)
L = 200  # J = 9 budgeted blocks, window [144, 200); not a multiple of b: the next token moves no window
# Two KV heads with different budgets keep different counts: the press must mask the shorter head's spare slots.
PER_HEAD = torch.stack([tca.default_budgets(16), tca.log_gaussian_budgets(3.0, 1.0, 16)])
ORACLE = "tca_press_oracle"


class Oracle:
    """An attention implementation for the tests: the prefill runs dense SDPA (as under a press), records each
    layer's q, k, v and builds tca.prefill's compressed cache from them; a one-token step runs tca.decode on
    that cache. So its next-token logits are those of a dense prefill followed by TCA's cache (section 5)."""

    def __init__(self, budgets):
        self.budgets, self.inputs, self.caches = budgets, {}, {}

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = module.layer_idx
        if query.shape[2] == key.shape[2]:
            self.inputs[layer] = (query, key, value)
            _, self.caches[layer] = tca.prefill(query, key, value, budgets=self.budgets, config=CONFIG, scale=scaling,
                                                backend="torch")
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          **kwargs)
        out = tca.decode(query, key[:, :, -1:], value[:, :, -1:], self.caches[layer], backend="torch")
        return out.transpose(1, 2).contiguous(), None


def _oracle_model(budgets):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    oracle = Oracle(budgets)
    AttentionInterface.register(ORACLE, oracle)
    AttentionMaskInterface.register(ORACLE, sdpa_mask)
    model, _ = tiny_llama()
    model.set_attn_implementation(ORACLE)
    return model, oracle


def _ids(seed: int = 0, length: int = L):
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _prefill_then_step(model, ids, press=None):
    """(cache, logits of the token after the prompt, logits of the step that feeds token 7 at position L)."""
    from transformers import DynamicCache

    from tca.models import cache_kwargs

    cache = DynamicCache()
    kwargs = cache_kwargs(model, cache)
    with press(model) if press is not None else contextlib.nullcontext():
        first = model(input_ids=ids, use_cache=True, **kwargs).logits[:, -1]
    position = torch.tensor([[ids.shape[1]]])
    step = model(input_ids=torch.tensor([[7]]), position_ids=position, use_cache=True, **kwargs).logits[:, -1]
    return cache, first, step


def _kept_positions(cache_layer, dense_keys, masked, h: int) -> list[int]:
    """The dense positions of head h's attended prompt keys: every slot but the masked ones and the step's key
    (the last slot) must equal one dense key."""
    slots = [s for s in range(cache_layer.keys.shape[2] - 1) if (0, h, s) not in masked]
    kept = cache_layer.keys[0, h, slots]
    match = (kept[:, None] == dense_keys[0, h][None]).all(-1)  # [kept, L]
    assert (match.sum(-1) == 1).all()
    return sorted(match.float().argmax(-1).tolist())


def _masked(model, layer: int) -> set[tuple[int, int, int]]:
    indices = getattr(model.model.layers[layer].self_attn, "masked_key_indices", None)
    return set() if indices is None else set(zip(*(i.tolist() for i in indices), strict=True))


def test_dense_budgets_keep_everything_and_generate_as_the_model_alone():
    from transformers import DynamicCache

    from tca.eval.ruler_harness import greedy

    model, _ = tiny_llama()
    ids = _ids(1)[0].tolist()
    plain = greedy(model, ids, DynamicCache(), 8, set())
    press = TCAPress(budgets="dense", block_size=16, window=64)
    cache = DynamicCache()
    pressed = greedy(model, ids, cache, 8, set(), press)
    assert pressed == plain
    assert press.kept_fraction() == 1.0
    assert all(layer.keys.shape[2] == L + 7 for layer in cache.layers)  # the prompt and 7 fed tokens
    assert held_positions(model, cache) == 2 * 2 * (L + 7)


@pytest.mark.parametrize("budgets", [None, PER_HEAD], ids=["default", "per-head"])
def test_kept_positions_are_those_of_tca_prefill_cache(budgets):
    model, _ = tiny_llama()
    ids = _ids(2)
    press = TCAPress(budgets=budgets, config=CONFIG)
    cache, _, _ = _prefill_then_step(model, ids, press)
    oracle_model, oracle = _oracle_model(budgets)
    _prefill_then_step(oracle_model, ids)
    counts = set()
    for layer, cache_layer in enumerate(cache.layers):
        masked = _masked(model, layer)
        dense_keys = oracle.inputs[layer][1]
        for h in range(2):
            expected = [p for p in oracle.caches[layer].positions_of(0, h).tolist() if p < L]  # the prompt's
            assert _kept_positions(cache_layer, dense_keys, masked, h) == expected, (layer, h)
            assert int(press.kept_counts[layer][0, h]) == len(expected)
            counts.add(len(expected))
    assert min(counts) < L  # really compressed
    if budgets is not None:
        assert len(counts) > 1  # heads kept different counts: the masking was exercised
    kept = sum(int(c.sum()) for c in press.kept_counts.values())
    assert press.kept_fraction() == pytest.approx(kept / (2 * 2 * L))


@pytest.mark.parametrize("budgets", [None, PER_HEAD], ids=["default", "per-head"])
def test_the_next_token_attends_over_exactly_tca_cache(budgets):
    model, _ = tiny_llama()
    ids = _ids(3)
    _, first, step = _prefill_then_step(model, ids, TCAPress(budgets=budgets, config=CONFIG))
    oracle_model, _ = _oracle_model(budgets)
    _, oracle_first, oracle_step = _prefill_then_step(oracle_model, ids)
    dense_model, _ = tiny_llama()
    _, dense_first, dense_step = _prefill_then_step(dense_model, ids)
    torch.testing.assert_close(first, dense_first)  # the prefill itself is the model's own dense attention
    torch.testing.assert_close(oracle_first, dense_first)
    torch.testing.assert_close(step, oracle_step, atol=1e-5, rtol=1e-5)
    assert (step - dense_step).abs().max() > 1e-3  # the comparison can tell a compressed cache from a dense one


def test_a_prompt_within_the_window_is_not_compressed():
    model, _ = tiny_llama()
    press = TCAPress(config=CONFIG)
    cache, _, _ = _prefill_then_step(model, _ids(4, length=60), press)
    assert press.kept_fraction() == 1.0
    assert all(layer.keys.shape[2] == 61 for layer in cache.layers)


def test_a_plan_gives_each_layer_its_budgets(tmp_path):
    from tca.models.budget_plans import default_plan
    from tca.models.shape import model_shape

    model, _ = tiny_llama()
    plan = default_plan(model_shape(model), CONFIG)
    plan.layers[1] = [plan.layers[1][0].__class__(tca.dense_budgets(16).tolist(), 1.0, 16.0, None)] * 2
    path = tmp_path / "plan.json"
    plan.save(path)
    press = TCAPress(budgets=str(path))
    assert press.settings.config == CONFIG  # the plan's block size and window
    _prefill_then_step(model, _ids(5), press)
    assert press.kept_counts[1].tolist() == [[L, L]]  # the dense layer keeps everything
    assert press.kept_counts[0].max() < L


def test_bad_options_say_what_is_expected(tmp_path):
    with pytest.raises(ValueError, match="budget plan file not found"):
        TCAPress(budgets="nowhere.json")
    with pytest.raises(TypeError, match="budgets must be None, 'default' or 'dense'"):
        TCAPress(budgets=0.5)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        TCAPress(block_size=24)
    with pytest.raises(ValueError, match="window must be a positive multiple of block_size"):
        TCAPress(block_size=16, window=40)
    with pytest.raises(ValueError, match=r"budgets must be \[K\] or \[KV heads, K\] with K = 5"):
        TCAPress(budgets=tca.default_budgets(128), block_size=16)
    with pytest.raises(TypeError, match="config must be a tca.TCAConfig"):
        TCAPress(config={"block_size": 16})
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        TCAPress(backend="fast")
    from tca.models.budget_plans import default_plan
    from tca.models.shape import model_shape

    model, _ = tiny_llama()
    plan = default_plan(model_shape(model), CONFIG)
    with pytest.raises(ValueError, match="calibrated with block_size 16, not 32"):
        TCAPress(budgets=plan, block_size=32)
    with pytest.raises(ValueError, match="no prefill has run"):
        TCAPress().kept_fraction()


def test_models_the_press_cannot_compress_are_refused():
    from tca.models import enable_tca
    from tca.models.budget_plans import default_plan
    from tca.models.shape import model_shape
    from tca.models.tiny_random import tiny_model

    eager = tiny_model("llama", attn_implementation="eager")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"), TCAPress()(eager):
        pass
    model, _ = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enable_tca(model, config=CONFIG)
    with pytest.raises(ValueError, match="disable_tca"), TCAPress()(model):
        pass
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match=r"budgets must have shape \[5\] or \[2, 5\]"), TCAPress(
        budgets=torch.full((3, 5), 0.2), config=CONFIG
    )(model):
        pass
    three_layers = default_plan(model_shape(tiny_model("llama", num_hidden_layers=3)), CONFIG)
    with pytest.raises(ValueError, match="budget plan has 3 layers but the model has 2"), TCAPress(budgets=three_layers)(
        model
    ):
        pass
    hybrid = tiny_model("gemma3")
    with pytest.raises(ValueError, match="use a sliding window"), TCAPress()(hybrid):
        pass

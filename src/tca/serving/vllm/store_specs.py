"""vLLM KV-cache specs for a TCA layer that holds less (docs/design_vllm_memory.md section 2): the layer's own window
pages, and a compressed store whose page has the window page's bytes but stands for B_s tokens.

Built here, checked against vLLM's grouping on the versions that size a page by `tokens_per_state` (0.30 and
later, the CPU lane's 0.32); not yet declared by the plugin's layers (the engine still holds every token).
Shape letters: P tokens per window page, B_s tokens per store page (store_layout.StoreLayout), w TCA window.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from fractions import Fraction

from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, SlidingWindowSpec

from .store_layout import StoreLayout


def supports_store_specs() -> bool:
    """Whether this vLLM sizes a page by the tokens one stored state stands for (AttentionSpec.tokens_per_state)."""
    return any(field.name == "tokens_per_state" for field in fields(AttentionSpec))


def window_spec(layer_spec: AttentionSpec, window: int) -> SlidingWindowSpec:
    """The layer's pages as a sliding window of w + 1 tokens: a decode step at position i still compresses the
    block leaving the window at i - 1, so vLLM may free a page only once it lies wholly below that."""
    return SlidingWindowSpec(block_size=layer_spec.block_size, num_kv_heads=layer_spec.num_kv_heads,
                             head_size=layer_spec.head_size, dtype=layer_spec.dtype, sliding_window=window + 1)


@dataclass(frozen=True, kw_only=True)
class TCAStoreSpec(FullAttentionSpec):
    """A request's kept tokens: one page per B_s sequence tokens (never freed while the request lives), each page
    the bytes of one window page (P token rows of every KV head), so both groups share vLLM's one page size."""

    @property
    def prefix_cacheable(self) -> bool:
        return False  # a store page depends on later queries and on where chunks ended, not on its own tokens

    @classmethod
    def merge(cls, specs: list[TCAStoreSpec]) -> TCAStoreSpec:
        # FullAttentionSpec.merge builds its own class and would drop this one's
        if any(spec != specs[0] for spec in specs[1:]):
            raise ValueError("every TCA store spec of one KV cache group must be the same")
        return specs[0]


def store_spec(window: SlidingWindowSpec, layout: StoreLayout) -> TCAStoreSpec:
    """The store of a layer whose window pages are `window`: B_s tokens per page in P states of one head each."""
    if not supports_store_specs():
        raise RuntimeError("this vLLM has no AttentionSpec.tokens_per_state (0.30 or later has it)")
    if layout.page_tokens != window.block_size or layout.num_kv_heads != window.num_kv_heads:
        raise ValueError(
            f"the store layout was sized for {layout.page_tokens}-token pages of {layout.num_kv_heads} KV heads, but "
            f"the layer's pages hold {window.block_size} tokens of {window.num_kv_heads}; size it from this layer"
        )
    spec = TCAStoreSpec(block_size=layout.tokens_per_page, num_kv_heads=window.num_kv_heads,
                        head_size=window.head_size, dtype=window.dtype,
                        tokens_per_state=Fraction(layout.tokens_per_page, layout.page_tokens))
    assert spec.page_size_bytes == window.page_size_bytes, (spec.page_size_bytes, window.page_size_bytes)
    return spec


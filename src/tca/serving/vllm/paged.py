"""Reading one sequence's keys and values out of vLLM's paged KV cache (pure PyTorch, no vLLM import).

vLLM stores the cache of one layer in fixed-size *pages* (vLLM calls them blocks; here "block" keeps TCA's
meaning, docs/semantics.md section 2). The pages of one sequence are listed, in order, by its block-table row.
Only the positions asked for are read: a decode step touches the kept tokens, never the whole sequence.

Shape letters: NP pages in the pool, HKV key/value heads, P page size (tokens), D head dim, N positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def split_pages(kv_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value views of one layer's cache [NP, HKV, P, 2 * D]: ([NP, HKV, P, D], [NP, HKV, P, D]).

    Within a page and head, the first P * D numbers hold the keys of the P tokens and the next P * D their
    values (the plugin's own layout where it cannot read vLLM's CPU pages, `split_cpu_pages`; on CUDA the
    plugin keeps FlashAttention's layout instead: `split_channels`).
    """
    pages, heads, page_size, channels = kv_cache.shape
    if channels != 2 * head_dim:
        raise ValueError(f"expected a KV cache [pages, heads, page size, 2 * {head_dim}], got {tuple(kv_cache.shape)}")
    both = kv_cache.view(pages, heads, 2, page_size, head_dim)
    return both[:, :, 0], both[:, :, 1]


def split_cpu_pages(kv_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value views of one layer's cache [NP, HKV, P, 2 * D] as vLLM's CPU kernels write it for the
    `vec` and `vec16` instruction sets: within a page and head, the P keys channel-major ([D, P], so a key's D
    numbers are P apart), then the P values ([P, D]). Returns ([NP, HKV, P, D], [NP, HKV, P, D]) strided views."""
    pages, heads, page_size, channels = kv_cache.shape
    if channels != 2 * head_dim:
        raise ValueError(f"expected a KV cache [pages, heads, page size, 2 * {head_dim}], got {tuple(kv_cache.shape)}")
    both = kv_cache.view(pages, heads, 2, page_size * head_dim)
    keys = both[:, :, 0].view(pages, heads, head_dim, page_size).transpose(-1, -2)
    return keys, both[:, :, 1].view(pages, heads, page_size, head_dim)


def split_channels(kv_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value views of one layer's cache [NP, HKV, P, 2 * D] whose last dim holds a token's key, then
    its value (vLLM's FlashAttention layout, any stride order): ([NP, HKV, P, D], [NP, HKV, P, D])."""
    if kv_cache.shape[-1] != 2 * head_dim:
        raise ValueError(f"expected a KV cache [pages, heads, page size, 2 * {head_dim}], got {tuple(kv_cache.shape)}")
    return kv_cache[..., :head_dim], kv_cache[..., head_dim:]


@dataclass(frozen=True)
class PagedSequence:
    """One sequence's view of a layer's paged cache.

    key_pages, value_pages: [NP, HKV, P, D] (the views of `split_pages`); pages: [n] int, the sequence's
    block-table row (page j holds positions j*P .. j*P + P - 1).
    """

    key_pages: torch.Tensor
    value_pages: torch.Tensor
    pages: torch.Tensor

    @property
    def page_size(self) -> int:
        return self.key_pages.shape[2]

    def _locate(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = positions.to(self.pages.device, torch.long)
        return self.pages[positions // self.page_size].long(), positions % self.page_size

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the same positions [N] for every head: ([HKV, N, D], [HKV, N, D])."""
        page, offset = self._locate(positions)
        return self.key_pages[page, :, offset].transpose(0, 1), self.value_pages[page, :, offset].transpose(0, 1)

    def gather_per_head(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of per-head positions [HKV, N] (all valid): ([HKV, N, D], [HKV, N, D])."""
        page, offset = self._locate(positions)
        head = torch.arange(positions.shape[0], device=page.device)[:, None]
        return self.key_pages[page, head, offset], self.value_pages[page, head, offset]

    def prefix(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions 0 .. length-1: ([HKV, length, D], [HKV, length, D])."""
        return self.gather(torch.arange(length, device=self.pages.device))


def write_tokens(key_pages, value_pages, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """Store new tokens: key, value [T, HKV, D] at flat slots [T] (slot s = page s // P, offset s % P).

    Negative slots (vLLM's padding) are skipped.
    """
    keep = slots >= 0
    if not bool(keep.all()):
        key, value, slots = key[keep], value[keep], slots[keep]
    page_size = key_pages.shape[2]
    page, offset = slots.long() // page_size, slots.long() % page_size
    key_pages[page, :, offset] = key.to(key_pages.dtype)
    value_pages[page, :, offset] = value.to(value_pages.dtype)

"""Decode policies: what happens to the tokens the compressed cache evicts (docs/semantics.md section 5c).

`policy=None` (the default everywhere) is section 5, the paper's rule: evicted tokens are dropped for good.
`Reselect(every=N)` keeps them in an evicted store and re-selects the active global tokens with the current
query every N decode steps; `every=0` is section 5 again. `Reselect(every=N, blocks=M)` lets only the evicted
tokens of the M blocks whose key summaries bound the current query's logits highest compete.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reselect:
    """Decode with re-selection (section 5c).

    every: re-select at decode steps 0, N, 2N, ... (counted from the first step after the prefill); 0 never
        re-selects (section 5, and no evicted store is kept).
    offload: keep the evicted store in host memory (pinned when the cache is on a GPU) instead of on the
        cache's device; the active set always stays on the device.
    blocks: None (every evicted token is a candidate), or M >= 1: only the evicted tokens of the M budgeted blocks
        whose key summaries (per-channel min and max of the block's keys) bound the current query's logits
        highest are candidates, beside the active global tokens.
    """

    every: int = 16
    offload: bool = False
    blocks: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int):
            raise TypeError(f"every must be an int (decode steps between re-selections), got {type(self.every).__name__}")
        if self.every < 0:
            raise ValueError(f"every must be >= 0 (0: never re-select, the paper's rule), got {self.every}")
        if not isinstance(self.offload, bool):
            raise TypeError(f"offload must be a bool, got {type(self.offload).__name__}")
        if self.blocks is not None:
            if isinstance(self.blocks, bool) or not isinstance(self.blocks, int):
                raise TypeError(f"blocks must be None or an int (candidate blocks per re-selection), got "
                                f"{type(self.blocks).__name__}")
            if self.blocks < 1:
                raise ValueError(f"blocks must be >= 1 (or None: every evicted block), got {self.blocks}")

    @property
    def active(self) -> bool:
        """True when decoding keeps an evicted store (every >= 1)."""
        return self.every > 0


def check_policy(policy) -> Reselect | None:
    """None or a Reselect, else a TypeError saying what is accepted."""
    if policy is None or isinstance(policy, Reselect):
        return policy
    raise TypeError(f"policy must be None (the paper's rule) or tca.Reselect(every=N), got {type(policy).__name__}")

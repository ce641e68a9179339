"""Left-padded batches (docs/semantics.md section 9.1): sequence b of a batch padded to L tokens is its own prompt of
L - starts[b] tokens, the last ones of its row; the starts[b] tokens before it are padding and take no part.

The starts are host integers (read once from a padding mask); the kernels take them as a device tensor, copied
once per padding and device without blocking the host.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch

from .devices import to_device
from .geometry import num_budgeted_blocks


@dataclass(frozen=True)
class LeftPadding:
    """starts[b]: padding tokens before sequence b; length: the padded length L (every start is below it)."""

    starts: tuple[int, ...]
    length: int
    _on_device: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, starts, batch_size: int, length: int) -> LeftPadding | None:
        """Checked padding for a batch of batch_size sequences padded to length tokens; None when nothing is
        padded. starts: a sequence of ints or a 1D integer tensor."""
        if isinstance(starts, torch.Tensor):
            if starts.dim() != 1 or starts.dtype.is_floating_point or starts.dtype == torch.bool:
                raise ValueError(f"starts must be a 1D integer tensor [B], got {starts.dtype} of shape {tuple(starts.shape)}")
            starts = starts.tolist()
        starts = tuple(starts)
        if len(starts) != batch_size or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in starts):
            raise ValueError(f"starts must hold one int per sequence ({batch_size}), got {starts!r}")
        bad = [s for s in starts if not 0 <= s < length]
        if bad:
            raise ValueError(
                f"starts must lie in [0, {length}) (the padding before each sequence, which keeps at least one token), "
                f"got {bad}"
            )
        starts = tuple(int(s) for s in starts)  # NumPy integers become ints
        return cls(starts, length) if any(starts) else None

    @property
    def lengths(self) -> list[int]:
        """Each sequence's own number of tokens."""
        return [self.length - s for s in self.starts]

    def starts_on(self, device) -> torch.Tensor:
        """[B] int32 starts on device (copied once)."""
        return self._cached(("starts", str(device)), lambda: to_device(torch.tensor(self.starts, dtype=torch.int32), device))

    def blocks_on(self, device, config) -> torch.Tensor:
        """[B] int32 budgeted blocks J_b of each sequence on device (copied once per block size and window)."""
        b, w = config.block_size, config.window

        def make():
            return to_device(torch.tensor([num_budgeted_blocks(n, b, w) for n in self.lengths], dtype=torch.int32), device)

        return self._cached(("blocks", str(device), b, w), make)

    def _cached(self, key, make):
        if key not in self._on_device:
            self._on_device[key] = make()
        return self._on_device[key]

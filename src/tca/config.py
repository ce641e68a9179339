"""TCAConfig: the hyper-parameters of TCA-Attention (docs/semantics.md section 1), validated once."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MASS_SCALES = ("mean", "none")


@dataclass(frozen=True)
class TCAConfig:
    """Hyper-parameters of TCA-Attention.

    block_size: tokens per block b (power of two, 16..256).
    window: local window w in tokens (multiple of block_size, >= block_size).
    alpha: weight of the redundancy term in the block priority (Eq. 6), in [0, 1].
    mass_scale: "mean" multiplies the block mass by J (the number of budgeted blocks) so it is O(1)
        like the redundancy term; "none" is the paper's literal Eq. 6. [choice]
    tau: calibration threshold on the retained attention mass, in (0, 1].
    num_candidates: number M of log-Gaussian candidate budget configurations (>= 2).
    sigma: spread of the log-Gaussian candidates (> 0).
    """

    block_size: int = 128
    window: int = 4096
    alpha: float = 0.5
    mass_scale: str = "mean"
    tau: float = 0.9
    num_candidates: int = 14
    sigma: float = 1.0

    def __post_init__(self) -> None:
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"block_size must be an int, got {type(b).__name__}")
        if b < 16 or b > 256 or b & (b - 1):
            raise ValueError(f"block_size must be a power of two in 16..256, got {b}; try 64 or 128")
        w = self.window
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"window must be an int, got {type(w).__name__}")
        if w < b or w % b:
            raise ValueError(
                f"window must be a positive multiple of block_size ({b}), got {w}; "
                f"try {max(b, (w // b) * b)}"
            )
        if not _is_real(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.mass_scale not in MASS_SCALES:
            raise ValueError(f"mass_scale must be one of {MASS_SCALES}, got {self.mass_scale!r}")
        if not _is_real(self.tau) or not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be a number in (0, 1], got {self.tau!r}")
        m = self.num_candidates
        if isinstance(m, bool) or not isinstance(m, int) or m < 2:
            raise ValueError(f"num_candidates must be an int >= 2, got {m!r}")
        if not _is_real(self.sigma) or not self.sigma > 0:
            raise ValueError(f"sigma must be a number > 0, got {self.sigma!r}")

    @property
    def retain_counts(self) -> tuple[int, ...]:
        """K = (1, 2, 4, ..., b): the per-block retain counts; index k_idx = log2(k)."""
        return tuple(2**i for i in range(self.num_retain_counts))

    @property
    def num_retain_counts(self) -> int:
        return int(math.log2(self.block_size)) + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TCAConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TCAConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

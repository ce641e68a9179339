"""Tolerances and helpers for checking a backend against the reference (usable by backend authors).

Per-dtype (atol, rtol) for comparing a backend's output with the reference's, as in Liger-Kernel; and the
flash-attention rule for low precision: the backend's error against an fp32/fp64 reference must be at most
`LOW_PRECISION_FACTOR` times the error of plain PyTorch computing in the same low precision.
"""

from __future__ import annotations

import torch

# dtype -> (atol, rtol) for outputs of attention given the same selection.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),  # the Triton interpreter and tf32-free GPU dots
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
LSE_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-3, 2e-3),  # the LSE is accumulated in fp32 whatever the input dtype
}
LOW_PRECISION_FACTOR = 2.0


def tolerance(dtype: torch.dtype, lse: bool = False) -> tuple[float, float]:
    table = LSE_TOLERANCES if lse else TOLERANCES
    if dtype not in table:
        raise KeyError(f"no tolerance for {dtype}; known: {', '.join(str(d) for d in table)}")
    return table[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, lse: bool = False, msg: str = ""):
    """torch.testing.assert_close at the table's tolerance for `dtype` (default: actual's dtype), after
    checking that `actual` has no NaN."""
    if torch.isnan(actual).any():
        raise AssertionError(f"{msg} output has NaN")
    atol, rtol = tolerance(dtype or actual.dtype, lse)
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=rtol, msg=lambda m: f"{msg} {m}")


def selection_difference(a, b) -> str:
    """Describe where two Selections differ: per (batch, KV head), the symmetric difference of positions."""
    lines = []
    diff = a.mask ^ b.mask
    for bi, h in diff.any(-1).nonzero().tolist():
        only_a = (a.mask[bi, h] & diff[bi, h]).nonzero().squeeze(-1).tolist()
        only_b = (b.mask[bi, h] & diff[bi, h]).nonzero().squeeze(-1).tolist()
        lines.append(f"batch {bi} head {h}: only in first {only_a[:16]}, only in second {only_b[:16]}")
    return "\n".join(lines) or "identical"

"""Budget configurations (docs/semantics.md section 1).

A budget configuration p of one KV head is a probability vector over the retain counts
K = (1, 2, 4, ..., b). Its cost E[p] = sum_k k p[k] is the expected number of tokens kept per budgeted block.
"""

from __future__ import annotations

import math

import torch


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or block_size > 256 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in 16..256, got {block_size!r}; try 64 or 128")


def retain_counts(block_size: int) -> torch.Tensor:
    """K = [1, 2, 4, ..., b] as an int64 tensor."""
    return 2 ** torch.arange(int(math.log2(block_size)) + 1)


def log_gaussian_budgets(mu: float, sigma: float, block_size: int) -> torch.Tensor:
    """p_mu[k] = phi(log2 k) / sum phi, phi(x) = exp(-(x - mu)^2 / (2 sigma^2)). float64, shape [len(K)]."""
    _check_block_size(block_size)
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not isinstance(mu, (int, float)) or isinstance(mu, bool) or not math.isfinite(mu):
        raise ValueError(f"mu must be a finite number (log2 of the centre retain count), got {mu!r}")
    x = torch.arange(int(math.log2(block_size)) + 1, dtype=torch.float64)
    phi = torch.exp(-((x - mu) ** 2) / (2 * sigma**2))
    return phi / phi.sum()


def default_budgets(block_size: int) -> torch.Tensor:
    """p_mu with mu = max(0, log2(b) - 3), sigma 1: about 16% of each block for b = 128. [choice]"""
    return log_gaussian_budgets(max(0.0, math.log2(block_size) - 3), 1.0, block_size)


def dense_budgets(block_size: int) -> torch.Tensor:
    """All mass on k = b: every token of every budgeted block is kept (TCA equals dense attention)."""
    _check_block_size(block_size)
    p = torch.zeros(int(math.log2(block_size)) + 1, dtype=torch.float64)
    p[-1] = 1.0
    return p


def calibration_candidates(block_size: int, num_candidates: int, sigma: float) -> torch.Tensor:
    """The M log-Gaussian candidates, mu_m = m log2(b) / (M - 1): shape [M, len(K)], float64 (section 6)."""
    top = math.log2(block_size)
    return torch.stack(
        [log_gaussian_budgets(m * top / (num_candidates - 1), sigma, block_size) for m in range(num_candidates)]
    )


def expected_cost(p: torch.Tensor) -> torch.Tensor:
    """E[p] = sum_k k p[k] over the last dimension."""
    k = retain_counts(2 ** (p.shape[-1] - 1)).to(device=p.device, dtype=torch.float64)
    return (p.to(torch.float64) * k).sum(-1)


def block_keep_count(p: torch.Tensor) -> torch.Tensor:
    """t = max(1, floor(E[p])): tokens kept of each block that leaves the window while decoding (section 5)."""
    return expected_cost(p).floor().clamp_min(1).long()

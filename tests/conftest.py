"""Settings and fixtures of the whole suite: one intra-op thread, a bounded hypothesis profile, a seeded global RNG.

Shared helpers (seeded inputs, skips, script loading) live in helpers.py: `from helpers import make_qkv`.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# The CPU suite runs tiny tensors on a shared 2-core machine: with 2 intra-op threads, OpenMP barriers
# spin against other processes and the same tests ran 40x slower (reference/test_cache.py: 45 s vs 1.1 s
# with 1 thread, load average 4). One thread unless TCA_TEST_THREADS asks for more.
torch.set_num_threads(int(os.environ.get("TCA_TEST_THREADS", "1")))

# Property tests must stay fast on two cores: few examples, no per-example deadline.
settings.register_profile(
    "tca-ci", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("tca-ci")


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Seed torch's global generator before every test, so even a stray torch.randn is reproducible."""
    torch.manual_seed(0)

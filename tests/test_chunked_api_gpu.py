"""Chunked and streaming prefill on a GPU at Llama-like head shapes (docs/semantics.md section 5b): Triton and torch
against each other in bf16 and against the reference in float64, chunk by chunk, then decoding.

Marked `gpu` and `triton`; skipped without a CUDA device. Shape letters: B, HQ, HKV, L, D.
"""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import chunked_prefill_against_reference
from tca.testing import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.triton]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

CONFIG = tca.TCAConfig(block_size=64, window=512)
HQ, HKV, D, L = 8, 2, 128, 3000


def _inputs(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(1, h, L + 4, D, device="cuda", generator=gen).to(dtype) for h in (HQ, HKV, HKV)]


@pytest.mark.parametrize("mode,chunk", [("exact", 700), ("streaming", 512)])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_chunked_prefill_on_the_gpu_matches_the_reference(backend, mode, chunk):
    q, k, v = _inputs(torch.bfloat16)
    qr, kr, vr = (t.double() for t in (q, k, v))
    cache, ref_cache = chunked_prefill_against_reference(q, k, v, L, chunk, mode, CONFIG, backend, torch.bfloat16)
    assert torch.equal(cache.lengths, ref_cache.lengths)
    for i in range(L, L + 4):
        sl = slice(i, i + 1)
        got = tca.decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], cache, backend=backend)
        want = tca.decode(qr[:, :, sl], kr[:, :, sl], vr[:, :, sl], ref_cache)
        assert_close(got, want, torch.bfloat16, msg=f"decode at {i}")

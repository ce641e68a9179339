"""Every available backend against the reference over a matrix of sequence lengths (generic: any backend that
registers is covered, or skipped with its reasons).

Stateless attention for each backend, and prefill + a few decode steps for those with decode. float32,
small geometry (b=16, w=64) over many lengths, then a matrix of geometries (block sizes 16-256, windows of one
to four blocks, GQA ratios 1-8, LQ < L) at few lengths; all small enough for the Triton interpreter (nox session
`crosscheck`). Shape letters: B, HQ, HKV, L, LQ, D, b block size, w window.
"""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import chunked_prefill_against_reference, make_qkv
from tca import reference
from tca.backends import registry
from tca.config import TCAConfig
from tca.reference.cache import cached_positions
from tca.testing import assert_close, selection_difference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = TCAConfig(block_size=16, window=64)
LENGTHS = [1, 15, 64, 65, 100, 160, 203]
HEADS = [(4, 2), (2, 2)]
D = 64
BACKENDS = [name for name in registry.names() if name != "reference"]


def _dtype(name) -> torch.dtype:
    """float32 where the backend takes it, else its first supported dtype (flash kernels are fp16/bf16 only)."""
    dtypes = registry.get(name).dtypes
    return torch.float32 if torch.float32 in dtypes else dtypes[0]


def _usable(name, head_dim=D):
    reasons = registry.get(name).reasons(DEVICE, _dtype(name), head_dim)
    if reasons:
        pytest.skip(f"backend {name!r} cannot run here: {'; '.join(reasons)}")
    return registry.get(name).load()


def _geometry_head_dim(name) -> int:
    """32 (small enough for the interpreter), or D where the backend's kernels take no 32 (FlashAttention-4)."""
    return 32 if not registry.get(name).reasons(DEVICE, _dtype(name), 32) else D


def _inputs(HQ, HKV, L, seed, dtype, LQ=None, D=D):
    return make_qkv(1, HQ, HKV, L, D, LQ=LQ, dtype=dtype, seed=seed, device=DEVICE)


def _explain(impl, q, k, config=CONFIG):
    """When outputs differ, the selection difference is the first thing to look at."""
    if not hasattr(impl, "select") or k.shape[2] <= config.window:
        return ""
    p = tca.default_budgets(config.block_size).to(DEVICE).expand(k.shape[1], -1).contiguous()
    scale = q.shape[-1] ** -0.5
    return selection_difference(impl.select(q, k, p, config, scale), reference.select(q, k, p, config, scale))


@pytest.mark.parametrize("HQ,HKV", HEADS)
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_matches_reference(backend, L, HQ, HKV):
    impl = _usable(backend)
    DTYPE = _dtype(backend)
    q, k, v = _inputs(HQ, HKV, L, seed=L, dtype=DTYPE)
    out = tca.attention(q, k, v, config=CONFIG, backend=backend)
    ref = tca.attention(q.double(), k.double(), v.double(), config=CONFIG, backend="reference")
    assert not torch.isnan(out).any()
    try:
        assert_close(out, ref, DTYPE)
    except AssertionError as e:
        raise AssertionError(f"{e}\nselection: {_explain(impl, q, k)}") from None


@pytest.mark.parametrize("L", [40, 100, 203])
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_decode_matches_reference(backend, L):
    if not registry.get(backend).supports("decode"):
        pytest.skip(f"backend {backend!r} has no stateful decode")
    _usable(backend)
    DTYPE = _dtype(backend)
    HQ, HKV, steps = 4, 2, 20
    q, k, v = _inputs(HQ, HKV, L + steps, seed=L + 7, dtype=DTYPE)
    out, cache = tca.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], config=CONFIG, backend=backend)
    qr, kr, vr = q.double(), k.double(), v.double()  # the same (rounded) inputs, computed exactly
    ref, ref_cache = tca.prefill(qr[:, :, :L], kr[:, :, :L], vr[:, :, :L], config=CONFIG, backend="reference")
    assert_close(out, ref, DTYPE)
    for i in range(L, L + steps):
        sl = slice(i, i + 1)
        got = tca.decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], cache)
        want = tca.decode(qr[:, :, sl], kr[:, :, sl], vr[:, :, sl], ref_cache)
        assert not torch.isnan(got).any()
        assert_close(got, want, DTYPE, msg=f"{backend} decode step at position {i}")


@pytest.mark.parametrize("mode,chunk", [("exact", 40), ("streaming", 48)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_matches_reference(backend, mode, chunk):
    """Chunk by chunk against the reference's chunked prefill (section 5b), then the caches and two decode steps."""
    if not registry.get(backend).has_chunked_prefill:
        pytest.skip(f"backend {backend!r} has no chunked prefill")
    _usable(backend)
    DTYPE = _dtype(backend)
    HQ, HKV, L, steps = 4, 2, 150, 2
    q, k, v = _inputs(HQ, HKV, L + steps, seed=L + 11, dtype=DTYPE)
    qr, kr, vr = q.double(), k.double(), v.double()
    cache, ref_cache = chunked_prefill_against_reference(q, k, v, L, chunk, mode, CONFIG, backend, DTYPE)
    positions = [[cache.positions_of(0, h).tolist() for h in range(HKV)]]
    assert positions == [[p.tolist() for p in row] for row in ref_cache.positions]
    for i in range(L, L + steps):
        sl = slice(i, i + 1)
        got = tca.decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], cache)
        want = tca.decode(qr[:, :, sl], kr[:, :, sl], vr[:, :, sl], ref_cache)
        assert_close(got, want, DTYPE, msg=f"{backend} decode step at position {i} after a {mode} chunked prefill")


# (b, w, HQ, HKV, L, LQ): every block size, windows of one to four blocks, GQA ratios 1, 2, 3, 4, 8, LQ < L.
GEOMETRIES = [
    (16, 16, 2, 2, 70, 70),
    (32, 64, 8, 1, 200, 200),
    (32, 96, 3, 1, 230, 17),
    (64, 128, 4, 2, 330, 330),
    (64, 64, 4, 1, 300, 1),
    (128, 256, 8, 2, 520, 40),
    (256, 256, 2, 1, 600, 600),
]


@pytest.mark.parametrize("b,w,HQ,HKV,L,LQ", GEOMETRIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_geometries_match_reference(backend, b, w, HQ, HKV, L, LQ):
    head_dim = _geometry_head_dim(backend)
    impl = _usable(backend, head_dim)
    dtype = _dtype(backend)
    config = TCAConfig(block_size=b, window=w)
    q, k, v = _inputs(HQ, HKV, L, seed=L + b, dtype=dtype, LQ=LQ, D=head_dim)
    out, lse = tca.attention(q, k, v, config=config, backend=backend, return_lse=True)
    ref, ref_lse = tca.attention(q.double(), k.double(), v.double(), config=config, backend="reference",
                                 return_lse=True)
    try:
        assert_close(out, ref, dtype)
        assert_close(lse, ref_lse, dtype, lse=True, msg="lse")
    except AssertionError as e:
        raise AssertionError(f"{e}\nselection: {_explain(impl, q, k, config)}") from None


@pytest.mark.parametrize("b,w,HQ,HKV,L", [(32, 64, 8, 1, 150), (64, 128, 3, 1, 250)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_geometries_match_reference(backend, b, w, HQ, HKV, L):
    """Decode steps that cross a block boundary (a block leaves the window) at other block sizes and GQA ratios."""
    if not registry.get(backend).supports("decode"):
        pytest.skip(f"backend {backend!r} has no stateful decode")
    head_dim = _geometry_head_dim(backend)
    _usable(backend, head_dim)
    dtype = _dtype(backend)
    config = TCAConfig(block_size=b, window=w)
    steps = b - L % b + 2  # past the next block boundary
    q, k, v = _inputs(HQ, HKV, L + steps, seed=L, dtype=dtype, D=head_dim)
    qr, kr, vr = q.double(), k.double(), v.double()
    _, cache = tca.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], config=config, backend=backend)
    _, ref_cache = tca.prefill(qr[:, :, :L], kr[:, :, :L], vr[:, :, :L], config=config, backend="reference")
    for i in range(L, L + steps):
        sl = slice(i, i + 1)
        got = tca.decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], cache)
        want = tca.decode(qr[:, :, sl], kr[:, :, sl], vr[:, :, sl], ref_cache)
        assert_close(got, want, dtype, msg=f"{backend} decode step at position {i}")


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("starts", [[0, 41, 150], [3, 0, 190]])
def test_padded_prefill_against_the_reference(name, starts):
    """Section 9.1: a left-padded batch through tca.prefill(starts=...) on each backend with decode (one call where
    it has "varlen", else one sequence at a time) equals each sequence prefilled alone by the reference."""
    impl = _usable(name)
    if not registry.get(name).has_decode:
        pytest.skip(f"backend {name!r} has no prefill")
    del impl
    dtype = _dtype(name)
    q, k, v = make_qkv(3, 4, 2, 203, D, dtype=dtype, seed=11, device=DEVICE)
    out, cache = tca.prefill(q, k, v, config=CONFIG, backend=name, starts=starts)
    budgets = tca.budgets.default_budgets(CONFIG.block_size).expand(2, -1).to(torch.float64)
    ref_out, ref_caches = reference.prefill_padded(
        *(x.cpu().double() for x in (q, k, v)), starts, budgets, CONFIG, D**-0.5
    )
    assert_close(out.cpu().double(), ref_out, dtype)
    for b in range(3):
        for h in range(2):
            assert cache.positions_of(b, h).tolist() == cached_positions(ref_caches[b])[0][h]

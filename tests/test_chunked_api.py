"""The public chunked prefill: tca.start_prefill, tca.prefill_chunk, tca.finish_prefill, tca.prefill_in_chunks.

Routing through the registry, equality with tca.prefill, continuing a cache, and every error of
docs/semantics.md section 5b.3, each leaving the state (and a continued cache) as it was.
Shape letters: B, HQ, HKV, L, D as in the package.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import tca
from helpers import make_qkv
from tca.backends import registry
from tca.reference.cache import cached_positions

CONFIG = tca.TCAConfig(block_size=16, window=32)
B, HQ, HKV, D = 2, 4, 2, 8


def start(mode="exact", **kwargs):
    return tca.start_prefill(mode=mode, config=CONFIG, backend="reference", **kwargs)


def feed(state, q, k, v, size):
    return [
        tca.prefill_chunk(q[:, :, s : s + size], k[:, :, s : s + size], v[:, :, s : s + size], state, position=s)
        for s in range(0, k.shape[2], size)
    ]


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_exact_in_chunks_ends_like_prefill(layout):
    q, k, v = make_qkv(B, HQ, HKV, 76, D, seed=1)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    seq = 2 if layout == "bhsd" else 1
    prompt = tuple(t.narrow(seq, 0, 75) for t in (q, k, v))
    out, cache = tca.prefill(*prompt, config=CONFIG, backend="reference", layout=layout)
    chunked, chunked_cache = tca.prefill_in_chunks(
        *prompt, chunk_size=20, config=CONFIG, backend="reference", layout=layout
    )
    assert chunked.shape == out.shape
    torch.testing.assert_close(chunked.narrow(seq, 60, 15), out.narrow(seq, 60, 15), rtol=1e-12, atol=1e-12)
    assert cached_positions(chunked_cache) == cached_positions(cache)
    step = tuple(t.narrow(seq, 75, 1) for t in (q, k, v))
    torch.testing.assert_close(
        tca.decode(*step, chunked_cache, layout=layout), tca.decode(*step, cache, layout=layout), rtol=0, atol=0
    )


@pytest.mark.parametrize("mode", ["exact", "streaming"])
def test_chunk_by_chunk_equals_the_one_call_form(mode):
    q, k, v = make_qkv(B, HQ, HKV, 90, D, seed=2)
    state = start(mode)
    outs = feed(state, q, k, v, 32)
    assert state.seq_len == 90 and state.backend == "reference" and state.nbytes > 0
    cache = tca.finish_prefill(state)
    out, other = tca.prefill_in_chunks(q, k, v, chunk_size=32, mode=mode, config=CONFIG, backend="reference")
    torch.testing.assert_close(torch.cat(outs, dim=2), out, rtol=0, atol=0)
    assert cached_positions(cache) == cached_positions(other)


def test_streaming_keeps_memory_bounded_and_decodes():
    L = 256
    q, k, v = make_qkv(1, HQ, HKV, L + 1, D, seed=3)
    state = start("streaming")
    for s in range(0, L, 32):
        tca.prefill_chunk(q[:, :, s : s + 32], k[:, :, s : s + 32], v[:, :, s : s + 32], state)
        assert state.nbytes < 2 * HKV * (s + 32) * D * 8 or s + 32 <= CONFIG.window  # below the dense KV
    cache = tca.finish_prefill(state)
    assert cache.lengths.max() < L // 3
    out = tca.decode(q[:, :, L:], k[:, :, L:], v[:, :, L:], cache)
    assert out.shape == (1, HQ, 1, D) and torch.isfinite(out).all() and cache.seq_len == L + 1


def test_auto_chooses_a_backend_with_chunked_prefill():
    q, k, v = make_qkv(1, HQ, HKV, 16, D, dtype=torch.float32)
    state = tca.start_prefill(mode="streaming", config=CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tca.BackendChoiceWarning)
        tca.prefill_chunk(q, k, v, state)
    usable = [n for n in registry.names() if not registry.get(n).reasons("cpu", torch.float32, D, needs=("decode", "chunked_prefill"))]
    assert state.backend == usable[0] != "reference"  # the fastest backend with chunked prefill, not the oracle
    assert "chunked_prefill" in registry.report()[0]


@pytest.mark.parametrize("backend", [n for n in registry.names() if not registry.get(n).has_chunked_prefill])
def test_backends_without_chunked_prefill_say_where_it_is(backend):
    q, k, v = make_qkv(1, HQ, HKV, 16, D, dtype=torch.float32)
    state = tca.start_prefill(mode="exact", config=CONFIG, backend=backend)
    having = ", ".join(n for n in registry.names() if registry.get(n).has_chunked_prefill)
    with pytest.raises(tca.BackendUnavailableError, match=f"chunked prefill is implemented on: {having}"):
        tca.prefill_chunk(q, k, v, state)
    assert state.seq_len == 0 and state.backend is None


def test_continuing_a_cache_in_streaming_mode():
    q, k, v = make_qkv(B, HQ, HKV, 100, D, seed=4)
    out, cache = tca.prefill_in_chunks(
        q[:, :, :64], k[:, :, :64], v[:, :, :64], chunk_size=32, mode="streaming", config=CONFIG, backend="reference"
    )
    tca.decode(q[:, :, 64:65], k[:, :, 64:65], v[:, :, 64:65], cache)
    state = tca.start_prefill(mode="streaming", cache=cache)  # the budgets recorded in the cache
    assert state.seq_len == 65
    tca.prefill_chunk(q[:, :, 65:96], k[:, :, 65:96], v[:, :, 65:96], state, position=65)  # ends on a block
    tca.prefill_chunk(q[:, :, 96:], k[:, :, 96:], v[:, :, 96:], state, position=96)
    assert tca.finish_prefill(state) is cache and cache.seq_len == 100
    assert all(p[-1] == 99 for row in cache.positions for p in row)


def test_a_cache_without_recorded_budgets_needs_them():
    q, k, v = make_qkv(1, HQ, HKV, 40, D, seed=5)
    _, cache = tca.prefill(q, k, v, config=CONFIG, backend="reference")
    with pytest.raises(ValueError, match="pass the budgets it was made with"):
        tca.start_prefill(mode="streaming", cache=cache)
    state = tca.start_prefill(mode="streaming", cache=cache, budgets=tca.default_budgets(16))
    assert state.seq_len == 40


def errors_cases():
    """(name, what to do to a streaming prefill of 32 tokens (+ its cache), error type, message)."""
    q, k, v = make_qkv(B, HQ, HKV, 64, D, seed=6)
    nxt = (q[:, :, 32:48], k[:, :, 32:48], v[:, :, 32:48])
    return [
        ("position", lambda st: tca.prefill_chunk(*nxt, st, position=16), ValueError, "starts at position 16 but 32"),
        ("position type", lambda st: tca.prefill_chunk(*nxt, st, position=32.0), TypeError, "position must be an int"),
        ("batch", lambda st: tca.prefill_chunk(*(t[:1] for t in nxt), st), ValueError, "its batch size is 1"),
        (
            "kv heads",
            lambda st: tca.prefill_chunk(nxt[0], nxt[1][:, :1], nxt[2][:, :1], st),
            ValueError,
            "number of KV heads is 1",
        ),
        (
            "query heads",
            lambda st: tca.prefill_chunk(nxt[0][:, :2], *nxt[1:], st),
            ValueError,
            "number of query heads is 2",
        ),
        ("head dim", lambda st: tca.prefill_chunk(*(t[..., :4] for t in nxt), st), ValueError, "head dim is 4"),
        ("dtype", lambda st: tca.prefill_chunk(*(t.float() for t in nxt), st), ValueError, "dtype is torch.float32"),
        ("device", lambda st: tca.prefill_chunk(*(t.to("meta") for t in nxt), st), ValueError, "meta device"),
        ("lengths", lambda st: tca.prefill_chunk(q[:, :, 32:40], *nxt[1:], st), ValueError, "one query per new key"),
        ("state", lambda st: tca.prefill_chunk(*nxt, object()), TypeError, "state must be a tca.ChunkedPrefill"),
    ]


@pytest.mark.parametrize("case", errors_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("continued", [False, True], ids=["fresh", "continued cache"])
def test_errors_leave_the_prefill_intact(case, continued):
    _, act, error, message = case
    q, k, v = make_qkv(B, HQ, HKV, 64, D, seed=6)
    if continued:
        _, cache = tca.prefill_in_chunks(
            q[:, :, :32],
            k[:, :, :32],
            v[:, :, :32],
            chunk_size=32,
            mode="streaming",
            config=CONFIG,
            backend="reference",
        )
        state = tca.start_prefill(mode="streaming", cache=cache)
    else:
        state = start("streaming")
        tca.prefill_chunk(q[:, :, :32], k[:, :, :32], v[:, :, :32], state)
    before = cached_positions(state._state)
    with pytest.raises(error, match=message):
        act(state)
    assert state.seq_len == 32 and cached_positions(state._state) == before
    # It goes on as if nothing had happened: the same outputs as a prefill that never saw the error.
    out = tca.prefill_chunk(q[:, :, 32:], k[:, :, 32:], v[:, :, 32:], state)
    clean, _ = tca.prefill_in_chunks(q, k, v, chunk_size=32, mode="streaming", config=CONFIG, backend="reference")
    torch.testing.assert_close(out, clean[:, :, 32:], rtol=0, atol=0)


def test_exact_errors_leave_the_dense_state_intact():
    q, k, v = make_qkv(B, HQ, HKV, 40, D, seed=7)
    state = start("exact")
    tca.prefill_chunk(q[:, :, :25], k[:, :, :25], v[:, :, :25], state)
    with pytest.raises(ValueError, match="its batch size is 1"):
        tca.prefill_chunk(q[:1, :, 25:], k[:1, :, 25:], v[:1, :, 25:], state)
    assert state.seq_len == 25 and state._state.keys.shape[2] == 25
    tca.prefill_chunk(q[:, :, 25:], k[:, :, 25:], v[:, :, 25:], state)  # exact chunks may end anywhere
    _, one_shot = tca.prefill(q, k, v, config=CONFIG, backend="reference")
    assert cached_positions(tca.finish_prefill(state)) == cached_positions(one_shot)


def test_streaming_chunks_must_end_on_block_boundaries_but_the_last():
    q, k, v = make_qkv(1, HQ, HKV, 64, D, seed=8)
    state = start("streaming")
    tca.prefill_chunk(q[:, :, :20], k[:, :, :20], v[:, :, :20], state)
    with pytest.raises(ValueError, match=r"ended inside a block \(at position 20, block size 16\)"):
        tca.prefill_chunk(q[:, :, 20:32], k[:, :, 20:32], v[:, :, 20:32], state)
    assert state.seq_len == 20
    tca.finish_prefill(state)  # 20 tokens were the whole prompt
    with pytest.raises(ValueError, match="multiples of the block size 16.*got chunk_size=20; try 16"):
        tca.prefill_in_chunks(q, k, v, chunk_size=20, mode="streaming", config=CONFIG, backend="reference")


def test_mixing_modes_and_finishing_are_checked():
    q, k, v = make_qkv(1, HQ, HKV, 48, D, seed=9)
    state = start("exact")
    with pytest.raises(ValueError, match="no chunk was prefilled"):
        tca.finish_prefill(state)
    tca.prefill_chunk(q, k, v, state)
    cache = tca.finish_prefill(state)
    with pytest.raises(ValueError, match="already finished"):
        tca.finish_prefill(state)
    with pytest.raises(ValueError, match="was finished by tca.finish_prefill.*mode='streaming', cache=cache"):
        tca.prefill_chunk(q[:, :, :16], k[:, :, :16], v[:, :, :16], state)
    with pytest.raises(ValueError, match="exact chunked prefill cannot continue a compressed cache"):
        tca.start_prefill(mode="exact", cache=cache)
    with pytest.raises(ValueError, match="keeps its own config and scale"):
        tca.start_prefill(mode="streaming", cache=cache, config=CONFIG)
    with pytest.raises(ValueError, match="made by backend 'reference' and continues there"):
        tca.start_prefill(mode="streaming", cache=cache, backend="torch")
    with pytest.raises(TypeError, match="cache must be a cache made by tca.prefill"):
        tca.start_prefill(mode="streaming", cache=object())
    with pytest.raises(ValueError, match="mode must be one of"):
        tca.start_prefill(mode="stream")
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        tca.prefill_in_chunks(q, k, v, chunk_size=16.0)
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        tca.prefill_in_chunks(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match=r"one query per key \(LQ == L\)"):
        tca.prefill_in_chunks(q[:, :, :8], k, v, chunk_size=16, backend="reference")

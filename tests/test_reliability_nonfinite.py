"""Non-finite inputs (docs/semantics.md, "Non-finite values"): a NaN or Inf in one key, value or query reaches
only the rows whose kept set holds it, and never makes a head keep more than its budget.

Shape letters: B batch, HQ query heads, HKV key/value heads, L keys, D head dim, b block size, w window.
"""

from __future__ import annotations

import pytest
import torch

import tca
from helpers import make_qkv, random_budgets
from tca import reference
from tca.backends import registry

CONFIG = tca.TCAConfig(block_size=16, window=32)
B, HQ, HKV, L, D = 1, 4, 2, 100, 16  # J = 5 budgeted blocks: positions 0..79; window 80..99 for the last row


def poisoned(what: str, position: int, value: float, dtype=torch.float64):
    """Seeded inputs with one entry of q, k or v (KV head 0 / query head 0, feature 3) set to `value`."""
    q, k, v = make_qkv(B, HQ, HKV, L, D, dtype=dtype)
    q, k, v = q.clone(), k.clone(), v.clone()
    {"q": q, "k": k, "v": v}[what][0, 0, position, 3] = value
    return q, k, v


def kept_holds(selection, position: int) -> torch.Tensor:
    """[B, HKV, L] bool: for each query row i (all rows, LQ = L), whether S(i) holds key `position`."""
    rows = torch.arange(L)
    return reference.kept_key_mask(selection, rows)[..., position]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("position", [5, 40, 79])
def test_reference_selection_keeps_budget_and_skips_bad_key(value, position):
    q, k, v = poisoned("k", position, value)
    clean_q, clean_k, _ = make_qkv(B, HQ, HKV, L, D)
    budgets = random_budgets(HKV, CONFIG.block_size)
    sel = reference.select(q, k, budgets, CONFIG, scale=D**-0.5)
    clean = reference.select(clean_q, clean_k, budgets, CONFIG, scale=D**-0.5)
    # the budget is spent exactly as without the bad key: same block budgets count, never more tokens
    per_block = sel.mask.view(B, HKV, -1, CONFIG.block_size).sum(-1)
    assert torch.equal(per_block, sel.block_budgets)
    assert int(sel.mask.sum()) == int(clean.mask.sum())
    # the other KV head is untouched, and the bad key (importance 0) is kept only if its block keeps all
    assert torch.equal(sel.mask[:, 1], clean.mask[:, 1])
    block = position // CONFIG.block_size
    if int(sel.block_budgets[0, 0, block]) < CONFIG.block_size:
        assert not bool(sel.mask[0, 0, position])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_reference_importance_leaves_a_bad_key_out(value):
    """The bad key scores 0; the others are the softmax over the remaining keys (as if it were absent)."""
    q, k, _ = poisoned("k", 40, value)
    s = reference.last_query_importance(q[:, :, -1], k, scale=D**-0.5)
    keep = torch.arange(L) != 40
    without = reference.last_query_importance(q[:, :, -1], k[:, :, keep], scale=D**-0.5)
    assert float(s[0, 0, 40]) == 0
    torch.testing.assert_close(s[0, 0, keep], without[0, 0])
    clean_q, clean_k, _ = make_qkv(B, HQ, HKV, L, D)
    clean = reference.last_query_importance(clean_q[:, :, -1], clean_k, scale=D**-0.5)
    assert torch.equal(s[:, 1], clean[:, 1])  # the other KV head is untouched


def test_reference_importance_is_finite_when_a_query_is_nan():
    q, k, _ = poisoned("q", L - 1, float("nan"))
    s = reference.last_query_importance(q[:, :, -1], k, scale=D**-0.5)
    assert bool(torch.isfinite(s).all())
    # query head 0 has no finite logit: KV head 0's importance is query head 1's softmax, halved (mean of 2)
    own = reference.last_query_importance(q[:, 1:2, -1], k[:, :1], scale=D**-0.5)
    torch.testing.assert_close(s[:, 0], own[:, 0] / 2)


@pytest.mark.parametrize("what", ["k", "v"])
@pytest.mark.parametrize("position", [5, 70, 95])
def test_reference_bad_key_or_value_reaches_only_rows_that_keep_it(what, position):
    q, k, v = poisoned(what, position, float("nan"))
    budgets = random_budgets(HKV, CONFIG.block_size)
    sel = reference.select(q, k, budgets, CONFIG, scale=D**-0.5)
    out = reference.attend(q, k, v, sel, scale=D**-0.5)  # [B, HQ, L, D]
    holds = kept_holds(sel, position)[0, 0]  # [L] rows of KV head 0 whose kept set holds the key
    assert holds.any() and not holds.all()
    rows_bad = out[0, :2].isnan().any(-1)  # query heads 0 and 1 use KV head 0
    assert torch.equal(rows_bad, holds.expand(2, L))
    assert bool(torch.isfinite(out[0, 2:]).all())  # KV head 1 never sees it


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


def _ready(backend: str) -> str:
    """Skip a triton case unless its kernels can run here (GPU, or TRITON_INTERPRET=1 on a CPU); the device
    the backend's inputs go to."""
    if backend == "triton":
        from helpers import require_triton

        return require_triton()
    return "cpu"


def _to(device: str, *tensors):
    return tuple(t.to(device) for t in tensors)


def _selection_on(selection, device: str):
    from tca.selection import Selection

    return Selection(selection.mask.to(device), selection.block_budgets.to(device), selection.block_size,
                     selection.window, selection.seq_len)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["q", "k", "v"])
@pytest.mark.parametrize("position", [5, 40, 70, 95])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_backend_matches_reference_on_non_finite_input(backend, what, position, value):
    device = _ready(backend)
    q, k, v = poisoned(what, position, value, dtype=torch.float32)
    budgets = random_budgets(HKV, CONFIG.block_size)
    want = tca.attention(q, k, v, budgets=budgets, config=CONFIG, backend="reference")
    got = tca.attention(*_to(device, q, k, v), budgets=budgets, config=CONFIG, backend=backend).cpu()
    assert torch.equal(got.isfinite(), want.isfinite())
    finite = want.isfinite()
    assert finite.any()
    torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_selection_never_exceeds_budget_with_nan_keys(backend):
    device = _ready(backend)
    q, k, _ = make_qkv(B, HQ, HKV, L, D, dtype=torch.float32)
    k = k.clone()
    k[0, 0, 16:32] = float("nan")  # a whole block of bad keys, and one more in another block
    k[0, 0, 50, 0] = float("nan")
    budgets = random_budgets(HKV, CONFIG.block_size)
    want = reference.select(q, k, budgets, CONFIG, scale=D**-0.5)
    got = registry.get(backend).load().select(*_to(device, q, k, budgets), CONFIG, D**-0.5)
    assert torch.equal(got.block_budgets.cpu(), want.block_budgets)
    assert torch.equal(got.mask.cpu(), want.mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1e3, 1e30])
def test_extreme_scale_gives_nan_only_where_the_reference_does(backend, scale):
    """Selection: every block keeps exactly its budget (near-ties may pick other tokens than the reference at
    tiny scales, so the tokens themselves are not compared). Attention on the reference's selection: NaN
    exactly where the reference has NaN, equal elsewhere."""
    device = _ready(backend)
    q, k, v = make_qkv(B, HQ, HKV, L, D, dtype=torch.float32)
    budgets = random_budgets(HKV, CONFIG.block_size)
    impl = registry.get(backend).load()
    sel = impl.select(*_to(device, q, k, budgets), CONFIG, scale)
    want_sel = reference.select(q, k, budgets, CONFIG, scale)
    assert torch.equal(sel.mask.view(B, HKV, -1, CONFIG.block_size).sum(-1).cpu(), want_sel.block_budgets)
    want = reference.attend(q, k, v, want_sel, scale)
    got = impl.attend(*_to(device, q, k, v), _selection_on(want_sel, device), scale).cpu()
    assert torch.equal(got.isnan(), want.isnan())
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_decode_compression_keeps_its_budget_with_a_nan_key(backend):
    """A NaN key in the block leaving the window scores 0: the block still keeps exactly t tokens (section 8)."""
    if backend == "triton":
        from helpers import require_triton

        require_triton()
    config = tca.TCAConfig(block_size=16, window=32)
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, H, 80, 16, dtype=dtype, generator=gen).to(device) for H in (2, 1, 1))
    _, cache = tca.prefill(q[:, :, :64], k[:, :, :64], v[:, :, :64], config=config, backend=backend)
    before = int(cache.lengths.sum())
    if backend == "reference":
        cache.keys[0][0][-32] = float("nan")  # position 32: in the block [32, 48) that leaves when 80 arrives
    else:
        cache.local_k[0, 0, 32 % cache.window_slots] = float("nan")
    for i in range(64, 80):
        tca.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache, backend="auto")
    keep = int(tca.budgets.block_keep_count(tca.default_budgets(16)))
    assert keep < 16
    assert int(cache.lengths.sum()) == before + 16 - 16 + keep  # 16 appended, one block of 16 replaced by t
    held = cache.positions[0][0].tolist() if backend == "reference" else cache.positions_of(0, 0).tolist()
    assert 32 not in held  # the NaN key ranks last in its block
    assert len([p for p in held if 32 <= p < 48]) == keep


@pytest.mark.parametrize("scale", [1e-300, 2.0**-127, 2.0**128, 1e300])
def test_scale_outside_the_float32_range_is_refused_at_every_entry(scale):
    """Section 8: a scale that rounds to 0 or infinity in float32 is a ValueError before any backend runs."""
    q, k, v = make_qkv(B, HQ, HKV, L, D, dtype=torch.float32)
    match = r"scale must lie between 2\*\*-126 .* and 2\*\*127 .*float32"
    with pytest.raises(ValueError, match=match):
        tca.attention(q, k, v, config=CONFIG, scale=scale)
    with pytest.raises(ValueError, match=match):
        tca.prefill(q, k, v, config=CONFIG, scale=scale, backend="reference")
    state = tca.start_prefill(config=CONFIG, scale=scale)
    with pytest.raises(ValueError, match=match):
        tca.prefill_chunk(q, k, v, state)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("scale", "magnitude"), [(2.0**-126, 1.0), (2.0**127, 1e-3)])
def test_scale_at_the_ends_of_its_range_matches_the_reference(backend, scale, magnitude):
    """The smallest and largest accepted scales: prefill and a decode step that compresses a block equal the float64
    reference (q and k are small at the large end, so that the logits themselves stay within float32)."""
    device = _ready(backend)
    q, k, v = make_qkv(B, HQ, HKV, 81, D)
    q, k = q * magnitude, k * magnitude
    budgets = random_budgets(HKV, CONFIG.block_size)
    prompt, step = (slice(0, 80), slice(80, 81))  # position 80 moves the window: block [48, 64) is compressed
    want, want_cache = tca.prefill(q[:, :, prompt], k[:, :, prompt], v[:, :, prompt], budgets=budgets, config=CONFIG,
                                   scale=scale, backend="reference")
    want_step = tca.decode(q[:, :, step], k[:, :, step], v[:, :, step], want_cache)
    q, k, v = _to(device, q.float(), k.float(), v.float())
    got, cache = tca.prefill(q[:, :, prompt], k[:, :, prompt], v[:, :, prompt], budgets=budgets, config=CONFIG,
                             scale=scale, backend=backend)
    got_step = tca.decode(q[:, :, step], k[:, :, step], v[:, :, step], cache, backend=backend)
    for g, w in ((got, want), (got_step, want_step)):
        assert not g.isnan().any()
        torch.testing.assert_close(g.cpu().double(), w, atol=1e-5, rtol=1e-5)

"""Calibration rules beyond the paper (semantics.md section 6.1) on constructed inputs, and on the tiny model."""

from __future__ import annotations

import pytest
import torch

from tca.budgets import calibration_candidates, dense_budgets, expected_cost
from tca.config import TCAConfig
from tca.plan import HeadBudget
from tca.reference import calibration_variants as V
from tca.reference.attention import kept_key_mask
from tca.reference.calibration import choose_budgets
from tca.selection import Selection

CFG = TCAConfig(block_size=16, window=32, tau=0.9)


def _needle_inputs(P=100, L=104, needle=5, D=8, big=30.0):
    """The answer rows (P..L-1) attend only to `needle`; the prompt's last query prefers the filler keys,
    so a cheap selection (one token per block) drops the needle."""
    e1, e2 = torch.eye(D)[0], torch.eye(D)[1]
    k = (0.1 * big * e2).repeat(L, 1)
    k[needle] = big * e1
    q = torch.zeros(L, D)
    q[: P - 1] = e2
    q[P - 1] = big * e2
    q[P:] = big * e1
    return q[None, None].repeat(1, 2, 1, 1), k[None, None], P  # HQ = 2, HKV = 1


def test_cache_view_is_the_last_prompt_rows_set_then_everything_after():
    L, P = 110, 100  # b = 16, w = 32: J = 5 budgeted blocks (keys 0..79) for the prompt's last row
    selection = Selection.from_indices(torch.tensor([[[0, 5, 40]]]), torch.tensor([[3]]), 16, 32, P)
    view = V.cache_view(selection, P, L)
    expected_prompt = kept_key_mask(selection, torch.tensor([P - 1]))[:, :, 0]
    assert view.shape == (1, 1, L)
    assert torch.equal(view[:, :, :P], expected_prompt) and view[:, :, P:].all()
    assert view[0, 0, :80].nonzero().flatten().tolist() == [0, 5, 40] and view[0, 0, 80:].all()


def test_retrieval_mass_sees_the_needle_the_paper_rows_miss():
    q, k, P = _needle_inputs()
    sparse = calibration_candidates(CFG.block_size, CFG.num_candidates, CFG.sigma)
    candidates = torch.cat([sparse, dense_budgets(CFG.block_size)[None].to(sparse.dtype)])
    masses = V.retrieval_mass(q, k, candidates, CFG, 1.0, P)  # [M + 1, 1]
    assert masses.shape == (len(candidates), 1)
    # The needle's block has the lowest priority for the prompt's last query, so every sparse candidate keeps
    # only the filler there; the answer rows, which read the needle, lose all their mass.
    assert (masses[:-1, 0] < 0.05).all()
    assert masses[-1, 0] > 0.999  # dense keeps it
    with pytest.raises(ValueError, match="answer_start must be inside"):
        V.retrieval_mass(q, k, candidates, CFG, 1.0, k.shape[2])



@pytest.mark.parametrize(("B", "HQ", "HKV", "L", "P"), [(1, 2, 1, 104, 100), (2, 4, 2, 150, 97), (1, 3, 3, 90, 33)])
def test_production_retrieval_mass_equals_the_reference(B, HQ, HKV, L, P):
    from tca.backends.torch.retrieval_mass import retrieval_mass

    gen = torch.Generator().manual_seed(L + P)
    q = torch.randn(B, HQ, L, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(B, HKV, L, 8, generator=gen, dtype=torch.float64)
    sparse = calibration_candidates(CFG.block_size, CFG.num_candidates, CFG.sigma)
    candidates = torch.cat([sparse, dense_budgets(CFG.block_size)[None].to(sparse.dtype)])
    ours = retrieval_mass(q, k, candidates, CFG, 0.5, P)
    assert ours.shape == (len(candidates), HKV) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, V.retrieval_mass(q, k, candidates, CFG, 0.5, P), rtol=0, atol=1e-12)
    needle_q, needle_k, needle_P = _needle_inputs()
    torch.testing.assert_close(retrieval_mass(needle_q, needle_k, candidates, CFG, 1.0, needle_P),
                               V.retrieval_mass(needle_q, needle_k, candidates, CFG, 1.0, needle_P), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="answer_start must be inside"):
        retrieval_mass(q, k, candidates, CFG, 0.5, L)

def test_retrieval_rule_is_the_paper_rule_on_the_minimum_and_never_cheaper():
    torch.manual_seed(0)
    candidates = calibration_candidates(CFG.block_size, CFG.num_candidates, CFG.sigma)
    M = len(candidates)
    masses = torch.linspace(0.5, 1.0, M, dtype=torch.float64)[:, None].repeat(1, 3)
    retrieval = masses.clone()
    retrieval[:, 1] -= 0.2  # head 1 loses more where an answer is retrieved
    chosen = V.choose_retrieval(masses, retrieval, candidates, 0.9, CFG.block_size)
    reference = choose_budgets(torch.minimum(masses, retrieval), candidates, 0.9, CFG.block_size)
    assert [h.candidate for h in chosen] == [h.candidate for h in reference]
    paper = choose_budgets(masses, candidates, 0.9, CFG.block_size)
    assert chosen[0].candidate == paper[0].candidate and chosen[2].candidate == paper[2].candidate
    assert chosen[1].candidate is None or chosen[1].cost > paper[1].cost


def _head(candidate, cost=2.0):
    return HeadBudget([0.0, 1.0, 0.0], 0.95, cost, candidate)


def test_fallback_makes_the_worst_retrieval_heads_dense_up_to_the_cap():
    layers = [[_head(0), _head(1)], [_head(2), _head(None, 4.0)]]
    retrieval = [torch.tensor([[0.50, 0.0], [0.0, 0.95], [0.0, 0.0]]),  # layer 0: head 0 at 0.50, head 1 at 0.95
                 torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.80, 0.0]])]  # layer 1: head 0 at 0.80; head 1 is dense
    out = V.dense_fallback(layers, retrieval, 0.9, 16, max_fraction=0.25)  # floor(0.25 * 4) = 1 head
    assert out[0][0].candidate is None and out[0][0].cost == 16.0  # the worst (0.50) goes dense
    assert out[1][0] is layers[1][0] and out[0][1] is layers[0][1]
    both = V.dense_fallback(layers, retrieval, 0.9, 16, max_fraction=0.5)
    assert both[0][0].candidate is None and both[1][0].candidate is None and both[0][1].candidate == 1
    assert V.dense_fallback(layers, retrieval, 0.9, 16, max_fraction=0.0) == layers
    with pytest.raises(ValueError, match="max_fraction must be in"):
        V.dense_fallback(layers, retrieval, 0.9, 16, max_fraction=1.5)


def test_rules_on_the_tiny_model():
    pytest.importorskip("transformers")
    from tca.eval.tiny import ByteTokenizer, tiny_llama
    from tca.models.calibration import calibrate_model
    from tca.models.calibration_variants import calibrate_with_rule, retrieval_probes

    model, tok = tiny_llama()
    cfg = TCAConfig(block_size=16, window=64, tau=0.9)
    text = "The quick brown fox jumps over the lazy dog. " * 40
    probes = retrieval_probes(ByteTokenizer(), 384, 2, text)
    assert all(ids.shape == (1, 384) and 0 < p < 384 for ids, p in probes)
    ids = torch.tensor([tok.encode(text)[:320]])
    paper = calibrate_model(model, ids, config=cfg, progress=False)
    retrieval = calibrate_with_rule(model, ids, probes, config=cfg, rule="retrieval", progress=False)
    fallback = calibrate_with_rule(model, ids, probes, config=cfg, rule="fallback", max_fraction=0.5, progress=False)
    for a, b in zip(paper.layers, retrieval.layers, strict=True):
        for pa, rb in zip(a, b, strict=True):
            assert rb.cost >= pa.cost  # the minimum of two masses never admits a cheaper candidate
    changed = sum(pa.candidate != fb.candidate for a, b in zip(paper.layers, fallback.layers, strict=False) for pa, fb in zip(a, b, strict=False))
    assert all(fb.candidate is None for a, b in zip(paper.layers, fallback.layers, strict=False) for pa, fb in zip(a, b, strict=False)
               if pa.candidate != fb.candidate)
    assert changed <= 2  # floor(0.5 * 2 layers * 2 KV heads)
    assert retrieval.metadata["calibration_rule"] == "retrieval" and fallback.metadata["probes"] == 2
    costs = [float(expected_cost(torch.tensor(h.budgets))) for layer in retrieval.layers for h in layer]
    assert all(c >= 1.0 for c in costs)
    with pytest.raises(ValueError, match="needs retrieval probes"):
        calibrate_with_rule(model, ids, [], config=cfg, rule="retrieval", progress=False)
    with pytest.raises(ValueError, match="unknown calibration rule"):
        calibrate_with_rule(model, ids, probes, config=cfg, rule="other", progress=False)

"""tca.reference against an independent, loop-based reading of docs/semantics.md sections 2-4.

`spec_selection` and `spec_attention` below are written straight from the spec text with plain Python
loops (importance with math.exp, priorities, largest remainder, top-t) and share no code with tca: no
tca.geometry, tca.budgets or tca.reference. Ties are built on purpose (duplicate keys, duplicate blocks,
zero queries, integer-valued inputs whose dot products are exact) so that every tie-break rule is exercised.
"""

from __future__ import annotations

import math

import pytest
import torch

import tca
from helpers import make_qkv, random_budgets
from tca import reference

# ---------------------------------------------------------------------------------------------------------
# The independent implementation (one batch element at a time, Python lists and floats).
# ---------------------------------------------------------------------------------------------------------


def spec_lo(i: int, b: int, w: int) -> int:
    """Section 2: lo(i) = max(0, (c(i) + 1) * b - w), c(i) = i // b."""
    return max(0, (i // b + 1) * b - w)


def spec_num_blocks(L: int, b: int, w: int) -> int:
    """Section 2: J = max(0, c(L-1) + 1 - w/b)."""
    return max(0, (L - 1) // b + 1 - w // b)


def spec_importance(q_last: list[list[float]], keys: list[list[float]], scale: float) -> list[float]:
    """Section 3.1: mean over the group's query heads of softmax(scale * q_last . k) over all keys."""
    L = len(keys)
    s = [0.0] * L
    for qh in q_last:
        logits = []
        for key in keys:
            dot = 0.0
            for a, c in zip(qh, key, strict=True):
                dot += a * c
            logits.append(scale * dot)
        top = max(logits)
        e = [math.exp(x - top) for x in logits]
        z = sum(e)
        for j in range(L):
            s[j] += e[j] / z
    return [x / len(q_last) for x in s]


def spec_priorities(s: list[float], J: int, b: int, alpha: float, mass_scale: str) -> list[float]:
    """Section 3.2: h_j = (1 - alpha) m_j + alpha (1 - H_j)."""
    out = []
    for j in range(J):
        block = s[j * b : (j + 1) * b]
        M = sum(block)
        H = 1.0 if M == 0 else sum(x * x for x in block) / (M * M)
        m = J * M if mass_scale == "mean" else M
        out.append((1 - alpha) * m + alpha * (1 - H))
    return out


def spec_ranks(h: list[float]) -> list[int]:
    """Section 3.3: rank 0 = highest priority; ties to the smaller block index."""
    J = len(h)
    ranks = []
    for j in range(J):
        ranks.append(sum(1 for i in range(J) if h[i] > h[j] or (h[i] == h[j] and i < j)))
    return ranks


def spec_counts(p: list[float], J: int) -> list[int]:
    """Section 3.3: n_k = floor(p[k] J), remaining units to the largest fractional parts, ties to larger k."""
    n = [math.floor(x * J) for x in p]
    frac = [p[i] * J - n[i] for i in range(len(p))]
    left = J - sum(n)
    # Candidates in order: larger fraction first, then the larger k (larger index).
    order = sorted(range(len(p)), key=lambda i: (-frac[i], -i))
    for u in range(left):
        n[order[u]] += 1
    return n


def spec_psi(n: list[int]) -> list[int]:
    """Section 3.3: each k = 2^idx repeated n_k times, descending."""
    psi = []
    for idx in reversed(range(len(n))):
        psi += [2**idx] * n[idx]
    return psi


def spec_top(values: list[float], t: int) -> list[int]:
    """Section 3.4: indices of the t largest values; ties to the smaller index."""
    return sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:t])


def spec_selection(q, k, p, b, w, alpha, mass_scale, scale):
    """Sel_g and t_j for one batch element. q [HQ, LQ, D], k [HKV, L, D], p [HKV][len(K)].

    Returns (selected positions per KV head, sorted; t_j per KV head; J).
    """
    HQ, HKV, L = q.shape[0], k.shape[0], k.shape[1]
    G = HQ // HKV
    J = spec_num_blocks(L, b, w)
    sel, budgets = [], []
    for g in range(HKV):
        q_last = [q[h, -1].tolist() for h in range(g * G, (g + 1) * G)]
        s = spec_importance(q_last, k[g].tolist(), scale)
        h = spec_priorities(s, J, b, alpha, mass_scale)
        ranks = spec_ranks(h)
        psi = spec_psi(spec_counts(list(p[g]), J))
        t = [psi[ranks[j]] for j in range(J)]
        chosen = []
        for j in range(J):
            chosen += [j * b + x for x in spec_top(s[j * b : (j + 1) * b], t[j])]
        sel.append(sorted(chosen))
        budgets.append(t)
    return sel, budgets, J


def spec_attention(q, k, v, sel, b, w, scale):
    """Section 4: out and lse per row with one softmax over S(i). q [HQ, LQ, D], k, v [HKV, L, D]."""
    HQ, LQ = q.shape[:2]
    HKV, L = k.shape[:2]
    G = HQ // HKV
    out = torch.zeros(HQ, LQ, q.shape[-1], dtype=torch.float64)
    lse = torch.zeros(HQ, LQ, dtype=torch.float64)
    for h in range(HQ):
        g = h // G
        for r in range(LQ):
            i = L - LQ + r
            lo = spec_lo(i, b, w)
            kept = torch.tensor([j for j in sel[g] if j < lo] + list(range(lo, i + 1)))
            logits = scale * (k[g, kept] @ q[h, r])
            out[h, r] = torch.softmax(logits, 0) @ v[g, kept]
            lse[h, r] = torch.logsumexp(logits, 0)
    return out, lse


# ---------------------------------------------------------------------------------------------------------
# Input builders with deliberate ties.
# ---------------------------------------------------------------------------------------------------------


def integer_qkv(B, HQ, HKV, L, D, seed):
    """Small-integer q and k: every dot product is exact, so equal keys give bit-equal logits."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (B, HQ, L, D), generator=gen).double() * 0.5
    k = torch.randint(-2, 3, (B, HKV, L, D), generator=gen).double() * 0.5
    v = torch.randn(B, HKV, L, D, generator=gen, dtype=torch.float64)
    return q, k, v


def with_duplicates(k, b, seed):
    """Copy some keys onto others inside blocks and copy whole blocks onto others (ties in s and in h)."""
    gen = torch.Generator().manual_seed(seed)
    k = k.clone()
    L = k.shape[2]
    for _ in range(L // 3):
        src, dst = torch.randint(0, L, (2,), generator=gen).tolist()
        k[:, :, dst] = k[:, :, src]
    nblocks = L // b
    if nblocks >= 3:
        k[:, :, 2 * b : 3 * b] = k[:, :, 0:b]  # blocks 0 and 2 identical -> equal priorities
    return k


CASES = [
    # (B, HQ, HKV, L, D, b, w, alpha, mass_scale)
    (1, 4, 2, 150, 16, 16, 32, 0.5, "mean"),
    (2, 3, 3, 97, 8, 16, 16, 0.5, "none"),
    (1, 6, 2, 130, 8, 16, 48, 0.0, "mean"),
    (1, 2, 1, 200, 8, 32, 64, 1.0, "none"),
    (1, 4, 1, 64, 8, 16, 64, 0.5, "mean"),  # L <= w: J = 0, exact dense
    (1, 2, 2, 145, 4, 16, 32, 0.3, "mean"),
    (1, 2, 1, 300, 4, 64, 64, 0.5, "mean"),  # larger blocks: K = 1 .. 64
]


def compare(q, k, v, p, b, w, alpha, mass_scale, scale=None):
    config = tca.TCAConfig(block_size=b, window=w, alpha=alpha, mass_scale=mass_scale)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    selection = reference.select(q, k, p, config, scale)
    out, lse = reference.attention(q, k, v, p, config, scale, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    for batch in range(q.shape[0]):
        sel, t, J = spec_selection(q[batch], k[batch], p.tolist(), b, w, alpha, mass_scale, scale)
        assert selection.num_blocks == J
        assert selection.block_budgets[batch].tolist() == t, "t_j differ"
        got = [selection.mask[batch, g].nonzero().squeeze(-1).tolist() for g in range(k.shape[1])]
        assert got == sel, f"selected positions differ in batch {batch}"
        ref_out, ref_lse = spec_attention(q[batch], k[batch], v[batch], sel, b, w, scale)
        torch.testing.assert_close(out[batch], ref_out, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lse[batch], ref_lse, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_inputs_match_independent_implementation(case, seed):
    B, HQ, HKV, L, D, b, w, alpha, mass_scale = case
    q, k, v = make_qkv(B, HQ, HKV, L, D, seed=seed)
    compare(q, k, v, random_budgets(HKV, b, seed), b, w, alpha, mass_scale)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tied_inputs_match_independent_implementation(case, seed):
    """Integer inputs with duplicated keys and blocks: ties inside blocks and between blocks."""
    B, HQ, HKV, L, D, b, w, alpha, mass_scale = case
    q, k, v = integer_qkv(B, HQ, HKV, L, D, seed)
    k = with_duplicates(k, b, seed)
    compare(q, k, v, random_budgets(HKV, b, seed + 10), b, w, alpha, mass_scale)


@pytest.mark.parametrize("case", CASES)
def test_zero_queries_match_independent_implementation(case):
    """Zero queries: uniform importance, every block and every token tied (ranks and top-t by index)."""
    B, HQ, HKV, L, D, b, w, alpha, mass_scale = case
    q, k, v = make_qkv(B, HQ, HKV, L, D, seed=3)
    q = torch.zeros_like(q)
    compare(q, k, v, random_budgets(HKV, b, 3), b, w, alpha, mass_scale)


@pytest.mark.parametrize("b,J", [(16, 3), (16, 7), (32, 6), (16, 10)])
def test_tied_fractions_in_budgets(b, J):
    """Uniform budgets over K: every fractional part equal, the remainder goes to the larger k first."""
    HKV, n = 2, b.bit_length()
    p = torch.full((HKV, n), 1.0 / n, dtype=torch.float64)
    w = 2 * b
    L = J * b + w
    q, k, v = make_qkv(1, HKV, HKV, L, 8, seed=J)
    compare(q, k, v, p, b, w, 0.5, "mean")


def test_lq_smaller_than_l_matches_independent_implementation():
    """Rows of a short query block sit at the end of the keys; lo(i) moves inside the budgeted region."""
    q, k, v = make_qkv(1, 4, 2, 150, 8, LQ=40, seed=5)
    compare(q, k, v, random_budgets(2, 16, 5), 16, 32, 0.5, "mean")


def test_custom_scale_matches_independent_implementation():
    q, k, v = make_qkv(1, 2, 1, 120, 8, seed=6)
    compare(q, k, v, random_budgets(1, 16, 6), 16, 32, 0.5, "none", scale=0.9)


@pytest.mark.parametrize("seed", [0, 1])
def test_underflowing_importance_matches_independent_implementation(seed):
    """Huge logits: most of s underflows to exactly 0, so some blocks have M_j = 0 (H_j = 1 by definition)."""
    q, k, v = integer_qkv(1, 2, 1, 160, 8, seed)
    k = with_duplicates(k, 16, seed)
    compare(q * 400, k, v, random_budgets(1, 16, seed), 16, 32, 0.5, "mean")


@pytest.mark.parametrize("mass_scale", ["mean", "none"])
def test_zero_mass_blocks_match_independent_implementation(mass_scale):
    """Blocks with M_j = 0 exactly (H_j = 1, so h_j = (1 - alpha) m_j = 0) must rank below a block with a tiny
    but nonzero, fully concentrated mass (h_j > 0), and above nothing; a wrong H_j for M_j = 0 changes t_j."""
    b, w, L, D = 16, 32, 160, 4
    q, k, v = make_qkv(1, 2, 1, L, D, seed=7)
    q[:, :, -1] = torch.tensor([2.0, 0, 0, 0])  # logit of key j = scale * 2 * k[j, 0] = k[j, 0]
    k[..., 0] = -2000.0  # exp underflows to exactly 0: these keys have s = 0
    k[0, 0, 3 * b + 5, 0] = 0.0  # the dominant key: s ~ 1
    k[0, 0, 5 * b + 2, 0] = -300.0  # tiny nonzero s ~ 5e-131, its square still representable
    k[0, 0, L - 1, 0] = -1.0  # a local key with mass, so the budgeted blocks are not all there is
    p = torch.tensor([[0.1, 0.3, 0.2, 0.3, 0.1]], dtype=torch.float64)
    compare(q, k, v, p, b, w, 0.5, mass_scale)

"""The vectorised greedy loops (issue 21) against tiny straightforward references written here with
per-token Python, on seeded random inputs (ties included) and several budgets: a wrong vectorisation
fails here. The references read the same similarity values as the methods (computed by the same
tensor expressions), so ties and orders are compared exactly."""
import math

import pytest
import torch
import torch.nn.functional as F

from test_baselines_unit import image_ctx, llm_ctx
from vtprune.methods.base import split_budget
from vtprune.methods.cdpruner import CDPruner, greedy_dpp_map, llm_relevance
from vtprune.methods.dart import DART
from vtprune.methods.divprune import DivPrune, cosine_distance
from vtprune.methods.hiprune import HiPrune
from vtprune.methods.vispruner import VisPruner, equal_budget, remove_duplicates


def features(seed, n, dim, ties=False, copies=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    if ties:  # few distinct values: equal similarities, equal scores
        x = torch.round(x)
    if copies:  # exact duplicates
        x[torch.randint(0, n, (n // 3,), generator=g)] = x[torch.randint(0, n, (n // 3,), generator=g)].clone()
    return x


def argmax_first(values, allowed):
    """Index of the largest value among ``allowed`` indices; ties → the lowest index."""
    best = None
    for i in allowed:
        if best is None or values[i] > values[best]:
            best = i
    return best


# -- DivPrune: farthest-first traversal ---------------------------------------------------------------
def divprune_reference(x, k):
    d = cosine_distance(x).tolist()
    n = len(d)
    nearest = [min(d[i][j] for j in range(n) if j != i) if n > 1 else 0.0 for i in range(n)]
    picked = [argmax_first(nearest, range(n))]
    while len(picked) < k:
        gap = [min(d[i][j] for j in picked) for i in range(n)]
        picked.append(argmax_first(gap, [i for i in range(n) if i not in picked]))
    return sorted(picked)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 7, 20, 47])
def test_divprune_matches_reference(seed, k):
    x = features(seed, 48, 12, ties=seed % 3 == 1, copies=seed % 3 == 2)
    sel = DivPrune(keep=k).select_projected(image_ctx(x, grids=[(6, 8)]))
    assert sel.keep.tolist() == divprune_reference(x, k)


# -- CDPruner: greedy DPP MAP by incremental Cholesky ----------------------------------------------------
def dpp_reference(kernel, k):
    """Chen et al.'s greedy MAP, one Python number at a time (float64)."""
    L = kernel.double().tolist()
    n = len(L)
    d2 = [L[i][i] for i in range(n)]
    floor = [max(v, 0.0) * 1e-9 for v in d2]
    c = []  # one row per update
    picked, degenerate = [], None
    for t in range(k):
        j = argmax_first(d2, [i for i in range(n) if i not in picked])
        picked.append(j)
        if degenerate is None and not d2[j] > floor[j]:
            degenerate = t
        if degenerate is None:
            e = [(L[j][i] - sum(row[j] * row[i] for row in c)) / math.sqrt(d2[j]) for i in range(n)]
            c.append(e)
            d2 = [d2[i] - e[i] * e[i] for i in range(n)]
    return picked, (k if degenerate is None else degenerate)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3, 8, 15])
def test_cdpruner_greedy_matches_reference(seed, k):
    x = features(seed, 30, 20)  # more dimensions than picks: the gains stay well apart
    xn = F.normalize(x, dim=-1)
    r = torch.rand(30, generator=torch.Generator().manual_seed(seed)) + 0.1
    kernel = r[:, None] * (xn @ xn.T) * r[None, :]
    picked, degenerate = greedy_dpp_map(kernel, k)
    ref_picked, ref_degenerate = dpp_reference(kernel, k)
    assert picked.tolist() == ref_picked
    assert int(degenerate) == ref_degenerate == k


@pytest.mark.parametrize("seed", range(4))
def test_cdpruner_greedy_matches_reference_past_the_rank(seed):
    """More picks than directions: the factorisation freezes at the same step, the picks before it agree
    (after it the reference's residuals and ours are both rounding noise)."""
    x = features(seed, 3, 6).repeat(5, 1)[torch.randperm(15, generator=torch.Generator().manual_seed(seed))]
    kernel = F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).T
    picked, degenerate = greedy_dpp_map(kernel, 6)
    ref_picked, ref_degenerate = dpp_reference(kernel, 6)
    assert int(degenerate) == ref_degenerate == 3
    assert picked.tolist()[:3] == ref_picked[:3]


@pytest.mark.parametrize("seed", range(4))
def test_cdpruner_greedy_freezes_like_the_reference(seed):
    """A gain that vanishes (relative to its item's own diagonal) freezes the factorisation for good, even
    when a later item's gain would pass its own floor: the picks after the freeze follow the frozen gains.
    Residuals here are ~1e-10, far above rounding noise, so the whole pick order is comparable."""
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    b, u = q[:, :3].T, q[:, 3:].T
    x = torch.stack([b[0], b[1], b[2],
                     b[0] + 2.2e-5 * u[0],  # relevance 1: residual ~5e-10 ≤ 1e-9 · 1 → the gains vanish
                     b[1] + 1e-4 * u[1],  # relevance 0.1: residual ~1e-10 > 1e-9 · 0.01
                     b[2] + 0.9e-4 * u[1] + 0.3e-4 * u[2],  # shares u[1] with the one before
                     b[0] + 0.5e-4 * u[3]])
    r = torch.tensor([1, 1, 1, 1, 0.1, 0.1, 0.1], dtype=torch.float64)
    xn = F.normalize(x, dim=-1)
    kernel = r[:, None] * (xn @ xn.T) * r[None, :]
    picked, degenerate = greedy_dpp_map(kernel, 7)
    assert (picked.tolist(), int(degenerate)) == dpp_reference(kernel, 7)
    assert int(degenerate) == 3 and picked.tolist()[4:] == [4, 5, 6]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [2, 9, 21])
def test_cdpruner_per_crop_matches_reference(seed, k):
    x = features(seed, 64, 24)
    text = features(seed + 10, 3, 24)
    m = CDPruner(keep=k, relevance="llm_embeddings")
    sel = m.select_projected(image_ctx(x, grids=[(4, 8), (4, 8)], slices=[slice(0, 32), slice(32, 64)], text=text))
    r = llm_relevance(x, text)  # normalised over both crops together, as the official code
    expected = []
    for sl, b in zip([slice(0, 32), slice(32, 64)], [(k + 1) // 2, k // 2]):  # equal split, remainder first
        if b:
            expected += [i + sl.start for i in dpp_reference(m.kernel(x[sl], r[sl]), b)[0]]
    assert sel.keep.tolist() == sorted(expected)


# -- VisPruner: walk the pairs by decreasing similarity ------------------------------------------------
def dedup_reference(x, score, target):
    r = x.shape[0]
    if target >= r:
        return list(range(r))
    xn = F.normalize(x.float(), dim=-1)
    sim = (xn @ xn.T).tolist()
    s = score.float().tolist()
    pairs = sorted(((i, j) for i in range(r) for j in range(i + 1, r)), key=lambda p: (-sim[p[0]][p[1]], p))
    alive = [True] * r
    drops = r - target
    for i, j in pairs:
        if drops == 0:
            break
        if alive[i] and alive[j]:
            alive[i if s[i] < s[j] else j] = False  # equal scores: the higher position goes
            drops -= 1
    return [i for i in range(r) if alive[i]]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("target", [1, 2, 5, 17, 39])
def test_vispruner_duplicate_removal_matches_reference(seed, target):
    ties = seed % 2 == 1
    x = features(seed, 40, 6, ties=ties, copies=seed % 4 == 2)
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 4, (40,), generator=g).float() if ties else torch.rand(40, generator=g)
    assert remove_duplicates(x, score, target).tolist() == dedup_reference(x, score, target)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [3, 10, 25, 60])
def test_vispruner_pairwise_matches_reference(seed, k):
    """dedup="pairwise", crop_budget="proportional" on two crops: the important half by [CLS] attention,
    the rest de-duplicated one pair at a time."""
    x = features(seed, 72, 8, ties=seed % 2 == 1)
    g = torch.Generator().manual_seed(seed)
    cls = torch.softmax(torch.randint(0, 3, (4, 72), generator=g).float(), -1)
    m = VisPruner(keep=k, dedup="pairwise", crop_budget="proportional")
    sel = m.select_vision(image_ctx(x, grids=[(6, 6)] * 2, slices=[slice(0, 36), slice(36, 72)], cls=cls))
    imp = cls.mean(0)
    expected = []
    for sl, b in zip([slice(0, 36), slice(36, 72)], split_budget(k, [36, 36])):
        n_imp = int(b * 0.5)
        ranked = sorted(range(sl.start, sl.stop), key=lambda i: (-float(imp[i]), i))
        important, residual = ranked[:n_imp], sorted(ranked[n_imp:])
        rest = torch.tensor(residual)
        expected += important + [residual[i] for i in dedup_reference(x[rest], imp[rest], b - n_imp)]
    assert sel.keep.tolist() == sorted(expected)


# -- VisPruner default: the official rounds (even positions lose their most duplicated, 8 per round) -------
def bipartite_reference(x, score, budget, ratio=0.5):
    """The official removal written token by token (inputs without ties: random floats)."""
    n = x.shape[0]
    if budget >= n:
        return list(range(n))
    n_imp = int(budget * ratio)
    diverse = budget - n_imp
    s = score.tolist()
    ranked = sorted(range(n), key=lambda i: -s[i])
    important, residual = ranked[:n_imp], ranked[n_imp:]
    xn = x / x.norm(dim=-1, keepdim=True)
    sim = (xn @ xn.T).tolist()
    while diverse > 0 and len(residual) > diverse:
        r = min(8, len(residual) - diverse, (len(residual) + 1) // 2)
        even, odd = residual[::2], residual[1::2]
        best = [max(sim[e][o] for o in odd) for e in even]
        by_score = sorted(range(len(even)), key=lambda i: -best[i])
        residual = [even[i] for i in by_score[r:]] + odd
    return sorted(important + (residual if diverse > 0 else []))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 3, 10, 25, 37, 60])
@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_vispruner_matches_reference(seed, k, ratio):
    """The default on two crops of different sizes (odd residual lists and tiny budgets included):
    equal crop budgets, the important share by [CLS] attention, the rest in the official rounds."""
    x = features(seed, 66, 8)
    g = torch.Generator().manual_seed(seed)
    cls = torch.softmax(torch.randn(4, 66, generator=g), -1)
    slices = [slice(0, 36), slice(36, 66)]
    sel = VisPruner(keep=k, important_ratio=ratio).select_vision(
        image_ctx(x, grids=[(6, 6), (5, 6)], slices=slices, cls=cls))
    imp = cls.mean(0)
    expected = []
    for sl, b in zip(slices, equal_budget(k, [36, 30])):
        expected += [i + sl.start for i in bipartite_reference(x[sl], imp[sl], b, ratio)]
    assert sel.keep.tolist() == sorted(expected)


def test_equal_budget():
    assert equal_budget(10, [36, 30]) == [5, 5]
    assert equal_budget(7, [36, 30, 30]) == [3, 2, 2]
    assert equal_budget(10, [2, 36, 30]) == [2, 4, 4]  # what a small crop cannot take goes to the others
    assert equal_budget(66, [36, 30]) == [36, 30]


# -- DART: pivots, then each pivot's least similar tokens ----------------------------------------------
def dart_reference(hidden, visual, text, keys, k, pivot_visual=4, pivot_text=4, eps=1e-6):
    norms = keys.float().abs().sum(dim=(0, 2))
    v = len(visual)
    xv = F.normalize(hidden[visual].float(), dim=-1)
    vis_order = sorted(range(v), key=lambda i: (-float(norms[visual[i]]), i))
    txt = sorted(text.tolist(), key=lambda t: (-float(norms[t]), t))[:min(pivot_text, len(text))]
    kept = []

    def duplicate(i):
        return any(float(xv[j] @ xv[i]) >= 1 - eps for j in kept)

    vis_piv = []
    for i in vis_order:
        if len(vis_piv) == min(pivot_visual, k):
            break
        if not duplicate(i):
            kept.append(i)
            vis_piv.append(i)
    pivots = torch.cat([xv[vis_piv], F.normalize(hidden[txt].float(), dim=-1)])
    sim = pivots @ xv.T
    rest, p = k - len(kept), pivots.shape[0]
    deferred = []
    for j in range(p):
        need = rest // p + (1 if j < rest % p else 0)
        for i in sorted(range(v), key=lambda i: (float(sim[j, i]), i)):
            if need == 0:
                break
            if i in kept or i in deferred:
                continue
            if duplicate(i):
                deferred.append(i)
                continue
            kept.append(i)
            need -= 1
    for i in deferred:
        if len(kept) == k:
            break
        kept.append(i)
    return sorted(kept)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 4, 9, 20, 35])
@pytest.mark.parametrize("pivots", [(4, 4), (1, 0), (0, 3), (6, 2)])
def test_dart_matches_reference(seed, k, pivots):
    g = torch.Generator().manual_seed(seed)
    v, before, after, dim = 36, 2, 5, 10
    hidden = torch.randn(before + v + after, dim, generator=g)
    if seed % 3 == 1:  # a few distinct tokens: pivots run out, cursors run out, duplicates taken last
        hidden[before:before + v] = hidden[before:before + 3][torch.randint(0, 3, (v,), generator=g)].clone()
    elif seed % 3 == 2:
        hidden[before:before + v] = torch.round(hidden[before:before + v])
    keys = torch.randint(0, 3, (2, before + v + after, 4), generator=g).float()  # ties in the key norms
    visual = torch.arange(before, before + v)
    text = torch.arange(before + v, before + v + after)
    # the reference: exact budget, pivots in key-norm order, duplicates passed over, raw hidden states
    m = DART(keep=k, pivot_visual=pivots[0], pivot_text=pivots[1], budget_rule="exact", pivot_order="norm",
             duplicate_eps=1e-6, similarity="raw")
    sel = m.select_llm(llm_ctx(hidden, visual, text, keys=keys))
    assert sel.keep.tolist() == dart_reference(hidden, visual, text, keys, k, *pivots)


# -- HiPrune: anchors, their grid neighbours, then fill tokens ----------------------------------------
def hiprune_reference(glob, deep, rows, cols, budget, alpha):
    n_anchor = int(round(budget * alpha / 5))
    anchors = sorted(range(rows * cols), key=lambda c: (-float(glob[c]), c))[:n_anchor]
    chosen = []
    for a in anchors:
        r, c = divmod(a, cols)
        for cell, ok in ((a, True), (a - cols, r > 0), (a + cols, r < rows - 1), (a - 1, c > 0), (a + 1, c < cols - 1)):
            if ok and cell not in chosen and len(chosen) < budget:
                chosen.append(cell)
    rest = sorted((i for i in range(rows * cols) if i not in chosen), key=lambda i: (-float(deep[i]), i))
    return sorted(chosen + rest[:budget - len(chosen)]), len(chosen)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 6, 13, 30, 62])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_hiprune_matches_reference(seed, k, alpha):
    g = torch.Generator().manual_seed(seed)
    rows, cols, crops = 6, 7, 2
    n = rows * cols
    att = torch.softmax(torch.randint(0, 3, (crops, 2, n + 1, n + 1), generator=g).float(), -1)
    deep = torch.randint(0, 5, (n * crops,), generator=g).float()
    slices = [slice(0, n), slice(n, 2 * n)]
    ctx = image_ctx(torch.randn(n * crops, 4, generator=g), grids=[(rows, cols)] * crops, slices=slices,
                    received=deep, vattn={8: att})
    # the reference takes true grid neighbours and splits the budget in proportion (the corrected behaviour)
    sel = HiPrune(keep=k, alpha=alpha, neighbours="grid", crop_budget="proportional").select_vision(ctx)
    expected, counts = [], []
    for c, (sl, b) in enumerate(zip(slices, split_budget(k, [n, n]))):
        if b == 0:
            continue
        glob = att[c].mean(0).mean(0)[1:]
        keep, n_chosen = hiprune_reference(glob, deep[sl], rows, cols, b, alpha)
        expected += [i + sl.start for i in keep]
        counts.append(b - n_chosen)
    assert sel.keep.tolist() == sorted(expected)
    assert sel.info["anchors_buffers_fill"][:, 2].tolist() == counts

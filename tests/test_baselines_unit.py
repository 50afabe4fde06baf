"""Unit tests of the baseline methods on hand-built contexts (no models): VisionZip, VisPruner, HiPrune,
DivPrune, CDPruner, PyramidDrop, DART, SparseVLM."""
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from vtprune.errors import ArgumentError, BudgetError, UnsupportedMethodError
from vtprune.methods import make_method
from vtprune.methods.base import ImageContext, LLMContext
from vtprune.methods.cdpruner import CDPruner, clip_relevance, equal_split, greedy_dpp_map, llm_relevance, log_det
from vtprune.methods.dart import DART
from vtprune.methods.divprune import DivPrune
from vtprune.methods.hiprune import HiPrune
from vtprune.methods.pyramiddrop import PyramidDrop
from vtprune.methods.sparsevlm import SparseVLM, dpc_knn
from vtprune.methods.visionzip import VisionZip
from vtprune.methods.vispruner import VisPruner

from tiny_models import tiny_clip_checkpoint

VISION = ["visionzip", "vispruner", "hiprune"]
PROJECTED = ["divprune", "cdpruner"]
LLM = ["pyramiddrop", "dart", "sparsevlm"]
#: arguments for an exact final budget (SparseVLM's default follows the paper's layer-averaged table)
EXACT = {"dart": {"budget_rule": "exact"}, "pyramiddrop": {"layers": (2, 3, 4)},
         "sparsevlm": {"layers": (2, 3, 4), "schedule": None, "recycled_count": "within"}}


# -- context builders --------------------------------------------------------------------------------
def image_ctx(features, grids=None, slices=None, family="llava", cls=None, received=None, vattn=None,
              text=None, extra=0, keys=None):
    n = features.shape[0]
    grids = grids or [(int(math.isqrt(n)), int(math.isqrt(n)))]
    slices = slices or [slice(0, n)]
    providers = {}
    if cls is not None:
        providers["cls_attention"] = lambda: cls
    if received is not None:
        providers["received_attention"] = lambda: received
    if vattn is not None:
        providers["vision_attention"] = lambda layer: vattn[layer]
    if text is not None:
        providers["text_embeddings"] = lambda: text
    if keys is not None:
        providers["keys"] = lambda: keys
    return ImageContext(features=features, grids=grids, crop_slices=slices, family=family, image_index=0,
                        extra=extra, providers=providers)


def random_image_ctx(n_side=8, dim=32, family="llava", seed=0, text_tokens=5, crops=1):
    g = torch.Generator().manual_seed(seed)
    n = n_side * n_side * crops
    feats = torch.randn(n, dim, generator=g)
    cls = torch.cat([torch.softmax(torch.randn(4, n_side * n_side, generator=g), -1) for _ in range(crops)], 1)
    k = n_side * n_side + 1
    vattn = {8: torch.softmax(torch.randn(crops, 4, k, k, generator=g), -1)}
    received = torch.rand(n, generator=g)
    text = torch.randn(text_tokens, dim, generator=g)
    qwen = family.startswith("qwen")
    slices = [slice(i * n_side * n_side, (i + 1) * n_side * n_side) for i in range(crops)]
    keys = torch.randn(4, n, 8, generator=g)  # drawn last: the draws above stay those of older goldens
    return image_ctx(feats, grids=[(n_side, n_side)] * crops, slices=slices, family=family,
                     cls=None if qwen else cls, received=received, vattn=None if qwen else vattn, text=text,
                     keys=None if qwen else keys)


def llm_ctx(hidden, visual, text_after, attention=None, keys=None, stage=0, layer=2, original=None,
            family="llava", embeddings=None):
    providers = {"input_embeddings": lambda: embeddings if embeddings is not None else
                 (hidden[visual], hidden[text_after])}
    if attention is not None:
        providers["attention"] = lambda rows: attention[:, torch.as_tensor(rows)]
        providers["layer_attention"] = lambda rows: attention[:, torch.as_tensor(rows)]  # same map here
    providers["final_norm"] = lambda x: x  # a norm without weight: cosine similarities unchanged
    if keys is not None:
        providers["keys"] = lambda: keys
    return LLMContext(hidden=hidden, visual=visual, text_after=text_after, layer=layer, stage_index=stage,
                      family=family, original_visual=original if original is not None else len(visual),
                      providers=providers)


def random_llm_sample(v=48, before=3, after=6, dim=32, heads=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    length = before + v + after
    hidden = torch.randn(length, dim, generator=g)
    scores = torch.randn(heads, length, length, generator=g)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    attention = torch.softmax(scores.masked_fill(~causal, -float("inf")), -1)
    keys = torch.randn(2, length, 8, generator=g)
    visual = torch.arange(before, before + v)
    text = torch.arange(before + v, length)
    return hidden, visual, text, attention, keys


def run_llm(method, hidden, visual, text, attention, keys, family="llava"):
    """Run every stage of an LLM method, shrinking the candidates as the pipeline would. Returns the
    selections and the visual positions left after each stage."""
    current, sels, lefts = visual, [], []
    for s, layer in enumerate(method.llm_layers):
        ctx = llm_ctx(hidden, current, text, attention, keys, stage=s, layer=layer, original=len(visual),
                      family=family, embeddings=(hidden[visual], hidden[text]))
        sel = method.select_llm(ctx)
        sels.append(sel)
        current = current[sel.keep]
        lefts.append(current)
    return sels, lefts


def select(method, ctx):
    if method.stages[0].value == "vision":
        return method.select_vision(ctx)
    return method.select_projected(ctx)


def assert_valid(sel, n, k=None):
    keep = sel.keep
    assert keep.dtype == torch.long
    assert keep.numel() == torch.unique(keep).numel()
    assert bool((keep[1:] > keep[:-1]).all())
    assert keep.numel() == 0 or (int(keep.min()) >= 0 and int(keep.max()) < n)
    if k is not None:
        assert keep.numel() == k
    if sel.values is not None:
        assert sel.values.shape[0] == keep.numel()


def cls_tokens(method, ctx):
    """Tokens of the budget that are not candidates: each crop's [CLS], where the method forwards it."""
    return len(ctx.crop_slices) if method.forwards_cls else 0


def min_pairwise_distance(x, idx):
    xn = F.normalize(x[idx].float(), dim=-1)
    d = 1 - xn @ xn.T
    d.fill_diagonal_(float("inf"))
    return float(d.min())


# -- every method: exact budget, valid and deterministic ---------------------------------------------
@pytest.mark.parametrize("name", VISION + PROJECTED)
@pytest.mark.parametrize("keep", [1, 7, 16, 40])
def test_image_methods_exact_budget_and_deterministic(name, keep):
    method = make_method(name, keep=keep)
    first = select(method, random_image_ctx(seed=keep))
    again = select(make_method(name, keep=keep), random_image_ctx(seed=keep))
    assert_valid(first, 64, keep - cls_tokens(method, random_image_ctx()))
    assert torch.equal(first.keep, again.keep)
    if first.values is not None:
        assert torch.equal(first.values, again.values)


@pytest.mark.parametrize("name", VISION + PROJECTED)
def test_image_methods_per_crop_budget(name):
    """Two crops (LLaVA-NeXT): exact total; per-crop methods split it in proportion to crop sizes
    (HiPrune's official split is keep // crops per crop: see test_hiprune_equal_crop_budget_*)."""
    ctx = random_image_ctx(family="llava_next", crops=2, seed=3)
    method = make_method(name, keep=21, **({"crop_budget": "proportional"} if name == "hiprune" else {}))
    sel = select(method, ctx)
    cls = cls_tokens(method, ctx)
    assert_valid(sel, 128, 21 - cls)
    if name != "divprune":  # DivPrune ranks all crops together
        per_crop = [int((sel.keep < 64).sum()) + cls // 2, int((sel.keep >= 64).sum()) + cls // 2]
        assert sorted(per_crop) == [10, 11]


@pytest.mark.parametrize("name", VISION + PROJECTED)
def test_image_methods_ratio_and_bad_budgets(name):
    method = make_method(name, ratio=0.25)
    sel = select(method, random_image_ctx())
    assert sel.keep.numel() + cls_tokens(method, random_image_ctx()) == 16
    with pytest.raises(BudgetError):
        select(make_method(name, keep=64), random_image_ctx())
    with pytest.raises(BudgetError):
        make_method(name, keep=0)


@pytest.mark.parametrize("name", LLM)
@pytest.mark.parametrize("keep", [1, 5, 12])
def test_llm_methods_exact_final_budget_and_deterministic(name, keep):
    hidden, visual, text, attention, keys = random_llm_sample(seed=keep)
    method = make_method(name, keep=keep, **EXACT[name])
    sels, lefts = run_llm(method, hidden, visual, text, attention, keys)
    sels2, _ = run_llm(make_method(name, keep=keep, **EXACT[name]), hidden, visual, text, attention, keys)
    sizes = [len(visual)] + [len(x) for x in lefts]
    for sel, n, sel2 in zip(sels, sizes, sels2):
        assert_valid(sel, n)
        assert torch.equal(sel.keep, sel2.keep)
    assert len(lefts[-1]) == keep
    assert all(a >= b for a, b in zip(sizes, sizes[1:]))


@pytest.mark.parametrize("name", LLM)
def test_llm_methods_work_on_qwen(name):
    hidden, visual, text, attention, keys = random_llm_sample(seed=7)
    method = make_method(name, keep=9, **EXACT[name])
    _, lefts = run_llm(method, hidden, visual, text, attention, keys, family="qwen2_5_vl")
    assert len(lefts[-1]) == 9


# -- VisionZip -----------------------------------------------------------------------------------------
def test_visionzip_paper_splits():
    m = VisionZip(keep=64)
    assert m.split(64) == (54, 10) and m.split(128) == (108, 20) and m.split(192) == (162, 30)


def test_visionzip_official_default_forwards_cls_groups_by_keys_and_adds_the_target():
    torch.manual_seed(0)
    n, k = 64, 16
    feats, keys = torch.randn(n, 24), torch.randn(4, n, 6)
    cls = torch.softmax(torch.randn(4, n) * 3, -1)
    method = VisionZip(keep=k)
    sel = method.select_vision(image_ctx(feats, cls=cls, keys=keys))
    assert method.forwards_cls and method.split(k) == (14, 2)
    assert_valid(sel, n, k - 1)  # 13 dominant patches + 2 contextual; the [CLS] is the 16th token
    dominant = torch.sort(torch.sort(cls.sum(0), descending=True, stable=True).indices[:13]).values
    remaining = torch.tensor([i for i in range(n) if i not in set(dominant.tolist())])
    targets = remaining[torch.arange(0, len(remaining), len(remaining) // 2)[:2]]
    assert torch.equal(sel.keep, torch.sort(torch.cat([dominant, targets])).values)
    pos = {int(i): j for j, i in enumerate(sel.keep)}
    metric = keys.mean(0)
    members = {int(t): [] for t in targets}
    for i in remaining.tolist():
        if i not in members:
            sims = torch.stack([F.cosine_similarity(metric[i], metric[t], dim=0) for t in targets])
            members[int(targets[int(torch.argmax(sims))])].append(i)
    for t, group in members.items():
        want = feats[t] + (feats[group].mean(0) if group else 0)
        assert torch.allclose(sel.values[pos[t]], want, atol=1e-5)


def test_visionzip_needs_a_token_per_crop_for_its_cls():
    ctx = random_image_ctx(family="llava_next", crops=3, seed=1)
    with pytest.raises(BudgetError, match="crops"):
        VisionZip(keep=2).select_vision(ctx)
    assert VisionZip(keep=3).select_vision(ctx).keep.numel() == 0  # three [CLS] tokens, no patch
    assert VisionZip(keep=2, forward_cls=False).select_vision(ctx).keep.numel() == 2


def test_visionzip_paper_variant_dominant_and_contextual_groups():
    """forward_cls=False, metric="features", merge="mean": b patches, groups by features, group means."""
    torch.manual_seed(0)
    n, k = 64, 16
    feats = torch.randn(n, 24)
    cls = torch.softmax(torch.randn(4, n) * 3, -1)
    method = VisionZip(keep=k, forward_cls=False, metric="features", merge="mean")
    sel = method.select_vision(image_ctx(feats, cls=cls))
    assert_valid(sel, n, k)
    n_dom, n_ctx = method.split(k)
    assert (n_dom, n_ctx) == (14, 2)
    dominant = torch.sort(torch.sort(cls.sum(0), descending=True, stable=True).indices[:n_dom]).values
    remaining = torch.tensor([i for i in range(n) if i not in set(dominant.tolist())])
    step = len(remaining) // n_ctx
    targets = remaining[torch.arange(0, len(remaining), step)[:n_ctx]]
    assert torch.equal(sel.keep, torch.sort(torch.cat([dominant, targets])).values)
    # dominant tokens keep their own features
    pos = {int(i): j for j, i in enumerate(sel.keep)}
    for i in dominant.tolist():
        assert torch.equal(sel.values[pos[i]], feats[i])
    # each contextual token is the average of its group (target + the tokens most similar to it)
    others = [i for i in remaining.tolist() if i not in set(targets.tolist())]
    groups = {int(t): [int(t)] for t in targets}
    for i in others:
        sims = torch.stack([F.cosine_similarity(feats[i], feats[t], dim=0) for t in targets])
        groups[int(targets[int(torch.argmax(sims))])].append(i)
    assert sum(len(g) for g in groups.values()) == n - n_dom
    for t, members in groups.items():
        assert torch.allclose(sel.values[pos[t]], feats[members].mean(0), atol=1e-5)


def test_visionzip_refuses_qwen():
    with pytest.raises(UnsupportedMethodError, match="qwen2_5_vl"):
        VisionZip(keep=8).check_family("qwen2_5_vl")
    with pytest.raises(UnsupportedMethodError, match="CLS|merger"):
        VisionZip(keep=8).select_vision(random_image_ctx(family="qwen3_vl"))


def test_visionzip_uses_each_crops_own_cls_row():
    ctx = random_image_ctx(family="llava_next", crops=2, seed=5)
    cls = ctx.cls_attention
    sel = VisionZip(keep=20, contextual_ratio=0.0, forward_cls=False).select_vision(ctx)
    top0 = torch.sort(cls[:, :64].sum(0), descending=True, stable=True).indices[:10]
    top1 = torch.sort(cls[:, 64:].sum(0), descending=True, stable=True).indices[:10] + 64
    assert torch.equal(sel.keep, torch.sort(torch.cat([top0, top1])).values)


# -- VisPruner -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dedup", ["bipartite", "pairwise"])
def test_vispruner_important_then_no_near_duplicates(dedup):
    torch.manual_seed(1)
    n, dim = 64, 48
    base = F.normalize(torch.randn(n, dim), dim=-1)
    feats = base.clone()
    # eight near-duplicate groups of three among the low-attention tokens
    for g in range(8):
        src = 20 + 5 * g
        for d in (1, 2):
            feats[src + d] = base[src] + 1e-3 * torch.randn(dim)
    cls = torch.full((4, n), 1e-3)
    cls[:, :16] = torch.linspace(1, 0.5, 16)  # tokens 0..15 are the most attended
    cls = cls / cls.sum(-1, keepdim=True)
    sel = VisPruner(keep=32, dedup=dedup).select_vision(image_ctx(feats, cls=cls))
    assert_valid(sel, n, 32)
    kept = set(sel.keep.tolist())
    assert set(range(16)) <= kept  # important ratio 0.5 → the 16 most attended
    if dedup == "bipartite":  # the official rounds: no guarantee against a kept pair of near-duplicates
        return
    xn = F.normalize(feats, dim=-1)
    sim = xn @ xn.T
    sim.fill_diagonal_(-1)
    residual = [i for i in range(16, n)]
    dropped_distinct = [i for i in residual if i not in kept and float(sim[i, residual].max()) < 0.9]
    kept_dups = [(i, j) for i, j in itertools.combinations(sorted(kept - set(range(16))), 2) if sim[i, j] > 0.99]
    assert not (dropped_distinct and kept_dups)
    # here 48 residual tokens hold 32 distinct directions: the 16 diverse slots must not be wasted on copies
    assert not kept_dups


def test_vispruner_crop_budgets():
    """LLaVA-NeXT: the official code gives every crop the same budget; crop_budget="proportional" splits
    it by the crops' token counts."""
    ctx = random_image_ctx(family="llava_next", crops=2, seed=3)
    small = image_ctx(ctx.features[:100], grids=[(8, 8), (6, 6)], slices=[slice(0, 64), slice(64, 100)],
                      family="llava_next", cls=ctx.cls_attention[:, :100])
    equal = VisPruner(keep=20).select_vision(small)
    assert equal.info["important_diverse"] == [(5, 5), (5, 5)]
    proportional = VisPruner(keep=20, crop_budget="proportional").select_vision(small)
    assert proportional.info["important_diverse"] == [(6, 7), (3, 4)]
    for sel in (equal, proportional):
        assert_valid(sel, 100, 20)


def test_vispruner_rejects_unknown_choices():
    with pytest.raises(ArgumentError):
        VisPruner(keep=8, dedup="greedy")
    with pytest.raises(ArgumentError):
        VisPruner(keep=8, crop_budget="even")


@pytest.mark.parametrize("name", PROJECTED)
def test_projected_methods_work_on_qwen(name):
    ctx = random_image_ctx(family="qwen3_vl", seed=4)
    sel = make_method(name, keep=12).select_projected(ctx)
    assert_valid(sel, 64, 12)


def test_vispruner_uses_received_attention_on_qwen():
    ctx = random_image_ctx(family="qwen2_5_vl", seed=2)
    with pytest.raises(UnsupportedMethodError):
        ctx.cls_attention
    sel = VisPruner(keep=20).select_vision(ctx)
    assert_valid(sel, 64, 20)
    top = torch.sort(ctx.received_attention, descending=True, stable=True).indices[:10]
    assert set(top.tolist()) <= set(sel.keep.tolist())


# -- HiPrune -------------------------------------------------------------------------------------------
def hiprune_ctx(anchor_cells, rows=8, cols=8, fill_cells=(), family="llava"):
    n = rows * cols
    torch.manual_seed(0)
    glob = torch.full((n,), 0.1) + 0.01 * torch.rand(n)
    for rank, c in enumerate(anchor_cells):
        glob[c] = 10.0 - rank
    k = n + 1  # [CLS] first
    att = torch.full((1, 4, k, k), 1e-3)
    att[0, :, :, 1:] = glob  # every query looks at the patches like this
    att = att / att.sum(-1, keepdim=True)
    received = torch.linspace(0.1, 0.01, n)  # distinct, decreasing with the index
    for rank, c in enumerate(fill_cells):
        received[c] = 5.0 - 0.1 * rank
    return image_ctx(torch.randn(n, 16), grids=[(rows, cols)], family=family, received=received,
                     vattn={8: att}, cls=torch.softmax(torch.randn(4, n), -1))


def test_hiprune_keeps_anchor_neighbours_without_wrapping():
    interior, corner, right_edge = 3 * 8 + 4, 0, 2 * 8 + 7
    ctx = hiprune_ctx([interior, corner, right_edge], fill_cells=[60, 61, 62, 63, 50])
    # alpha 0.75 with budget 20 → round(20 · 0.75 / 5) = 3 anchors
    sel = HiPrune(keep=20, alpha=0.75, neighbours="grid").select_vision(ctx)
    assert_valid(sel, 64, 20)
    kept = set(sel.keep.tolist())
    assert {interior, interior - 8, interior + 8, interior - 1, interior + 1} <= kept
    assert {corner, 1, 8} <= kept
    assert {right_edge, right_edge - 8, right_edge + 8, right_edge - 1} <= kept
    assert right_edge + 1 not in kept  # no wrap-around to the next row's first cell
    assert sel.info["anchors_buffers_fill"].tolist() == [[3, 4 + 2 + 3, 20 - 12]]
    # fill tokens: the top received-attention tokens among the rest (5 marked, then the lowest indices)
    anchors_buffers = {interior, interior - 8, interior + 8, interior - 1, interior + 1, corner, 1, 8,
                       right_edge, right_edge - 8, right_edge + 8, right_edge - 1}
    rest = [i for i in range(64) if i not in anchors_buffers and i not in {60, 61, 62, 63, 50}]
    assert kept == anchors_buffers | {60, 61, 62, 63, 50} | set(rest[:3])


def test_hiprune_official_neighbours_wrap_and_clamp():
    interior, corner, right_edge = 3 * 8 + 4, 0, 2 * 8 + 7
    ctx = hiprune_ctx([interior, corner, right_edge], fill_cells=[60, 61, 62, 63, 50])
    sel = HiPrune(keep=20, alpha=0.75).select_vision(ctx)  # neighbours="official" (the default)
    assert_valid(sel, 64, 20)
    kept = set(sel.keep.tolist())
    # i ± 1 and i ± 8 clamped to 0..63: the corner's -1 / -8 land on 0 itself, the right edge's +1 wraps to 24
    anchors_buffers = {interior, interior - 8, interior + 8, interior - 1, interior + 1, corner, 1, 8,
                       right_edge, right_edge - 8, right_edge + 8, right_edge - 1, right_edge + 1}
    assert right_edge + 1 == 3 * 8  # the first cell of the next row
    assert anchors_buffers <= kept
    assert sel.info["anchors_buffers_fill"].tolist() == [[3, 10, 7]]


def test_hiprune_equal_crop_budget_is_the_official_split():
    ctx = random_image_ctx(crops=3)
    assert HiPrune(keep=20).select_vision(ctx).keep.numel() == 18  # 20 // 3 per crop
    sel = HiPrune(keep=20, crop_budget="proportional").select_vision(ctx)
    assert sel.keep.numel() == 20


def test_hiprune_default_alpha_and_layer():
    m = HiPrune(keep=192)
    assert m.alpha == 0.1 and m.attention_layers == (8,)
    ctx = hiprune_ctx([27])
    sel = HiPrune(keep=30).select_vision(ctx)  # round(30 · 0.1 / 5) = 1 anchor
    assert {27, 19, 35, 26, 28} <= set(sel.keep.tolist())


def test_hiprune_refuses_qwen_and_partial_grids():
    ctx = random_image_ctx(family="qwen2_5_vl")
    with pytest.raises(UnsupportedMethodError, match="hiprune"):
        HiPrune(keep=10).select_vision(ctx)
    partial = image_ctx(torch.randn(60, 8), grids=[(8, 8)], slices=[slice(0, 60)],
                        received=torch.rand(60), vattn={8: torch.rand(1, 4, 65, 65)})
    with pytest.raises(UnsupportedMethodError, match="full patch grid"):
        HiPrune(keep=10).select_vision(partial)


# -- DivPrune ------------------------------------------------------------------------------------------
def clustered(n_clusters=8, per=8, dim=32, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_clusters, dim, generator=g), dim=-1)
    x = centres.repeat_interleave(per, 0) + spread * torch.randn(n_clusters * per, dim, generator=g)
    return x


def test_divprune_is_more_diverse_than_topk_and_random():
    x = clustered()
    # make the norms favour one cluster, so "top-K by norm" piles up there
    x[:8] *= 3
    sel = DivPrune(keep=8).select_projected(image_ctx(x, text=torch.randn(3, 32)))
    assert_valid(sel, 64, 8)
    assert sorted(int(i) // 8 for i in sel.keep) == list(range(8))  # one token per cluster
    ours = min_pairwise_distance(x, sel.keep)
    topk = torch.sort(x.norm(dim=-1), descending=True, stable=True).indices[:8]
    assert ours > min_pairwise_distance(x, topk)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert ours > min_pairwise_distance(x, torch.randperm(64, generator=g)[:8])
    assert float(sel.info["min_pairwise_distance"]) == pytest.approx(ours, abs=1e-5)


def test_divprune_matches_brute_force_farthest_first():
    torch.manual_seed(3)
    x = torch.randn(12, 6)
    k = 5
    xn = F.normalize(x, dim=-1)
    d = 1 - xn @ xn.T
    off = d.clone().fill_diagonal_(float("inf"))
    chosen = [int(torch.argmax(off.min(1).values))]
    while len(chosen) < k:
        rest = [i for i in range(12) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(float(d[i, j]) for j in chosen), -i)))
    sel = DivPrune(keep=k).select_projected(image_ctx(x))
    assert sel.keep.tolist() == sorted(chosen)


# -- CDPruner ------------------------------------------------------------------------------------------
def brute_greedy_map(kernel, k):
    chosen = []
    for _ in range(k):
        best, arg = -math.inf, None
        for i in range(kernel.shape[0]):
            if i in chosen:
                continue
            val = log_det(kernel, torch.tensor(chosen + [i]))
            if val > best + 1e-12:
                best, arg = val, i
        chosen.append(arg)
    return chosen


def test_cdpruner_without_relevance_is_plain_dpp_greedy_map():
    torch.manual_seed(4)
    x = torch.randn(9, 5)
    k = 4
    sel = CDPruner(keep=k, relevance="off").select_projected(image_ctx(x, grids=[(3, 3)], text=torch.randn(2, 5)))
    xn = F.normalize(x, dim=-1)
    kernel = xn @ xn.T
    assert sel.keep.tolist() == sorted(brute_greedy_map(kernel, k))
    assert sel.info["relevance"] == "off"


def test_cdpruner_finds_exact_map_on_clusters():
    x = clustered(n_clusters=3, per=3, dim=8, spread=0.02, seed=1)
    sel = CDPruner(keep=3, relevance="off").select_projected(image_ctx(x, grids=[(3, 3)]))
    xn = F.normalize(x, dim=-1)
    kernel = xn @ xn.T
    best = max(itertools.combinations(range(9), 3), key=lambda s: log_det(kernel, torch.tensor(s)))
    assert sel.keep.tolist() == list(best)


def test_cdpruner_conditional_kernel_matches_brute_force_and_follows_instruction():
    torch.manual_seed(5)
    x = torch.randn(10, 6)
    text = x[7:8] + 0.01 * torch.randn(1, 6)  # the instruction points at token 7
    k = 4
    m = CDPruner(keep=k, relevance="llm_embeddings")
    sel = m.select_projected(image_ctx(x, grids=[(2, 5)], text=text))
    assert sel.info["relevance"] == "llm_embeddings"
    xn = F.normalize(x, dim=-1)
    r = (xn @ F.normalize(text, dim=-1).T).mean(1)
    r = (r - r.min() + 1e-6) / (r.max() - r.min())
    kernel = r[:, None] * (xn @ xn.T) * r[None, :]
    assert torch.allclose(m.kernel(x, llm_relevance(x, text)), kernel, atol=1e-6)
    assert sel.keep.tolist() == sorted(brute_greedy_map(kernel, k))
    assert 7 in sel.keep.tolist()
    picked, _ = greedy_dpp_map(kernel, k)
    assert int(picked[0]) == 7  # the most relevant token has the largest diagonal


def test_cdpruner_rank_exhausted_still_returns_budget():
    x = torch.randn(3, 4).repeat(6, 1)  # 18 tokens, rank 3
    sel = CDPruner(keep=5, relevance="off").select_projected(image_ctx(x, grids=[(3, 6)]))
    assert_valid(sel, 18, 5)
    assert sel.info["degenerate_after"].tolist() == [3]  # a tensor: converted where it is read
    picked, deg = greedy_dpp_map(F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).T, 5)
    assert int(deg) == 3
    _, never = greedy_dpp_map(torch.eye(6), 4)
    assert int(never) == 4  # the gains never vanished: the number of picks
    assert sorted(int(i) % 3 for i in picked[:3]) == [0, 1, 2]  # one of each direction first


def test_cdpruner_default_without_text_encoder_says_it_is_not_the_official_relevance():
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    m = CDPruner(keep=4)
    with pytest.warns(UserWarning, match="llm_embeddings"):
        sel = m.select_projected(image_ctx(x, grids=[(4, 4)], text=torch.randn(3, 6)))
    assert sel.info["relevance"] == "llm_embeddings" and m.relevance_source == "llm_embeddings"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per instance
        m.select_projected(image_ctx(x, grids=[(4, 4)], text=torch.randn(3, 6)))


def test_cdpruner_arguments():
    with pytest.raises(ArgumentError, match="text_encoder"):
        CDPruner(keep=4, relevance="clip_text")
    with pytest.raises(ArgumentError, match="only used by"):
        CDPruner(keep=4, relevance="off", text_encoder="/nowhere")
    with pytest.raises(ArgumentError):
        CDPruner(keep=4, relevance=True)
    with pytest.raises(ArgumentError):
        CDPruner(keep=4, clip_sign=0)
    with pytest.raises(ArgumentError, match="CLIP vision tower"):
        CDPruner(keep=4, text_encoder="/nowhere").bind("qwen2_5_vl", 4)


def test_cdpruner_clip_relevance_is_the_negated_normalised_cosine():
    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(10, 8, generator=g), torch.randn(2, 8, generator=g)
    cos = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    r = -cos.mean(1)
    assert torch.allclose(clip_relevance(image, text), (r - r.min() + 1e-6) / (r.max() - r.min()))
    r = cos.mean(1)
    assert torch.allclose(clip_relevance(image, text, sign=1), (r - r.min() + 1e-6) / (r.max() - r.min()))


def test_cdpruner_crop_budgets():
    assert equal_split(160, [576] * 5) == [32] * 5
    assert equal_split(7, [4, 4, 4]) == [3, 2, 2]
    assert equal_split(10, [1, 8, 8]) == [1, 5, 4]  # a small crop passes its share on
    assert CDPruner(keep=10, crop_budget="proportional").crop_budgets(10, [2, 8]) == [2, 8]
    assert CDPruner(keep=10).crop_budgets(10, [4, 16]) == [4, 6]


def test_cdpruner_clip_text_relevance_from_a_checkpoint(tmp_path):
    """text_encoder=PATH: the image embeddings are post_layernorm + visual_projection of the feature layer's
    tokens, the text embeddings the text tower's text_embeds of 8-position segments (this checkpoint's
    max_position_embeddings), right-padded with id 0; the relevance is their negated, normalised cosine."""
    from transformers import CLIPModel, CLIPTokenizerFast

    path = tiny_clip_checkpoint(tmp_path)
    m = CDPruner(keep=5, text_encoder=str(path), tokenizer=str(path))  # the CLIP tokenizer stands for the LLM's
    m.load_text_encoder()
    clip_model, tok = CLIPModel.from_pretrained(path).eval(), CLIPTokenizerFast.from_pretrained(path)
    question = "what color is the car?"
    ids = tok(question, add_special_tokens=False, return_tensors="pt").input_ids[0]
    g = torch.Generator().manual_seed(1)
    vision, projected = torch.randn(16, 32, generator=g), torch.randn(16, 24, generator=g)
    ctx = image_ctx(projected, grids=[(4, 4)], text=torch.randn(3, 24))
    ctx._lazy._providers["vision_features"] = lambda: vision
    ctx._lazy._providers["instruction_ids"] = lambda: ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the official relevance ran: no warning
        sel = m.select_projected(ctx)
    assert sel.info["relevance"] == "clip_text"
    with torch.no_grad():
        image_embeds = clip_model.visual_projection(clip_model.vision_model.post_layernorm(vision))
        t = tok(question, return_tensors="pt")
        pad = -t.input_ids.shape[1] % 8
        segments = {k: torch.cat([v, v.new_zeros(1, pad)], 1).reshape(-1, 8) for k, v in t.items()}
        assert segments["input_ids"].shape[0] > 1  # the question fills more than one segment
        text_embeds = clip_model.get_text_features(**segments)
        text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
    r = clip_relevance(image_embeds, text_embeds)
    expected, _ = greedy_dpp_map(r[:, None] * (F.normalize(projected, dim=-1) @ F.normalize(projected, dim=-1).T)
                                 * r[None, :], 5)
    assert sel.keep.tolist() == sorted(expected.tolist())
    assert m.clip.instruction_text(ids) == tok.decode(ids, skip_special_tokens=True).strip()


# -- PyramidDrop ---------------------------------------------------------------------------------------
def test_pyramiddrop_default_halves_per_stage_and_ranks_by_last_token():
    hidden, visual, text, attention, keys = random_llm_sample(v=64, seed=2)
    m = PyramidDrop(layers=(2, 4, 6))
    assert m.lam == 0.5 and PyramidDrop().llm_layers == (8, 16, 24)
    sels, lefts = run_llm(m, hidden, visual, text, attention, keys)
    assert [len(x) for x in lefts] == [32, 16, 8]
    last = attention[:, -1].mean(0)
    current = visual
    for sel, left in zip(sels, lefts):
        expect = torch.sort(torch.sort(last[current], descending=True, stable=True).indices[:len(left)]).values
        assert torch.equal(sel.keep, expect)
        current = left


def test_pyramiddrop_keep_budget_schedule():
    m = PyramidDrop(keep=8, layers=(2, 4, 6))
    assert m.stage_counts(64) == [32, 16, 8]
    m = PyramidDrop(keep=64, layers=(2, 4, 6))
    counts = m.stage_counts(576)
    assert counts[-1] == 64 and counts == sorted(counts, reverse=True)
    assert PyramidDrop(lam=0.25, layers=(2, 4, 6)).stage_counts(64) == [16, 4, 1]
    with pytest.raises(BudgetError):
        PyramidDrop(keep=8, lam=0.5)
    lam = PyramidDrop.lam_for_average(192, visual=576, num_layers=32)
    avg = (8 * 576 + 8 * 576 * lam + 8 * 576 * lam ** 2 + 8 * 576 * lam ** 3) / 32
    assert avg == pytest.approx(192, rel=1e-6)


# -- DART ----------------------------------------------------------------------------------------------
def test_dart_never_keeps_identical_tokens_while_a_distinct_one_is_dropped():
    torch.manual_seed(6)
    v, before, after, dim = 40, 2, 6, 24
    length = before + v + after
    hidden = torch.randn(length, dim)
    # visual tokens 10..19 are five pairs of identical tokens; 30..34 are copies of 30
    for a in range(10, 20, 2):
        hidden[before + a + 1] = hidden[before + a]
    for a in range(31, 35):
        hidden[before + a] = hidden[before + 30]
    keys = torch.randn(2, length, 8) * 0.1
    keys[:, before + 0] *= 100  # visual pivots: 0..3 (distinct tokens)
    keys[:, before + 1] *= 90
    keys[:, before + 2] *= 80
    keys[:, before + 3] *= 70
    visual = torch.arange(before, before + v)
    text = torch.arange(before + v, length)
    for k in (8, 16, 24):
        sel = DART(keep=k, budget_rule="exact", duplicate_eps=1e-6).select_llm(llm_ctx(hidden, visual, text, keys=keys))
        assert_valid(sel, v, k)
        kept = sel.keep.tolist()
        assert {0, 1, 2, 3} <= set(kept)
        xv = F.normalize(hidden[visual], dim=-1)
        sim = xv @ xv.T
        identical_pairs = [(i, j) for i, j in itertools.combinations(kept, 2) if sim[i, j] > 1 - 1e-6]
        dropped = [i for i in range(v) if i not in kept and float(sim[i, kept].max()) < 1 - 1e-6]
        assert not (identical_pairs and dropped)


def test_dart_picks_least_similar_to_a_single_pivot():
    torch.manual_seed(7)
    v, dim = 20, 16
    hidden = torch.randn(v + 3, dim)
    keys = torch.ones(1, v + 3, 4)
    keys[:, 5] = 10  # visual token 5 (position 5) is the only pivot
    visual = torch.arange(0, v)
    text = torch.arange(v, v + 3)
    xv = F.normalize(hidden[:v], dim=-1)
    sims = xv @ xv[5]
    exact = DART(keep=6, pivot_visual=1, pivot_text=0, budget_rule="exact")
    sel = exact.select_llm(llm_ctx(hidden, visual, text, keys=keys))
    assert sel.keep.tolist() == sorted([5] + torch.sort(sims, stable=True).indices[:5].tolist())
    # the official budget: the pivot keeps keep // (pivots) = 6 more tokens, 7 in all
    sel = DART(keep=6, pivot_visual=1, pivot_text=0).select_llm(llm_ctx(hidden, visual, text, keys=keys))
    assert sel.keep.tolist() == sorted([5] + torch.sort(sims, stable=True).indices[:6].tolist())


def test_dart_official_budget_and_set_order():
    assert DART(keep=128).kept_count(128, 576, 4, 4) == 132 and DART(keep=5).kept_count(5, 576, 4, 4) == 4
    assert DART(keep=576).kept_count(576, 576, 4, 4) == 576
    from vtprune.methods.dart import python_set_order
    for values in ([40, 41, 42, 43, 611, 620, 630, 634], [3, 11, 19, 27, 35, 1000, 7, 2], [5]):
        order = python_set_order(torch.tensor(values)).tolist()
        assert [values[i] for i in order] == list(set(values))
    # a position given twice (a visual pivot not found repeats one that was) follows the distinct ones
    assert list(set([700, 3, 700])) == [3, 700] and python_set_order(torch.tensor([700, 3, 700])).tolist() == [1, 0, 2]


def test_dart_similarity_after_the_final_norm():
    torch.manual_seed(3)
    hidden, visual, text, attention, keys = random_llm_sample(v=40, seed=3)
    weight = torch.rand(hidden.shape[1]) * 2 + 0.05
    ctx = llm_ctx(hidden, visual, text, keys=keys)
    ctx._lazy._providers["final_norm"] = lambda x: x * weight
    normed = DART(keep=16).select_llm(ctx).keep
    assert torch.equal(normed, DART(keep=16, similarity="raw").select_llm(llm_ctx(hidden * weight, visual, text,
                                                                                   keys=keys)).keep)


# -- SparseVLM -----------------------------------------------------------------------------------------
def test_sparsevlm_default_follows_the_official_table_plus_recycled_tokens():
    hidden, visual, text, attention, keys = random_llm_sample(v=576, before=2, after=5, dim=16, seed=8)
    m = SparseVLM(keep=64)
    assert m.llm_layers == (3, 7, 16) and m.default_positions == "contiguous"
    sels, lefts = run_llm(m, hidden, visual, text, attention, keys)
    # 66 / 30 / 17 kept by score, plus 16 / 2 / 1 merged tokens (the official counts)
    assert [len(x) for x in lefts] == [82, 32, 18]
    assert [s.info["recycled"] for s in sels] == [16, 2, 1]
    for sel, n in zip(sels, [576, 82, 32]):
        assert_valid(sel, n)
    # the kept tokens come first with their own values, in order, then the merged ones
    sel = sels[0]
    own = hidden[visual[sel.info["by_score"]]]
    assert torch.allclose(sel.values[:66], own)
    assert not torch.allclose(sel.values[66:], hidden[visual[sel.keep[66:]]])


def test_sparsevlm_paper_budgets_between_rows_and_on_other_token_counts():
    from vtprune.methods.sparsevlm import paper_fractions
    assert [round(f * 576) for f in paper_fractions(64)] == [66, 30, 17]
    assert [round(f * 576, 1) for f in paper_fractions(80)] == [152.0, 39.0, 21.5]  # halfway 64 -> 96
    assert [round(f * 576, 1) for f in paper_fractions(32)] == [33.0, 15.0, 8.5]
    # LLaVA-NeXT-sized image (2880 tokens): keep=320 is the 64 setting, scaled
    m = SparseVLM(keep=320)
    counts = [m.scheduled_count(llm_ctx(torch.zeros(3000, 4), torch.arange(2880), torch.arange(2880, 2890),
                                        stage=s, original=2880)) for s in range(3)]
    assert counts == [330, 150, 85]


def test_sparsevlm_old_placement_counts_recycled_tokens_within():
    hidden, visual, text, attention, keys = random_llm_sample(v=576, before=2, after=5, dim=16, seed=8)
    m = SparseVLM(keep=64, recycled_count="within", merged_position="centre", raters="hidden")
    sels, lefts = run_llm(m, hidden, visual, text, attention, keys)
    assert [len(x) for x in lefts] == [66, 30, 17]
    for sel, n in zip(sels, [576, 66, 30]):
        assert_valid(sel, n)
    # stage 1: every value is the token's own hidden state or a cluster average of deleted tokens
    sel = sels[0]
    assert sel.info["recycled"] == int((int((576 - 66) * 0.3) + 1) / 10) + 1
    own = (sel.values - hidden[visual[sel.keep]]).abs().amax(-1) < 1e-6
    assert int((~own).sum()) <= sel.info["recycled"]
    assert int(own.sum()) >= 66 - sel.info["recycled"]


def test_sparsevlm_raters_decide_the_ranking():
    v, before, after, dim = 30, 1, 4, 8
    length = before + v + after
    torch.manual_seed(9)
    hidden = torch.randn(length, dim) * 0.1
    heads = 2
    attention = torch.full((heads, length, length), 1.0)
    text = torch.arange(before + v, length)
    favoured = [3, 17, 22, 29]
    for t in text.tolist():
        attention[:, t, [before + f for f in favoured]] = 50.0
    attention = attention / attention.sum(-1, keepdim=True)
    visual = torch.arange(before, before + v)
    m = SparseVLM(keep=6, layers=(2,), recycle=False, schedule=None)
    sel = m.select_llm(llm_ctx(hidden, visual, text, attention=attention, keys=None, layer=2))
    assert_valid(sel, v, 6)
    assert set(favoured) <= set(sel.keep.tolist())


def test_sparsevlm_adaptive_rank_rule():
    hidden, visual, text, attention, keys = random_llm_sample(v=200, before=2, after=4, seed=10)
    m = SparseVLM(layers=(2,), scale=13.5, recycle=False, schedule=None)
    ctx = llm_ctx(hidden, visual, text, attention=attention, layer=2)
    sel = m.select_llm(ctx)
    rank = sel.info["rank"]
    assert 1 <= rank <= 4
    assert sel.keep.numel() == min(int(rank * 13.5), 199)
    with pytest.raises(UnsupportedMethodError, match="text"):
        m.select_llm(llm_ctx(hidden, visual, visual[:0], attention=attention))


def test_dpc_knn_separates_blobs():
    torch.manual_seed(11)
    a = torch.randn(10, 4) * 0.05
    b = torch.randn(7, 4) * 0.05 + 5
    centres, assign = dpc_knn(torch.cat([a, b]), 2)
    assert len(centres) == 2
    assert len(set(assign[:10].tolist())) == 1 and len(set(assign[10:].tolist())) == 1
    assert assign[0] != assign[10]
    assert assign[centres].tolist() == [0, 1]

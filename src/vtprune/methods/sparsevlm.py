"""``sparsevlm`` — "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference" (Zhang et al., ICML 2025, arXiv 2410.04417). The default follows the authors' v1.5 code
(Gumpest/SparseVLMs, branch v1.5, commit 734d900, ``LlamaDynamicvitModel.forward`` in
``llava/model/language_model/modelling_sparse_llama.py`` with ``score.py`` and ``utils.py``).

LLM stage, at the input of decoder layers 3, 7 and 16 — the official code prunes the *output* of
layers 2, 6 and 15 with those layers' attention, which is the same hidden states and attention. At
each stage:

1. *text raters* (chosen once, from the LLM's input embeddings): the text tokens after the image with
   above-mean ``R_t = mean_v softmax_t(e_v · e_t)`` (unscaled dot products of the embeddings);
2. *scores*: every visual token is rated by the mean (over raters, head mean) attention the raters pay
   to it;
3. *how many stay by score*: the v1.5 table, ``min(count, V − 1)`` with ``V`` the visual tokens present;
   ``keep`` names the paper's layer-averaged budget: 192 → 300 / 200 / 110, 128 → 303 / 110 / 36,
   96 → 238 / 48 / 26, 64 → 66 / 30 / 17 tokens of 576 (no budget: 192, the code's default);
4. *recycling*: of the deleted tokens, the top 30 % by score (``int(0.3 d) + 1``) are clustered by
   density-peak clustering (DPC-kNN, k = cluster count neighbours, the token itself included) into
   ``int(n / 10) + 1`` groups; each group's average is one more visual token, placed after the kept
   ones. So 64 keeps 66 + 16, 30 + 2, 17 + 1 tokens (82 / 32 / 18).

Positions are renumbered contiguously after each stage (``default_positions``), as the code does.

Budgets other than the table's: ``keep=N`` / ``ratio=r`` is expressed per 576 tokens
(``N · 576 / V₀``, ``V₀`` the image's visual tokens entering the LLM) and the per-layer counts are
interpolated linearly between the table's rows, scaled proportionally below 64 and above 192, then
scaled back to ``V₀``. ``schedule=(f1, f2, f3)`` gives fractions of ``V₀`` instead. ``schedule=None``
is the paper's rank-based adaptive rule (vtprune's earlier default, not in the v1.5 code):
``min(int(rank(P) · scale + bias), V − 1)`` from the rank of the rater→visual attention matrix ``P``
(with ``keep`` / ``ratio``: exactly that many after the last stage, the rank rule clamped between it
and the tokens present before); add ``recycled_count="within"`` for an exact final count.

Arguments for the other behaviours (each one argument away from the default):

* ``raters="hidden"``: raters recomputed at every stage from the hidden states entering it, dot
  products scaled by ``1/√D``;
* ``recycled_count="within"``: the merged tokens count inside the stage's count (``T − c`` by score plus
  ``c`` merged, never more than ``T``);
* ``merged_position="centre"``: a merged token takes the place (and, with original positions, the
  position) of its cluster's centre instead of following the kept tokens. The default moves the kept
  tokens' values forward in the visual span to make room for the merged ones at its end, which is the
  official sequence under contiguous positions; with ``positions="original"`` use ``"centre"`` so that
  every kept token keeps its own position;
* ``neighbours=k``: DPC-kNN density from ``k`` neighbours (the token itself included) instead of
  ``k`` = cluster count;
* ``layers=(...)``: other pruning layers (their input; attention of the layer before).

Remaining differences from the official code:

* DPC-kNN breaks density ties as the code does, adding ``torch.rand(n) · 1e-6`` to the densities, but
  draws it from a generator seeded with ``seed`` at every stage (the code draws from the global RNG):
  same numbers on CPU for a given seed, other numbers on a GPU. Ties are common (with k = 2
  neighbours two mutual nearest neighbours have equal density), so the centres, and with them the
  cluster averages, can differ from a run of the code whose global RNG is in another state.
* Arithmetic is fp32 (the code runs in the model's dtype, fp16, including the rater softmax).
* If every text token is equally relevant (e.g. one text token), every one rates; the code then has
  no rater and averages an empty set (NaN scores).
* Raters are computed from the visual candidates' embeddings; on LLaVA-NeXT these exclude the image
  newline tokens (which are never pruned here). The v1.5 code has no working LLaVA-NeXT path
  (``image_features.shape[1]`` on the list of anyres features) and no Qwen code; on those models this
  is the closest port: the same per-stage rule, the table scaled to the image's token count.
* The 96 row comes from the main branch's ``score.py`` (``USE_VERSION=1_0``); the v1.5 branch lists
  192 / 128 / 64.
* The code assumes one sample per batch (its counts are batch sums); here each sample is pruned on
  its own.
* No text tokens after the image: ``UnsupportedMethodError`` (there is nothing to rate with).

On a GPU a stage reads one thing back to the host, and only where the rank rule sets its kept count
(``schedule=None``): the rater rows of ``P``, whose rank is then computed on the host. The raters
themselves are picked by a mask over all text rows (their attention is requested for every text
token after the image). ``info['rank']`` is None at a stage whose count does not depend on it;
``info['raters']`` is a 0-d tensor, ``info['by_score']`` the kept-by-score candidates and
``info['recycled']`` the number of merged tokens.
"""
from __future__ import annotations

import bisect
import math
from typing import Literal

import torch

from ..errors import ArgumentError, BudgetError, UnsupportedMethodError
from .base import Method, Selection, Stage, mask_indices, register_method, sorted_topk, to_device

#: the v1.5 code's per-layer kept counts for LLaVA-1.5 (576 visual tokens) after layers 2 / 6 / 15
#: (192 / 128 / 64: branch v1.5 score.py; 96: main branch score.py, USE_VERSION=1_0)
PAPER_SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
PAPER_VISUAL = 576
#: the official code's budget when none is given (``retained_tokens=192``)
PAPER_DEFAULT = 192


def paper_fractions(budget: float) -> tuple[float, ...]:
    """Per-layer fractions of the visual tokens kept for a layer-averaged budget of ``budget`` tokens
    per 576: the code's table where it has one, linear between its rows, proportional beyond them."""
    rows = sorted(PAPER_SCHEDULES)
    if budget in PAPER_SCHEDULES:
        counts = PAPER_SCHEDULES[budget]
    elif budget < rows[0] or budget > rows[-1]:
        edge = rows[0] if budget < rows[0] else rows[-1]
        counts = [min(c * budget / edge, PAPER_VISUAL) for c in PAPER_SCHEDULES[edge]]
    else:
        i = bisect.bisect(rows, budget)
        lo, hi = PAPER_SCHEDULES[rows[i - 1]], PAPER_SCHEDULES[rows[i]]
        w = (budget - rows[i - 1]) / (rows[i] - rows[i - 1])
        counts = [a + w * (b - a) for a, b in zip(lo, hi)]
    return tuple(c / PAPER_VISUAL for c in counts)


def dpc_knn(x: torch.Tensor, clusters: int, k: int | None = None,
            jitter: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-NN density, as the official ``cluster_and_merge``. ``x`` (n, D);
    ``k`` neighbours counting the row itself (None: ``k = clusters``, as the official code); ``jitter``
    (n,) added to the densities (the code adds ``torch.rand(n) · 1e-6``); remaining density ties go to
    the lower row. Returns (centres (c,) rows by descending centre score = cluster numbers,
    assignment (n,) cluster number of each row, centres assigned to themselves)."""
    n = x.shape[0]
    clusters = max(1, min(clusters, n))
    xf = x.float()
    d = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(x.shape[1])
    nearest = torch.topk(d, min(clusters if k is None else k, n), dim=1, largest=False).values
    density = torch.exp(-(nearest ** 2).mean(dim=1))
    if jitter is not None:
        density = density + jitter
    idx = torch.arange(n, device=x.device)
    # j is "denser" than i if its density is larger, or equal with a lower index
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
    far = d.max()
    delta = torch.where(denser, d, far).min(dim=1).values
    score = density * delta
    centres = torch.sort(score, descending=True, stable=True).indices[:clusters]
    assign = d[centres].argmin(dim=0)  # nearest centre (lowest cluster number on ties)
    assign[centres] = torch.arange(len(centres), device=x.device)
    return centres, assign


def merge_clusters(x: torch.Tensor, assign: torch.Tensor, clusters: int) -> torch.Tensor:
    """(clusters, D) mean of each cluster's rows, normalised by ``count + 1e-6`` as the official code."""
    sums = torch.zeros(clusters, x.shape[1], device=x.device).index_add_(0, assign, x.float())
    counts = torch.zeros(clusters, device=x.device).index_add_(  # bincount would read the max back
        0, assign, torch.ones(assign.numel(), device=x.device))
    return sums / (counts[:, None] + 1e-6)


def top_descending(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, largest first (ties: lower index first)."""
    return torch.sort(score, descending=True, stable=True).indices[:k]


def _rater_rank(weight: torch.Tensor, p: torch.Tensor) -> int:
    """Rank of the rater rows of ``p`` (T, V) (``weight`` (T,) 1 for a rater, 0 otherwise), computed on
    the host: the rank rule's kept count must be known on the host anyway (and an SVD on a GPU waits
    for the device too), so the rows travel once."""
    host = torch.cat([weight[:, None], p], dim=1).double().cpu()  # sync: the rank rule decides how many tokens stay
    return int(torch.linalg.matrix_rank(host[host[:, 0] > 0, 1:]))  # host: works on the copy made above


@register_method
class SparseVLM(Method):
    name = "sparsevlm"
    stages = (Stage.LLM,)
    default_positions = "contiguous"
    official_code = ("Gumpest/SparseVLMs@734d9003879689713a132b83297dfad060a5c9af "
                     "llava/model/language_model/modelling_sparse_llama.py::LlamaDynamicvitModel.forward")

    def __init__(self, keep: int | None = None, ratio: float | None = None, layers: tuple[int, ...] = (3, 7, 16),
                 schedule: tuple[float, ...] | Literal["paper"] | None = "paper", scale: float = 13.5,
                 bias: float = 0.0, recycle: bool = True, recycle_ratio: float = 0.3,
                 raters: Literal["embeddings", "hidden"] = "embeddings",
                 recycled_count: Literal["extra", "within"] = "extra",
                 merged_position: Literal["after", "centre"] = "after",
                 neighbours: int | None = None, seed: int = 0):
        super().__init__(keep=keep, ratio=ratio, seed=seed)
        layers = tuple(layers)
        if not layers or any(l < 1 for l in layers) or list(layers) != sorted(set(layers)):
            raise ArgumentError(f"sparsevlm: layers={layers!r} is not allowed; "
                                f"give increasing decoder layers ≥ 1, e.g. layers=(3, 7, 16).")
        if schedule == "paper":
            if len(layers) != 3:
                raise ArgumentError(f"sparsevlm: schedule='paper' is defined for three pruning layers, "
                                    f"got layers={layers}; pass schedule=None or one fraction per layer.")
        elif schedule is not None:
            schedule = tuple(float(f) for f in schedule)
            if ratio is not None or keep is not None:
                raise BudgetError("Give either a schedule or a final budget (keep=N / ratio=r), not both.")
            if len(schedule) != len(layers) or any(not 0 < f <= 1 for f in schedule) or \
                    any(b > a for a, b in zip(schedule, schedule[1:])):
                raise ArgumentError(f"sparsevlm: schedule={schedule!r} is not allowed; "
                                    f"give one non-increasing fraction in (0, 1] per layer.")
        if neighbours is not None and neighbours < 1:
            raise ArgumentError(f"sparsevlm: neighbours={neighbours} is not allowed; give k ≥ 1 or None.")
        self.schedule = schedule
        self.llm_layers = layers
        self.scale, self.bias = scale, bias
        self.recycle, self.recycle_ratio = recycle, recycle_ratio
        self.rater_source, self.recycled_count = raters, recycled_count
        self.merged_position, self.neighbours = merged_position, neighbours

    # -- how many stay -----------------------------------------------------------------------------
    def uses_rank(self, ctx) -> bool:
        """Whether this stage's kept count follows the rank rule (else it is fixed in advance)."""
        last = ctx.stage_index == len(self.llm_layers) - 1
        return self.schedule is None and (self.keep is None and self.ratio is None or not last)

    def scheduled_count(self, ctx) -> int:
        """A schedule's count for this stage, before the official clamp to ``V - 1``."""
        total = ctx.original_visual
        if self.schedule == "paper":
            budget = PAPER_DEFAULT if self.keep is None and self.ratio is None else \
                self.budget(total) * PAPER_VISUAL / total
            fractions = paper_fractions(budget)
        else:
            fractions = self.schedule
        return max(1, round(fractions[ctx.stage_index] * total))

    def target(self, ctx, rank: int | None) -> int:
        """Visual tokens kept by score at this stage (recycled tokens come on top with
        ``recycled_count='extra'``, are part of it with ``'within'``)."""
        n = len(ctx.visual)
        if self.schedule is not None:
            return min(self.scheduled_count(ctx), n - 1)  # the official topk(min(count, V - 1))
        last = ctx.stage_index == len(self.llm_layers) - 1
        if self.keep is not None or self.ratio is not None:
            final = self.budget(ctx.original_visual)
            if last:
                return min(final, n)
        adaptive = min(int(rank * self.scale + self.bias), n - 1) if rank < n else n
        if self.keep is None and self.ratio is None:
            return max(1, adaptive)
        return max(min(final, n), min(adaptive, n))

    def recycled_sizes(self, n: int, target: int) -> tuple[int, int, int]:
        """(tokens kept by score, deleted tokens recycled, clusters they merge into)."""
        if not self.recycle or target >= n:
            return target, 0, 0
        if self.recycled_count == "extra":  # the official code: clusters come on top of the count
            n_rec = math.floor((n - target) * self.recycle_ratio) + 1
            return target, n_rec, n_rec // 10 + 1
        if target <= 1:
            return target, 0, 0
        clusters = min((math.floor((n - target) * self.recycle_ratio) + 1) // 10 + 1, target - 1)
        by_score = target - clusters
        n_deleted = n - by_score
        return by_score, min(n_deleted, math.floor(n_deleted * self.recycle_ratio) + 1), clusters

    # -- who rates ---------------------------------------------------------------------------------
    def raters(self, ctx) -> torch.Tensor:
        """(T,) bool over ``ctx.text_after``: the text tokens whose attention rates the visual tokens,
        those with above-mean relevance ``R_t = mean_v softmax_t(h_v · h_t)``."""
        if self.rater_source == "embeddings":  # the official code: the LLM's input embeddings, unscaled
            hv, ht = ctx.input_embeddings()
            logits = hv.float() @ ht.float().T
        else:
            h = ctx.hidden.float()
            hv, ht = h[to_device(ctx.visual, h.device)], h[to_device(ctx.text_after, h.device)]
            logits = hv @ ht.T / math.sqrt(h.shape[1])
        relevance = torch.softmax(logits, dim=1).mean(dim=0)
        is_rater = relevance > relevance.mean()
        return is_rater | ~is_rater.any()  # all equally relevant (e.g. one text token): every one rates

    # -- the stage ---------------------------------------------------------------------------------
    def select_llm(self, ctx):
        device = ctx.hidden.device
        n = len(ctx.visual)
        if len(ctx.text_after) == 0:
            raise UnsupportedMethodError("Method 'sparsevlm' needs text tokens after the image to rate visual tokens.")
        # the attention of every text row (their number is known), the raters picked by a mask
        att = ctx.attention(ctx.text_after).float().mean(0)  # (T, L) head mean
        p_all = att[:, to_device(ctx.visual, att.device)]  # (T, V)
        weight = to_device(self.raters(ctx), p_all.device).to(p_all.dtype)
        n_raters = weight.sum()
        score = ((p_all * weight[:, None]).sum(dim=0) / n_raters).to(device)  # mean over the raters
        rank = _rater_rank(weight, p_all) if self.uses_rank(ctx) else None
        target = self.target(ctx, rank)
        # rank: None where the kept count does not depend on it (a schedule, a budget's last stage)
        info = {"stage": ctx.stage_index, "raters": n_raters, "rank": rank, "kept": target}
        if target >= n or n <= 1:
            info.update(recycled=0, by_score=torch.arange(n, device=device))
            return Selection(keep=torch.arange(n, device=device), info=info)
        n_by_score, n_rec, clusters = self.recycled_sizes(n, target)
        by_score = sorted_topk(score, n_by_score)
        info.update(recycled=clusters, by_score=by_score)
        if clusters == 0:
            return Selection(keep=by_score, info=info)
        return self.recycle_deleted(ctx, score, by_score, n_rec, clusters, info)

    def recycle_deleted(self, ctx, score, by_score, n_rec, clusters, info) -> Selection:
        """Merge the best-scored ``n_rec`` deleted tokens into ``clusters`` tokens and place them."""
        device, n = score.device, len(ctx.visual)
        hv = ctx.hidden[to_device(ctx.visual, ctx.hidden.device)].to(device)
        deleted_mask = torch.ones(n, dtype=torch.bool, device=device).index_fill_(0, by_score, False)
        deleted = mask_indices(deleted_mask, n - by_score.numel())
        recycled = deleted[top_descending(score[deleted], n_rec)]  # best first, as the official topk
        jitter = torch.rand(n_rec, generator=self.generator(device), device=device) * 1e-6  # the code's tie-break
        centres, assign = dpc_knn(hv[recycled], clusters, self.neighbours, jitter)
        merged = merge_clusters(hv[recycled], assign, len(centres))
        slots = torch.cat([by_score, recycled[centres]])
        values = torch.cat([hv[by_score].float(), merged]).to(ctx.hidden.dtype)
        if self.merged_position == "after":  # kept tokens in order, then the merged ones
            return Selection(keep=torch.sort(slots).values, values=values, info=info)
        order = torch.argsort(slots)  # each merged token in its cluster centre's place
        return Selection(keep=slots[order], values=values[order], info=info)

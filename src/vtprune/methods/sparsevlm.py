"""``sparsevlm`` — "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference" (Zhang et al., ICML 2025, arXiv 2410.04417).

LLM stage, decoder layers 2, 6 and 15 (the v1.5 code's pruning layers). At each layer:

1. *text raters*: the text tokens after the image that are most relevant to the visual tokens —
   ``R_t = mean_v softmax_t(h_v · h_t / √D)``, raters are the text tokens with ``R_t`` above the mean;
2. *scores*: every visual token is rated by the mean (over raters, head mean) attention the raters pay
   to it at layer K−1;
3. *how many stay*: adaptive, from the rank of the rater→visual attention matrix ``P``:
   ``min(int(rank(P) · scale + bias), V − 1)`` (the v1 code's rule, ``scale = 13.5``, ``bias = 0``),
   or a fixed per-layer schedule;
4. *recycling*: of the tokens deleted at this layer, the top 30 % by score (+1) are clustered by
   density-peak clustering (DPC-kNN) into ``int(n / 10) + 1`` groups; each group is merged (averaged)
   into one token.

Budgets:

* no budget (default): fully adaptive (step 3's rank rule at every layer, no pruning at a layer where
  ``P`` has full rank);
* ``keep=N`` / ``ratio=r``: exactly ``N`` visual tokens remain after the last layer; earlier layers use
  the rank rule, clamped between ``N`` and the tokens present;
* ``schedule=(f1, f2, f3)``: fractions of the visual tokens that entered the LLM kept after each
  layer; ``schedule="paper"`` with ``keep`` in {192, 128, 96, 64} uses the v1.5 code's LLaVA-1.5 table
  (e.g. 64 → 66 / 30 / 17 of 576 tokens, whose 32-layer average is about 64) scaled to the image's
  token count. Then ``keep`` names the layer-averaged equivalent, as in the paper, not the final count.

Recycled tokens count towards the budget: a layer keeping ``T`` tokens keeps ``T - c`` by score plus
``c`` recycled ones, never more than ``T``.

Differences from the paper / official code:

* Raters are recomputed at every pruning layer from the hidden states entering it; the code computes
  them once from the LLM's input embeddings (the method contract gives hidden states per layer only).
  The dot products are scaled by ``1/√D`` before the softmax.
* A recycled (merged) token takes the place and the original position of its cluster's centre (one of
  the deleted tokens); the code inserts merged tokens after the kept visual tokens with shifted
  positions. Its value is the plain average of the cluster's hidden states.
* DPC-kNN uses k = 5 neighbours for the density and breaks density ties by index (the code uses
  ``k = clusters`` and random jitter).
* Attention is that of layer K−1 for the rater rows only (the code prunes the output of layer K with
  layer K's attention — the same hidden states, one layer earlier).
* No text tokens after the image: ``UnsupportedMethodError`` (there is nothing to rate with).

On a GPU a stage reads one thing back to the host, and only where the rank rule sets its kept count
(adaptive, or an intermediate layer of a ``keep`` / ``ratio`` budget): the rater rows of ``P``, whose
rank is then computed on the host. The raters themselves are picked by a mask over all text rows (their
attention is requested for every text token after the image). ``info['rank']`` is None at a stage whose
count does not depend on it (a schedule, a budget's last layer); ``info['raters']`` is a 0-d tensor.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from ..errors import ArgumentError, BudgetError, UnsupportedMethodError
from .base import Method, Selection, Stage, mask_indices, register, sorted_topk, to_device

#: the v1.5 code's per-layer kept counts for LLaVA-1.5 (576 visual tokens), layers 2 / 6 / 15
PAPER_SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
PAPER_VISUAL = 576


def dpc_knn(x: torch.Tensor, clusters: int, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-NN density. ``x`` (n, D). Returns (centres (c,) ascending
    positions, assignment (n,) cluster number of each row, centres assigned to themselves)."""
    n = x.shape[0]
    clusters = max(1, min(clusters, n))
    d = torch.cdist(x.float(), x.float()) / math.sqrt(x.shape[1])
    kk = min(k, n - 1)
    if kk > 0:
        nearest = torch.topk(d, kk + 1, dim=1, largest=False).values[:, 1:]  # drop self
        density = torch.exp(-(nearest ** 2).mean(dim=1))
    else:
        density = torch.ones(n, device=x.device)
    idx = torch.arange(n, device=x.device)
    # j is "denser" than i if its density is larger, or equal with a lower index
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
    far = d.max()
    delta = torch.where(denser, d, far).min(dim=1).values
    peak = ~denser.any(dim=1)
    delta = torch.where(peak, far, delta)
    score = density * delta
    centres = torch.sort(sorted_topk(score, clusters)).values
    assign = d[:, centres].argmin(dim=1)  # nearest centre (lowest on ties)
    assign[centres] = torch.arange(len(centres), device=x.device)
    return centres, assign


def _rater_rank(weight: torch.Tensor, p: torch.Tensor) -> int:
    """Rank of the rater rows of ``p`` (T, V) (``weight`` (T,) 1 for a rater, 0 otherwise), computed on
    the host: the rank rule's kept count must be known on the host anyway (and an SVD on a GPU waits
    for the device too), so the rows travel once."""
    host = torch.cat([weight[:, None], p], dim=1).double().cpu()  # sync: the rank rule decides how many tokens stay
    return int(torch.linalg.matrix_rank(host[host[:, 0] > 0, 1:]))  # host: works on the copy made above


@register
class SparseVLM(Method):
    name = "sparsevlm"
    stages = (Stage.LLM,)

    def __init__(self, keep: int | None = None, ratio: float | None = None, layers: tuple[int, ...] = (2, 6, 15),
                 schedule: tuple[float, ...] | Literal["paper"] | None = None, scale: float = 13.5, bias: float = 0.0,
                 recycle: bool = True, recycle_ratio: float = 0.3, seed: int = 0):
        super().__init__(keep=keep, ratio=ratio, seed=seed)
        layers = tuple(layers)
        if not layers or any(l < 1 for l in layers) or list(layers) != sorted(set(layers)):
            raise ArgumentError(f"sparsevlm: layers={layers!r} is not allowed; "
                                f"give increasing decoder layers ≥ 1, e.g. layers=(2, 6, 15).")
        if schedule == "paper":
            if keep not in PAPER_SCHEDULES:
                raise BudgetError(f"schedule='paper' needs keep in {sorted(PAPER_SCHEDULES)}, got keep={keep}.")
            if len(layers) != 3:
                raise ArgumentError(f"sparsevlm: schedule='paper' is defined for three pruning layers, "
                                    f"got layers={layers}.")
            schedule = tuple(c / PAPER_VISUAL for c in PAPER_SCHEDULES[keep])
        elif schedule is not None:
            schedule = tuple(float(f) for f in schedule)
            if ratio is not None or keep is not None:
                raise BudgetError("Give either a schedule or a final budget (keep=N / ratio=r), not both.")
            if len(schedule) != len(layers) or any(not 0 < f <= 1 for f in schedule) or \
                    any(b > a for a, b in zip(schedule, schedule[1:])):
                raise ArgumentError(f"sparsevlm: schedule={schedule!r} is not allowed; "
                                    f"give one non-increasing fraction in (0, 1] per layer.")
        self.schedule = schedule
        self.llm_layers = layers
        self.scale, self.bias = scale, bias
        self.recycle, self.recycle_ratio = recycle, recycle_ratio

    # -- how many stay -----------------------------------------------------------------------------
    def uses_rank(self, ctx) -> bool:
        """Whether this stage's kept count follows the rank rule (else it is fixed in advance)."""
        last = ctx.stage_index == len(self.llm_layers) - 1
        return self.schedule is None and (self.keep is None and self.ratio is None or not last)

    def target(self, ctx, rank: int | None) -> int:
        n = len(ctx.visual)
        last = ctx.stage_index == len(self.llm_layers) - 1
        if self.schedule is not None:
            return max(1, min(n, int(round(self.schedule[ctx.stage_index] * ctx.original_visual))))
        if self.keep is not None or self.ratio is not None:
            final = self.budget(ctx.original_visual)
            if last:
                return min(final, n)
        adaptive = min(int(rank * self.scale + self.bias), n - 1) if rank < n else n
        if self.keep is None and self.ratio is None:
            return max(1, adaptive)
        return max(min(final, n), min(adaptive, n))

    # -- the stage ---------------------------------------------------------------------------------
    def select_llm(self, ctx):
        device = ctx.hidden.device
        visual = to_device(ctx.visual, device)
        text = to_device(ctx.text_after, device)
        n = len(visual)
        if len(text) == 0:
            raise UnsupportedMethodError("Method 'sparsevlm' needs text tokens after the image to rate visual tokens.")
        h = ctx.hidden.float()
        hv, ht = h[visual], h[text]
        relevance = torch.softmax(hv @ ht.T / math.sqrt(h.shape[1]), dim=1).mean(dim=0)  # (T,)
        is_rater = relevance > relevance.mean()
        is_rater = is_rater | ~is_rater.any()  # all equally relevant (e.g. one text token): every one rates
        # the attention of every text row (their number is known), the raters picked by a mask
        att = ctx.attention(ctx.text_after).float().mean(0)  # (T, L) head mean
        p_all = att[:, to_device(ctx.visual, att.device)]  # (T, V)
        weight = to_device(is_rater, p_all.device).to(p_all.dtype)
        n_raters = weight.sum()
        score = ((p_all * weight[:, None]).sum(dim=0) / n_raters).to(device)  # mean over the raters
        rank = _rater_rank(weight, p_all) if self.uses_rank(ctx) else None
        target = self.target(ctx, rank)
        # rank: None where the kept count does not depend on it (a schedule, a budget's last stage)
        info = {"stage": ctx.stage_index, "raters": n_raters, "rank": rank, "kept": target}
        if target >= n:
            info["recycled"] = 0
            return Selection(keep=torch.arange(n, device=device), info=info)

        clusters = 0
        if self.recycle and target > 1:
            n_rec = int((n - target) * self.recycle_ratio) + 1
            clusters = min(int(n_rec / 10) + 1, target - 1)
        by_score = sorted_topk(score, target - clusters)
        info["recycled"] = clusters
        if clusters == 0:
            return Selection(keep=by_score, info=info)

        deleted_mask = torch.ones(n, dtype=torch.bool, device=device).index_fill_(0, by_score, False)
        n_deleted = n - by_score.numel()
        deleted = mask_indices(deleted_mask, n_deleted)
        n_rec = min(n_deleted, int(n_deleted * self.recycle_ratio) + 1)
        recycled = deleted[sorted_topk(score[deleted], n_rec)]
        centres, assign = dpc_knn(hv[recycled], clusters)
        sums = torch.zeros(len(centres), h.shape[1], device=device)
        sums.index_add_(0, assign, hv[recycled])
        counts = torch.zeros(len(centres), device=device).index_add_(  # bincount would read the max back
            0, assign, torch.ones(assign.numel(), device=device)).clamp(min=1)
        merged = sums / counts[:, None]

        keep = torch.cat([by_score, recycled[centres]])
        values = torch.cat([hv[by_score], merged]).to(ctx.hidden.dtype)
        order = torch.argsort(keep)
        return Selection(keep=keep[order], values=values[order], info=info)

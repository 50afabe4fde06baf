"""``visionzip`` — "VisionZip: Longer is Better but Not Necessary in Vision Language Models"
(Yang et al., CVPR 2025, arXiv 2412.04467).

Vision stage, per crop. Of each crop's budget ``b``:

* *dominant* tokens: the ``b - c`` patches with the largest [CLS]→patch attention summed over heads
  at the feature layer (LLaVA's ``hidden_states[-2]``); they keep their own features;
* *contextual* tokens: the remaining patches are merged into ``c`` tokens. ``c`` targets are taken
  uniformly spaced (step ``R // c``, in index order) among the ``R`` remaining patches; every other
  remaining patch joins the target it is most similar to (cosine); each contextual token is the
  average of its group.

Budget split: the paper's LLaVA-1.5 settings 64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30 all have
``c = 10/64`` of the budget; we use ``c = round(b · contextual_ratio)`` with ``contextual_ratio =
10/64`` for every budget (which reproduces those three exactly), per crop on LLaVA-NeXT, where the
image budget is split over crops in proportion to their token counts (``split_budget``).

Differences from the paper / official code:

* Similarity metric: the official code compares the *keys* of the feature layer's attention (head
  mean); the method contract gives no vision keys, so we compare the feature layer's hidden states
  (``ctx.features``, the output of that same block). Recorded as ``info['metric'] = 'features'``.
* Position of merged tokens: the paper appends the contextual tokens after the dominant ones; here each
  contextual token takes the place (and the position) of its target patch, so every token the LLM sees
  keeps an original position.
* Merge value: the official code sets a contextual token to ``target + mean(assigned)``; we use the
  group average ``mean(target, assigned...)`` as the paper describes ("merged by averaging").
* [CLS]: the official LLaVA code also forwards the [CLS] token's feature as one extra dominant token;
  [CLS] is not a candidate in our layout, so exactly ``b`` patch tokens are kept.
* Qwen2.5-VL / Qwen3-VL are refused: their towers have no [CLS] token, and their adapter cannot take
  merged vision-stage features (the 2×2 merger needs the four original patches).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ArgumentError
from .base import Method, Selection, Stage, mask_indices, register, sorted_topk, split_budget

_NEED_REASONS = {"cls_attention": "its tower has no [CLS] token",
                 "vision_merge": "merged vision-stage tokens cannot pass the 2×2 patch merger"}


@register
class VisionZip(Method):
    name = "visionzip"
    needs_budget = True
    stages = (Stage.VISION,)
    needs = frozenset({"cls_attention", "vision_merge"})
    need_reasons = _NEED_REASONS

    def __init__(self, keep: int | None = None, ratio: float | None = None,
                 contextual_ratio: float = 10 / 64, seed: int = 0):
        super().__init__(keep=keep, ratio=ratio, seed=seed)
        if not 0.0 <= contextual_ratio < 1.0:
            raise ArgumentError(f"visionzip: contextual_ratio={contextual_ratio!r} is not allowed; it lies in [0, 1).")
        self.contextual_ratio = contextual_ratio

    def split(self, budget: int) -> tuple[int, int]:
        """(dominant, contextual) counts for a crop budget."""
        contextual = min(int(round(budget * self.contextual_ratio)), budget - 1) if budget > 1 else 0
        return budget - contextual, contextual

    def select_vision(self, ctx):
        self.check_family(ctx.family)
        n = ctx.num_tokens
        total = self.budget(n)
        cls = ctx.cls_attention[:, :n].float().sum(0)  # (N,) summed over heads
        feats = ctx.features
        sizes = [sl.stop - sl.start for sl in ctx.crop_slices]
        keeps, values, splits = [], [], []
        for sl, budget in zip(ctx.crop_slices, split_budget(total, sizes)):
            size = sl.stop - sl.start
            if budget == 0:
                continue
            idx = torch.arange(sl.start, sl.stop, device=feats.device)
            if budget >= size:
                keeps.append(idx)
                values.append(feats[idx])
                splits.append((size, 0))
                continue
            n_dom, n_ctx = self.split(budget)
            local = sorted_topk(cls[sl], n_dom)
            dominant = idx[local]
            is_dom = torch.zeros(size, dtype=torch.bool, device=feats.device).index_fill_(0, local, True)
            remaining = idx[mask_indices(~is_dom, size - n_dom)]  # ascending
            keeps.append(dominant)
            values.append(feats[dominant])
            if n_ctx > 0:
                targets, merged = self._contextual(feats, remaining, n_ctx)
                keeps.append(targets)
                values.append(merged.to(feats.dtype))
            splits.append((n_dom, n_ctx))
        keep = torch.cat(keeps)
        vals = torch.cat(values)
        order = torch.argsort(keep)
        return Selection(keep=keep[order], values=vals[order],
                         info={"dominant_contextual": splits, "metric": "features"})

    @staticmethod
    def _contextual(feats: torch.Tensor, remaining: torch.Tensor, n_ctx: int):
        """Merge ``remaining`` (ascending indices) into ``n_ctx`` tokens placed at uniformly spaced
        targets. Returns (target indices, merged values)."""
        r = remaining.numel()
        step = max(1, r // n_ctx)
        pick = torch.arange(0, r, step, device=feats.device)[:n_ctx]
        is_target = torch.zeros(r, dtype=torch.bool, device=feats.device).index_fill_(0, pick, True)
        targets, others = remaining[pick], remaining[mask_indices(~is_target, r - pick.numel())]
        x = feats.float()
        sums = x[targets].clone()
        counts = torch.ones(targets.numel(), device=feats.device)
        if others.numel():
            sim = F.normalize(x[others], dim=-1) @ F.normalize(x[targets], dim=-1).T
            group = sim.argmax(dim=1)  # first (lowest-index) target on ties
            sums.index_add_(0, group, x[others])
            counts.index_add_(0, group, torch.ones(others.numel(), device=feats.device))
        return targets, sums / counts[:, None]

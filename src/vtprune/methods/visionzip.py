"""``visionzip`` — "VisionZip: Longer is Better but Not Necessary in Vision Language Models"
(Yang et al., CVPR 2025, arXiv 2412.04467). Official code: dvlab-research/VisionZip, commit
3151f6df4fca36a4cd1c985e5956e725b1f9ad02, ``visionzip/clip_encoder.py::CLIPVisionTower_VisionZip.forward``
(with the key metric of ``visionzip/utils.py::CLIPAttention_forward``).

Vision stage, per crop (the official LLaVA-NeXT code runs the LLaVA-1.5 selection on every crop,
the base image included, with the same ``dominant`` / ``contextual`` numbers). Of a crop's budget
``b`` = ``dominant + contextual`` tokens (default, as the official code counts them):

* *dominant*: the crop's [CLS] token plus the ``dominant - 1`` patches with the largest
  [CLS]→patch attention summed over heads at the feature layer (LLaVA's ``hidden_states[-2]``; the
  attention of the block that outputs it). Official ``visionzip(model, dominant=54, contextual=10)``
  hands the LLM 64 tokens: [CLS] + 53 patches + 10 contextual tokens, and so does ``keep=64`` here.
  The [CLS] feature reaches the LLM as an extra token of the crop (``forwards_cls``; the adapters
  append it after the image's kept patches, like a test-time register);
* *contextual*: the remaining ``R`` patches (index order) are grouped around ``contextual`` targets
  taken uniformly (every ``R // contextual``-th of them); every other remaining patch joins the
  target whose feature-layer *key* (head mean, ``metric="keys"``) is most cosine-similar; a
  contextual token is ``target + mean(assigned)`` (``merge="official"``; just the target when
  nothing is assigned), at the target's place.

Budget split: ``contextual = round(b · contextual_ratio)`` with ``contextual_ratio = 10/64``, which
gives the paper's LLaVA-1.5 settings 64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30 (the official code
takes the two numbers as arguments). ``keep=N`` is the image's total: on LLaVA-NeXT it is split over
the crops in proportion to their candidates (``split_budget``; equal crops under the default
``layout="flat"``, e.g. ``keep=320`` on five crops = 54 + 10 each), and it must be at least the
number of crops while [CLS] is forwarded.

Non-default behaviour, one argument away:

* ``merge="mean"``: a contextual token is the group average ``mean(target, assigned...)``, as the
  paper describes ("merged by averaging"); the official code adds the target to the mean of the
  others, so the target counts as much as all its members together.
* ``metric="features"``: group by the feature layer's hidden states instead of its keys.
* ``forward_cls=False``: [CLS] is neither counted nor forwarded; ``b`` patch tokens are kept.

Remaining differences from the official code:

* Token order in the LLM: the official LLaVA-1.5 code hands ``[CLS, dominant (index order),
  contextual (target order)]``; here the kept patches come in index order, each contextual token at
  its target's place, then the [CLS] token. On LLaVA-NeXT the official code hands the base crop's
  64-style block as on LLaVA-1.5, then the other crops' dominant patches in raster order of the whole
  high-resolution grid (no unpadding, no newline token), then those crops' [CLS] tokens, then their
  contextual tokens; vtprune's default ``layout="flat"`` keeps the same candidates (whole crops, no
  newline token) but orders them crop by crop, with every crop's [CLS] last. Positions are renumbered
  contiguously (``default_positions``), as the official code does. Under ``layout="model"`` the
  padding patches that unpadding removes are not candidates.
* Precision: similarity and merging run in fp32; the official code runs them in the tower's dtype
  (fp16 in its scripts), which can flip near ties.
* Ties: dominant patches with exactly equal attention go to the lower index (the official ``topk``
  leaves ties unspecified).
* Qwen2.5-VL / Qwen3-VL are refused (the authors published no Qwen code): their towers have no
  [CLS] token, and their adapter cannot take merged vision-stage features (the 2×2 merger needs the
  four original patches).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import ArgumentError, BudgetError
from .base import Method, Selection, Stage, mask_indices, register_method, sorted_topk, split_budget

_NEED_REASONS = {"cls_attention": "its tower has no [CLS] token",
                 "vision_merge": "merged vision-stage tokens cannot pass the 2×2 patch merger"}


@register_method
class VisionZip(Method):
    name = "visionzip"
    needs_budget = True
    stages = (Stage.VISION,)
    needs = frozenset({"cls_attention", "vision_merge"})
    need_reasons = _NEED_REASONS
    default_layout = "flat"  # the official LLaVA-NeXT code selects among whole crops and adds no newline
    default_positions = "contiguous"
    official_code = ("dvlab-research/VisionZip@3151f6df4fca36a4cd1c985e5956e725b1f9ad02 "
                     "visionzip/clip_encoder.py::CLIPVisionTower_VisionZip.forward")

    def __init__(self, keep: int | None = None, ratio: float | None = None,
                 contextual_ratio: float = 10 / 64, metric: Literal["keys", "features"] = "keys",
                 merge: Literal["official", "mean"] = "official", forward_cls: bool = True, seed: int = 0):
        super().__init__(keep=keep, ratio=ratio, seed=seed)
        if not 0.0 <= contextual_ratio < 1.0:
            raise ArgumentError(f"visionzip: contextual_ratio={contextual_ratio!r} is not allowed; it lies in [0, 1).")
        self.contextual_ratio = contextual_ratio
        self.metric = metric
        self.merge = merge
        self.forwards_cls = forward_cls

    def split(self, budget: int) -> tuple[int, int]:
        """(dominant, contextual) counts for a crop budget; dominant includes [CLS] when it is forwarded."""
        contextual = min(int(round(budget * self.contextual_ratio)), budget - 1) if budget > 1 else 0
        return budget - contextual, contextual

    def select_vision(self, ctx):
        self.check_family(ctx.family)
        n = ctx.num_tokens
        total = self.budget(n)
        crops = len(ctx.crop_slices)
        if self.forwards_cls and total < crops:
            raise BudgetError(f"visionzip forwards each crop's [CLS] token, so keep must be at least the {crops} "
                              f"crops of this image (got {total}); raise keep or pass forward_cls=False.")
        cls = ctx.cls_attention[:, :n].float().sum(0)  # (N,) summed over heads
        feats = ctx.features
        metric = self._metric(ctx)
        sizes = [sl.stop - sl.start for sl in ctx.crop_slices]
        keeps, values, splits = [], [], []
        for sl, budget in zip(ctx.crop_slices, self.crop_budgets(total, sizes)):
            size = sl.stop - sl.start
            n_dom, n_ctx = self.split(budget)
            n_dom_patches = n_dom - 1 if self.forwards_cls else n_dom
            idx = torch.arange(sl.start, sl.stop, device=feats.device)
            if budget == 0:
                continue
            if n_dom_patches + n_ctx >= size:
                keeps.append(idx)
                values.append(feats[idx])
                splits.append((size, 0))
                continue
            local = sorted_topk(cls[sl], n_dom_patches)
            dominant = idx[local]
            is_dom = torch.zeros(size, dtype=torch.bool, device=feats.device).index_fill_(0, local, True)
            remaining = idx[mask_indices(~is_dom, size - n_dom_patches)]  # ascending
            keeps.append(dominant)
            values.append(feats[dominant])
            if n_ctx > 0:
                targets, merged = self._contextual(metric, feats, remaining, n_ctx)
                keeps.append(targets)
                values.append(merged.to(feats.dtype))
            splits.append((n_dom, n_ctx))
        keep = torch.cat(keeps)
        vals = torch.cat(values)
        order = torch.argsort(keep)
        return Selection(keep=keep[order], values=vals[order],
                         info={"dominant_contextual": splits, "metric": self.metric, "merge": self.merge,
                               "forwards_cls": self.forwards_cls})

    def crop_budgets(self, total: int, sizes: list[int]) -> list[int]:
        """Each crop's budget (its [CLS] included when forwarded: then every crop gets at least one)."""
        if not self.forwards_cls:
            return split_budget(total, sizes)
        return [1 + b for b in split_budget(total - len(sizes), sizes)]

    def _metric(self, ctx) -> torch.Tensor:
        """(N, d) what contextual grouping compares: the feature layer's keys (head mean) or features."""
        if self.metric == "keys":
            return ctx.keys.float().mean(0)
        return ctx.features.float()

    def _contextual(self, metric: torch.Tensor, feats: torch.Tensor, remaining: torch.Tensor, n_ctx: int):
        """Merge ``remaining`` (ascending indices) into ``n_ctx`` tokens placed at uniformly spaced
        targets. Returns (target indices, merged values)."""
        r = remaining.numel()
        step = max(1, r // n_ctx)
        pick = torch.arange(0, r, step, device=feats.device)[:n_ctx]
        is_target = torch.zeros(r, dtype=torch.bool, device=feats.device).index_fill_(0, pick, True)
        rest = mask_indices(~is_target, r - pick.numel())
        targets, others = remaining[pick], remaining[rest]
        unit = F.normalize(metric[remaining], dim=-1)
        similarity = unit[rest] @ unit[pick].T
        nearest = similarity.argmax(dim=1, keepdim=True)  # first max on ties
        assign = torch.zeros_like(similarity).scatter_(1, nearest, 1.0)  # (others, targets) one-hot
        x = feats.float()
        sums = assign.T @ x[others]
        counts = assign.sum(0)[:, None]
        if self.merge == "official":
            return targets, x[targets] + sums / counts.clamp(min=1)
        return targets, (x[targets] + sums) / (counts + 1)

"""``vispruner`` — "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs" (Zhang et al., ICCV 2025, arXiv 2412.01818v2).

Vision stage, per crop. Of each crop's budget ``b``:

* *important* tokens: the ``int(b · important_ratio)`` patches with the largest head-averaged
  [CLS]→patch attention at the feature layer (default ``important_ratio = 0.5``);
* *diverse* tokens: from the other patches, near-duplicates are removed iteratively by cosine
  similarity of their features until ``b - important`` remain.

Differences from the paper / official code:

* Duplicate removal: the official code removes up to 8 tokens per round by bipartite matching
  (even vs. odd positions, ToMe style). We remove one token per step: of the most similar pair still
  present, the member with the lower [CLS] attention (ties: the higher index) goes. Consequence we
  rely on: two near-duplicates are never both kept while a token whose nearest neighbour is farther
  away was removed.
* LLaVA-NeXT: the budget is split over crops in proportion to their token counts (``split_budget``);
  the official code gives every crop the same budget.
* Qwen2.5-VL / Qwen3-VL have no [CLS] token: importance is the mean attention each merged token
  receives from all patches at the tower's last block (``ctx.received_attention``), as the authors
  suggest for CLS-less towers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ArgumentError
from .base import Method, Selection, Stage, register, sorted_topk, split_budget

QWEN = ("qwen2_5_vl", "qwen3_vl")


def importance(ctx) -> torch.Tensor:
    """(N,) per-token importance: head-mean [CLS] attention, or received attention on Qwen."""
    if ctx.family in QWEN:
        return ctx.received_attention.float()
    return ctx.cls_attention[:, : ctx.num_tokens].float().mean(0)


def remove_duplicates(x: torch.Tensor, score: torch.Tensor, target: int, chunk: int = 1 << 16) -> torch.Tensor:
    """Greedy de-duplication. ``x`` (R, D) features, ``score`` (R,) importance; returns the sorted
    positions of the ``target`` rows that remain after repeatedly dropping, from the most similar
    pair still present, the member with the lower score (ties: the higher position).

    Equivalent one-pass form: walk all pairs (i < j) in decreasing similarity (ties in (i, j) order);
    whenever both members of a pair are still present, drop one."""
    r = x.shape[0]
    if target >= r:
        return torch.arange(r, device=x.device)
    if target <= 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    xn = F.normalize(x.float(), dim=-1)
    sim = (xn @ xn.T).masked_fill(~torch.ones(r, r, dtype=torch.bool, device=x.device).triu(1), -float("inf"))
    order = torch.sort(sim.flatten(), descending=True, stable=True).indices
    scores = score.float().tolist()
    alive = [True] * r
    to_drop = r - target
    for start in range(0, order.numel(), chunk):
        for flat in order[start:start + chunk].tolist():
            i, j = divmod(flat, r)
            if alive[i] and alive[j]:
                drop = i if (scores[i] < scores[j]) else j  # equal scores: the higher position j
                alive[drop] = False
                to_drop -= 1
                if to_drop == 0:
                    break
        if to_drop == 0:
            break
    return torch.tensor([p for p in range(r) if alive[p]], dtype=torch.long, device=x.device)


@register
class VisPruner(Method):
    name = "vispruner"
    needs_budget = True
    stages = (Stage.VISION,)

    def __init__(self, keep: int | None = None, ratio: float | None = None,
                 important_ratio: float = 0.5, seed: int = 0):
        super().__init__(keep=keep, ratio=ratio, seed=seed)
        if not 0.0 <= important_ratio <= 1.0:
            raise ArgumentError(f"vispruner: important_ratio={important_ratio!r} is not allowed; it lies in [0, 1].")
        self.important_ratio = important_ratio

    def select_vision(self, ctx):
        n = ctx.num_tokens
        total = self.budget(n)
        score = importance(ctx)
        feats = ctx.features
        sizes = [sl.stop - sl.start for sl in ctx.crop_slices]
        keeps, counts = [], []
        for sl, budget in zip(ctx.crop_slices, split_budget(total, sizes)):
            size = sl.stop - sl.start
            if budget == 0:
                continue
            idx = torch.arange(sl.start, sl.stop, device=feats.device)
            if budget >= size:
                keeps.append(idx)
                counts.append((size, 0))
                continue
            n_imp = int(budget * self.important_ratio)
            important = (sorted_topk(score[sl], n_imp) if n_imp > 0
                         else torch.zeros(0, dtype=torch.long, device=feats.device))
            rest = torch.ones(size, dtype=torch.bool, device=feats.device)
            rest[important] = False
            residual = idx[rest]
            diverse = residual[remove_duplicates(feats[residual], score[residual], budget - n_imp)]
            keeps += [important + sl.start, diverse]
            counts.append((n_imp, budget - n_imp))
        keep = torch.sort(torch.cat(keeps)).values
        return Selection(keep=keep, info={"important_diverse": counts})

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
from .base import Method, Selection, Stage, mask_indices, register, sorted_topk, split_budget

def importance(ctx) -> torch.Tensor:
    """(N,) per-token importance: head-mean [CLS] attention, or received attention on Qwen."""
    if "cls_attention" not in ctx.capabilities:
        return ctx.received_attention.float()
    return ctx.cls_attention[:, : ctx.num_tokens].float().mean(0)


_INT64_MAX = torch.iinfo(torch.int64).max


def _pair_keys(x: torch.Tensor) -> torch.Tensor:
    """(R, R) int64 keys of the pairs {i, j} of rows of ``x``, symmetric, ordered as the walk visits the
    pairs: by decreasing cosine similarity sim[i, j] (i < j, the upper triangle of ``xn @ xn.T``), ties
    by the row-major position i·R + j. Key = (descending float bits) << b | (i·R + j)."""
    r = x.shape[0]
    shift = max(1, (r * r - 1).bit_length())
    if 32 + shift > 63:
        raise ValueError(f"vispruner: {r} tokens in one crop are too many for the duplicate removal")
    xn = F.normalize(x.float(), dim=-1)
    sim = xn @ xn.T
    idx = torch.arange(r, device=x.device)
    upper = idx[:, None] < idx[None, :]
    sim = torch.where(upper, sim, sim.T) + 0.0  # the upper triangle's value for both orders; -0.0 → +0.0
    bits = sim.view(torch.int32).to(torch.int64)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # increases with the float value
    flat = torch.minimum(idx[:, None], idx[None, :]) * r + torch.maximum(idx[:, None], idx[None, :])
    return ((2 ** 31 - 1 - ordered) << shift) | flat


def remove_duplicates_batch(xs: list[torch.Tensor], scores: list[torch.Tensor], targets: list[int]) -> list[torch.Tensor]:
    """:func:`remove_duplicates` of several crops at once (one loop for all of them)."""
    out: list[torch.Tensor | None] = [None] * len(xs)
    work = []
    for c, (x, target) in enumerate(zip(xs, targets)):
        if target >= x.shape[0]:
            out[c] = torch.arange(x.shape[0], device=x.device)
        elif target <= 0:
            out[c] = torch.zeros(0, dtype=torch.long, device=x.device)
        else:
            work.append(c)
    if not work:
        return out
    device = xs[work[0]].device
    sizes = [xs[c].shape[0] for c in work]
    rmax = max(sizes)
    # Strength: the higher score wins a pair, equal scores → the lower position. Token t dies at the first
    # pair (walk order) joining it to a stronger token still alive then; a token's fate depends on the
    # stronger ones only, so one pass in strength order settles everyone ("death" = that pair's key).
    keys = torch.full((len(work), rmax, rmax), _INT64_MAX, dtype=torch.int64, device=device)
    strength = []
    for b, c in enumerate(work):
        r = sizes[b]
        order = torch.sort(scores[c].float(), descending=True, stable=True).indices
        keys[b, :r, :r] = _pair_keys(xs[c])[order][:, order]  # rows / columns in strength order
        strength.append(order)
    death = torch.full((len(work), rmax), _INT64_MAX, dtype=torch.int64, device=device)
    for s in range(1, rmax):  # the strongest token never dies
        row = keys[:, s, :s]
        # its pairs with stronger tokens still alive when the pair comes up (they die later)
        death[:, s] = row.masked_fill(death[:, :s] <= row, _INT64_MAX).amin(dim=1)
    for b, c in enumerate(work):
        # the walk stops after r - target drops: the target tokens that die last remain (deaths are distinct)
        last = torch.topk(death[b, :sizes[b]], targets[c]).indices
        out[c] = torch.sort(strength[b][last]).values
    return out


def remove_duplicates(x: torch.Tensor, score: torch.Tensor, target: int) -> torch.Tensor:
    """Greedy de-duplication. ``x`` (R, D) features, ``score`` (R,) importance; returns the sorted
    positions of the ``target`` rows that remain after repeatedly dropping, from the most similar
    pair still present, the member with the lower score (ties: the higher position).

    Equivalent one-pass form: walk all pairs (i < j) in decreasing similarity (ties in (i, j) order);
    whenever both members of a pair are still present, drop one. Computed without walking the pairs:
    one step per token in decreasing strength, each a few vector operations (see
    :func:`remove_duplicates_batch`), nothing read back to the host."""
    return remove_duplicates_batch([x], [score], [target])[0]


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
        keeps, counts, residuals, targets = [], [], [], []
        for sl, budget in zip(ctx.crop_slices, split_budget(total, sizes)):
            size = sl.stop - sl.start
            if budget == 0:
                continue
            if budget >= size:
                keeps.append(torch.arange(sl.start, sl.stop, device=feats.device))
                counts.append((size, 0))
                continue
            n_imp = int(budget * self.important_ratio)
            important = (sorted_topk(score[sl], n_imp) if n_imp > 0
                         else torch.zeros(0, dtype=torch.long, device=feats.device))
            rest = torch.ones(size, dtype=torch.bool, device=feats.device).index_fill_(0, important, False)
            residuals.append(mask_indices(rest, size - n_imp) + sl.start)
            targets.append(budget - n_imp)
            keeps.append(important + sl.start)
            counts.append((n_imp, budget - n_imp))
        diverse = remove_duplicates_batch([feats[r] for r in residuals], [score[r] for r in residuals], targets)
        keeps += [r[d] for r, d in zip(residuals, diverse)]
        keep = torch.sort(torch.cat(keeps)).values
        return Selection(keep=keep, info={"important_diverse": counts})

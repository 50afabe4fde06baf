"""``vispruner`` — "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs" (Zhang et al., ICCV 2025, arXiv 2412.01818v2). Default = the official code,
Theia-4869/VisPruner ``llava/model/llava_arch.py::LlavaMetaForCausalLM.encode_images``.

Vision stage, per crop. Of each crop's budget ``b``:

* *important* tokens: the ``int(b · important_ratio)`` patches with the largest head-averaged
  [CLS]→patch attention at the feature layer (LLaVA: the attention of the block whose output is
  ``hidden_states[-2]``; default ``important_ratio = 0.5``, the official ``--important_ratio``);
* *diverse* tokens: the other patches, listed by decreasing attention, lose near-duplicates in rounds
  (``dedup="bipartite"``, the official code) until ``b - important`` remain. Each round splits the
  list into its even and odd positions; every even-position token scores its largest cosine
  similarity (features of the feature layer) to an odd-position token; the ``r = min(8, left to
  remove)`` highest-scoring even tokens go. The list for the next round: the surviving even tokens by
  decreasing score, then the odd tokens in their order.
* LLaVA-NeXT (``crop_budget="equal"``, the official code): every crop (the base image included) gets
  the same budget, ``keep / crops`` (the remainder to the first crops, never more than a crop holds:
  the excess goes to the next crops that have room). The official ``--visual_token_num`` is this
  per-crop budget: its ``32 * 5 = 160`` tokens are ``keep=160`` here.

Arguments that leave the official code:

* ``dedup="pairwise"``: one token per step from the globally most similar pair still present (the
  member with the lower attention goes, ties: the higher position), until ``b - important`` remain.
  Two near-duplicates are then never both kept while a token whose nearest neighbour is farther away
  was removed — which the official rounds do not guarantee.
* ``crop_budget="proportional"``: LLaVA-NeXT's budget split over crops in proportion to their token
  counts (``split_budget``).

Remaining differences from the official code:

* The official code raises where a round's list has an odd length (on 576-token crops: when
  ``int(b · important_ratio)`` is odd, e.g. ``b = 66, 130``) or where a round would remove more
  even-position tokens than there are (tiny budgets, e.g. ``b = 4, 8``). We run there: all
  even-position tokens compete (``ceil(R/2)``, what the official indexing means), and a round removes
  at most that many.
* LLaVA-NeXT ``layout="model"``: the official code selects on each crop's full 24×24 grid and the
  unpadding then drops the chosen tokens that fall in the padding, so a padded crop ends with fewer
  than its budget; here the candidates are the unpadded patches only, so every crop keeps its whole
  budget. ``layout="flat"`` gives the official selection on the full grids (without the unpadding
  and newline tokens that the official LLaVA-NeXT code adds afterwards).
* Precision: the cosine similarities are computed as the official code does, in the features' dtype,
  and ranked with the same unstable ``argsort``, so equal scores (frequent in fp16) fall in the order
  the official code gets on the same device. The attention ranking the important tokens is vtprune's
  fp32 ``ctx.cls_attention``; the official code ranks the attention as the tower returns it (fp16 for
  an fp16 model), so near-equal attentions may rank differently on a real model.
* Qwen2.5-VL / Qwen3-VL: the official repository has no code for them (its ``llava_qwen`` model is not
  wired to VisPruner's budget). Its CLS-less SigLIP tower ranks by the attention each patch receives
  at the tower's last block, averaged over queries and heads; we do the same with
  ``ctx.received_attention`` over Qwen's merged tokens (the 2×2 groups).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import ArgumentError
from .base import Method, Selection, Stage, mask_indices, register_method, sorted_topk, split_budget

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


PER_ROUND = 8  # the official code's near-duplicates removed per round


def removal_rounds(residual: int, diverse: int) -> list[int]:
    """How many tokens each round of :func:`bipartite_dedup` removes, from ``residual`` tokens down to
    ``diverse``: ``min(8, left to remove)``, never more than the even positions of the round's list."""
    rounds = []
    while residual > diverse:
        r = min(PER_ROUND, residual - diverse, (residual + 1) // 2)
        rounds.append(r)
        residual -= r
    return rounds


def bipartite_dedup(features: torch.Tensor, order: torch.Tensor, diverse: int) -> torch.Tensor:
    """The official rounds of near-duplicate removal on a batch of crops of equal sizes.

    ``features`` (B, N, D) each crop's features; ``order`` (B, R) the residual tokens (positions in
    the crop) by decreasing attention. Returns (B, diverse) the positions that remain, in the list order
    of the last round. Each round: the even positions of the list each score their largest cosine
    similarity to an odd position; the ``r`` highest-scoring even tokens go; the survivors, by decreasing
    score, then the odd tokens form the next list."""
    if diverse <= 0:
        return order[:, :0]
    unit = features / features.norm(dim=-1, keepdim=True)  # in the features' dtype, as the official code
    for r in removal_rounds(order.shape[1], diverse):
        even, odd = order[:, ::2], order[:, 1::2]
        best = torch.bmm(gather_rows(unit, even), gather_rows(unit, odd).transpose(1, 2)).amax(dim=-1)
        survivors = best.argsort(dim=-1, descending=True)[:, r:]  # unstable, as the official code: same ties
        order = torch.cat([even.gather(1, survivors), odd], dim=1)
    return order


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, K, D) rows ``index`` (B, K) of each batch entry of ``x`` (B, N, D)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def equal_budget(total: int, sizes: list[int]) -> list[int]:
    """``total`` split equally over groups of ``sizes`` (the remainder to the first groups), never more
    than a group holds: what a full group cannot take goes to the next groups with room."""
    out = [0] * len(sizes)
    left = total
    while left > 0 and any(o < s for o, s in zip(out, sizes)):
        open_groups = [i for i, (o, s) in enumerate(zip(out, sizes)) if o < s]
        share, extra = divmod(left, len(open_groups))
        for rank, i in enumerate(open_groups):
            add = min(share + (rank < extra), sizes[i] - out[i])
            out[i] += add
            left -= add
    return out


@register_method
class VisPruner(Method):
    name = "vispruner"
    needs_budget = True
    stages = (Stage.VISION,)
    default_positions = "contiguous"
    official_code = ("Theia-4869/VisPruner@aefa01adc7c7ce6334e880c88225e90cede760d1 "
                     "llava/model/llava_arch.py::LlavaMetaForCausalLM.encode_images")

    def __init__(self, keep: int | None = None, ratio: float | None = None,
                 important_ratio: float = 0.5, dedup: Literal["bipartite", "pairwise"] = "bipartite",
                 crop_budget: Literal["equal", "proportional"] = "equal", seed: int = 0):
        super().__init__(keep=keep, ratio=ratio, seed=seed)
        if not 0.0 <= important_ratio <= 1.0:
            raise ArgumentError(f"vispruner: important_ratio={important_ratio!r} is not allowed; it lies in [0, 1].")
        self.important_ratio = important_ratio
        self.dedup = dedup
        self.crop_budget = crop_budget

    def crop_budgets(self, total: int, sizes: list[int]) -> list[int]:
        return equal_budget(total, sizes) if self.crop_budget == "equal" else split_budget(total, sizes)

    def select_vision(self, ctx):
        n = ctx.num_tokens
        score = importance(ctx)
        sizes = [sl.stop - sl.start for sl in ctx.crop_slices]
        budgets = self.crop_budgets(self.budget(n), sizes)
        select = self.select_bipartite if self.dedup == "bipartite" else self.select_pairwise
        keep, counts = select(ctx, score, budgets)
        return Selection(keep=torch.sort(keep).values, info={"important_diverse": counts})

    def select_bipartite(self, ctx, score: torch.Tensor, budgets: list[int]):
        """The official code, per crop; crops of equal size and budget run as one batch."""
        groups: dict[tuple[int, int], list[slice]] = {}
        for sl, budget in zip(ctx.crop_slices, budgets):
            groups.setdefault((sl.stop - sl.start, budget), []).append(sl)
        keeps = [torch.zeros(0, dtype=torch.long, device=ctx.features.device)]
        for (size, budget), slices in groups.items():
            kept = self.bipartite_crops(torch.stack([ctx.features[sl] for sl in slices]),
                                        torch.stack([score[sl] for sl in slices]), budget)
            keeps += [k + sl.start for k, sl in zip(kept, slices)]
        counts = [self.counts(budget, sl.stop - sl.start) for sl, budget in zip(ctx.crop_slices, budgets)]
        return torch.cat(keeps), counts

    def bipartite_crops(self, features: torch.Tensor, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """(B, budget) kept positions of B crops of one size: ``features`` (B, N, D), ``scores`` (B, N)."""
        size = scores.shape[1]
        if budget >= size:
            return torch.arange(size, device=scores.device).expand(scores.shape[0], -1)
        n_imp = int(budget * self.important_ratio)
        order = scores.argsort(dim=-1, descending=True)  # unstable, as the official code
        return torch.cat([order[:, :n_imp], bipartite_dedup(features, order[:, n_imp:], budget - n_imp)], dim=1)

    def counts(self, budget: int, size: int) -> tuple[int, int]:
        """(important, diverse) tokens of a crop."""
        if budget >= size:
            return size, 0
        n_imp = int(budget * self.important_ratio)
        return n_imp, budget - n_imp

    def select_pairwise(self, ctx, score: torch.Tensor, budgets: list[int]):
        """One removal per step from the globally most similar pair (``dedup="pairwise"``)."""
        feats = ctx.features
        keeps, counts, residuals, targets = [], [], [], []
        for sl, budget in zip(ctx.crop_slices, budgets):
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
        return torch.cat(keeps), counts

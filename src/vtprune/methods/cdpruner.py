"""``cdpruner`` — "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs" (Zhang et al., NeurIPS 2025, arXiv 2506.10967).

Projected stage, per crop. A conditional determinantal point process over a crop's tokens:

* similarity ``S = cos(x_i, x_j)`` of the projected visual tokens;
* relevance ``r_i``: the mean cosine similarity of token ``i`` to the instruction's tokens,
  min–max normalised to (0, 1] (``(r - min + 1e-6) / (max - min)`` as the official code);
  optionally sharpened as ``exp(θ / (2(1-θ)) · r)`` (the paper's θ; off by default, as in the code);
* kernel ``L = diag(r) · S · diag(r)``; the kept set is the greedy MAP of the DPP, computed with the
  incremental Cholesky update of Chen et al. (NeurIPS 2018, "Fast Greedy MAP Inference for DPP").

With ``relevance=False`` the kernel is ``S`` alone (a plain, instruction-agnostic DPP).

Differences from the paper / official code:

* Instruction embeddings: for LLaVA the paper compares CLIP image embeddings with CLIP text-encoder
  embeddings of the instruction. No text tower is loaded here, so on every family the instruction is
  represented by the LLM's own input embeddings of the text after the image (``ctx.text_embeddings``),
  compared with the projected visual tokens. The official LLaVA code negates the CLIP relevance (an
  effect its authors saw only with CLIP); we do not.
* An instruction with no text tokens makes the DPP unconditional (``info['relevance'] = 'none'``).
* If the kernel's rank is exhausted before the budget is met (more tokens than independent directions),
  the remaining picks follow the largest residual gain without further updates, so the method always
  returns exactly the budget. ``info['degenerate_after']`` (a tensor, one entry per crop with a budget)
  says after how many picks that happened; an entry equal to the crop's budget means never.
* LLaVA-NeXT: the image budget is split over crops in proportion to their token counts
  (``split_budget``); the official code gives each crop the same budget.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ArgumentError
from .base import Method, Selection, Stage, register, split_budget, to_device

_REL_EPS = 1e-9  # a residual below this fraction of the item's own diagonal counts as zero


def greedy_dpp_map(kernel: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy MAP of a DPP with PSD ``kernel`` (N, N): at every step add the item with the largest
    marginal gain ``det(L_{S+i}) / det(L_S)``, kept up to date by an incremental Cholesky
    factorisation. Returns the picked indices in order and, as a 0-d tensor, the number of picks made
    before the gains vanished (``k`` if they never did).

    One step per pick, tensor operations only: nothing is read back to the host, so the loop queues
    its work on a GPU without waiting for it. Once a gain vanishes the factorisation is frozen (the
    update is multiplied out by a mask rather than skipped by a Python ``if``)."""
    n = kernel.shape[0]
    L = kernel.double()
    c = torch.zeros(k, n, dtype=L.dtype, device=L.device)
    d2 = torch.diagonal(L).clone()
    floor = d2.clamp(min=0) * _REL_EPS
    picked = []
    chosen = torch.zeros(n, dtype=torch.bool, device=L.device)
    updated = torch.zeros(k, dtype=torch.bool, device=L.device)  # True while no gain has vanished
    ok = torch.ones(1, dtype=torch.bool, device=L.device)
    for t in range(k):
        j = torch.argmax(d2.masked_fill(chosen, -float("inf"))).view(1)  # ties: lower index
        picked.append(j)
        dj = d2.index_select(0, j)
        ok = ok & (dj > floor.index_select(0, j))  # once False, False for good
        updated[t:t + 1] = ok
        e = (L.index_select(0, j).squeeze(0) - c[:t].index_select(1, j).squeeze(1) @ c[:t]) / torch.sqrt(dj)
        e = torch.where(ok, e, 0.0)  # frozen: c[t] = 0 and d2 unchanged
        c[t] = e
        d2 = d2 - e * e
        chosen.index_fill_(0, j, True)
    return torch.cat(picked), updated.sum()


def relevance_scores(features: torch.Tensor, text: torch.Tensor, theta: float | None) -> torch.Tensor:
    """Per-token instruction relevance in (0, 1] (or its exp-sharpened form)."""
    sim = F.normalize(features.float(), dim=-1) @ F.normalize(to_device(text.float(), features.device), dim=-1).T
    r = sim.mean(dim=1)
    spread = r.max() - r.min()
    r = torch.where(spread > 0, (r - r.min() + 1e-6) / spread, torch.ones_like(r))
    if theta is not None:
        r = torch.exp(theta / (2 * (1 - theta)) * r)
    return r


@register
class CDPruner(Method):
    name = "cdpruner"
    needs_budget = True
    stages = (Stage.PROJECTED,)

    def __init__(self, keep: int | None = None, ratio: float | None = None,
                 relevance: bool = True, theta: float | None = None,
                 seed: int = 0):
        super().__init__(keep=keep, ratio=ratio, seed=seed)
        if theta is not None and not 0.0 <= theta < 1.0:
            raise ArgumentError(f"cdpruner: theta={theta!r} is not allowed; theta lies in [0, 1).")
        self.relevance = relevance
        self.theta = theta

    def kernel(self, features: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        xn = F.normalize(features.float(), dim=-1)
        sim = xn @ xn.T
        if text is None or text.shape[0] == 0:
            return sim
        r = relevance_scores(features, text, self.theta)
        return r[:, None] * sim * r[None, :]

    def select_projected(self, ctx):
        total = self.budget(ctx.num_tokens)
        text = ctx.text_embeddings if self.relevance else None
        mode = "off" if not self.relevance else ("none" if text.shape[0] == 0 else "instruction")
        sizes = [sl.stop - sl.start for sl in ctx.crop_slices]
        keeps, degenerate = [], []
        for sl, budget in zip(ctx.crop_slices, split_budget(total, sizes)):
            if budget == 0:
                continue
            picked, deg = greedy_dpp_map(self.kernel(ctx.features[sl], text), budget)
            keeps.append(picked + sl.start)
            degenerate.append(deg)
        keep = torch.sort(torch.cat(keeps)).values
        # per crop with a budget: the picks made before the gains vanished (= its budget if never)
        return Selection(keep=keep, info={"relevance": mode, "degenerate_after": torch.stack(degenerate)})


def log_det(kernel: torch.Tensor, subset: torch.Tensor) -> float:
    """log det of the kernel restricted to ``subset`` (a helper for tests and diagnostics)."""
    sub = kernel.double()[subset][:, subset]
    sign, value = torch.linalg.slogdet(sub)
    return float(value) if float(sign) > 0 else -math.inf  # sync: a diagnostic returning a float, never called while pruning

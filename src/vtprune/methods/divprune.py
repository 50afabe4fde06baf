"""``divprune`` — "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
(Alvar et al., CVPR 2025, arXiv 2503.02175).

Projected stage (after the projector, before the LLM). Pruning is posed as a Max–Min Diversity
Problem: choose the ``k`` tokens whose minimum pairwise cosine distance (``1 - cos``) is as large as
possible, solved greedily: start from one token, then repeatedly add the token whose distance to its
nearest already-selected token is largest (farthest-first traversal).

Written from the paper's description only (the authors' code is under a non-commercial licence and was
not used).

Differences from the paper:

* First token: we start from the most isolated token (largest distance to its nearest neighbour), the
  natural seed for the max–min objective; ties everywhere are broken by the lower index.
* LLaVA-NeXT: all crops of an image form one candidate set (no per-crop budget).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, Selection, Stage, register


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    xn = F.normalize(x.float(), dim=-1)
    return (1.0 - xn @ xn.T).clamp_(min=0.0)


def max_min_greedy(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max–min diversity selection on a (N, N) distance matrix; returns the k indices in the
    order they were picked. One step per pick, a few tensor operations each, no host synchronisation
    (the picks stay on the device)."""
    n = dist.shape[0]
    off_diag = dist.clone()
    off_diag.fill_diagonal_(float("inf"))
    nearest = off_diag.min(dim=1).values if n > 1 else torch.zeros(1, device=dist.device)
    j = torch.argmax(nearest).view(1)  # first maximum: ties to the lower index
    picked = [j]
    # distance of every token to its nearest selected token; selected tokens sit at -inf
    # (min(-inf, d) = -inf), so argmax never picks one twice
    gap = dist.index_select(0, j).squeeze(0).index_fill_(0, j, -float("inf"))
    for _ in range(1, k):
        j = torch.argmax(gap).view(1)
        picked.append(j)
        gap = torch.minimum(gap, dist.index_select(0, j).squeeze(0)).index_fill_(0, j, -float("inf"))
    return torch.cat(picked)


@register
class DivPrune(Method):
    name = "divprune"
    needs_budget = True
    stages = (Stage.PROJECTED,)

    def select_projected(self, ctx):
        k = self.budget(ctx.num_tokens)
        dist = cosine_distance(ctx.features)
        order = max_min_greedy(dist, k)
        keep = torch.sort(order).values
        sub = dist[keep][:, keep] + torch.diag(torch.full((k,), float("inf"), device=dist.device))
        # a 0-d tensor on the features' device (float(...) to read it)
        return Selection(keep=keep, info={"min_pairwise_distance": sub.min() if k > 1 else None})

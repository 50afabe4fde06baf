"""``divprune`` — "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
(Alvar et al., CVPR 2025, arXiv 2503.02175).

Projected stage (after the projector, before the LLM). Pruning is posed as a Max–Min Diversity
Problem: choose the ``k`` tokens whose minimum pairwise cosine distance (``1 - cos``) is as large as
possible, solved greedily: start from the most isolated token (largest distance to its nearest
neighbour), then repeatedly add the token whose distance to its nearest already-selected token is
largest (farthest-first traversal). Ties go to the lower index.

Official code: vbdi/divprune (``LlavaMetaForCausalLM.DivPrune`` in ``LLaVA/llava/model/llava_arch.py``,
see ``official_code``). It is under a non-commercial licence: this implementation was written from the
paper; the official function was only run outside this project to produce the parity fixtures
(``tests/fixtures/parity/divprune.json``), which this default matches index for index on LLaVA-1.5-shaped
inputs (576 tokens) and on LLaVA-NeXT-shaped ones (base image + 4 crops as one candidate set, as the
official code takes all of an image's tokens). The LLM sees the kept tokens at contiguous positions.

Remaining differences from the official code:

* LLaVA-NeXT newline tokens: the official code selects among *all* of the image's tokens in the LLM
  sequence, the ``image_newline`` tokens included, and a ratio applies to that count. All newline tokens
  share one embedding, so the official selection keeps at most about one of them. Here the candidates are
  the patch tokens only; newline tokens are always kept and are outside the budget (a ratio applies to the
  patch tokens). On LLaVA-1.5 (no newline tokens) the two agree.
* LLaVA-NeXT candidate order: the official order is the LLM sequence's (base image, then the unpadded crops
  row by row); here it is crop-major. The order only matters for exactly tied distances.
* Precision: the official code computes the distances in the embeddings' dtype (fp16 in its evaluation);
  here they are computed in fp32.
* Selected tokens are excluded from later picks explicitly, and the first pick uses each token's
  off-diagonal minimum distance; the official code relies on a token's distance to itself being the
  smallest in its column (about 0). The two differ only for (near-)duplicate tokens.
* The official code locates the image at a fixed offset (35 tokens, the Vicuna system prompt) in the first
  sample of the batch and applies that sample's selection to the whole batch; here every image of every
  sample is located and pruned on its own.
* Budgets: the official code takes a ratio (``int(round(ratio * n))``); ``keep=N`` here equals the ratio
  ``N / n``, and a ratio never yields fewer than one token.
* Qwen2.5-VL / Qwen3-VL: the official repository has no Qwen code; the same selection runs on the merged
  (2×2) visual tokens after the merger.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, Selection, Stage, register_method


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


@register_method
class DivPrune(Method):
    name = "divprune"
    needs_budget = True
    default_positions = "contiguous"
    official_code = ("vbdi/divprune@799e2d950aa01ba7860907f5a6d86061f885dca6 "
                     "LLaVA/llava/model/llava_arch.py::LlavaMetaForCausalLM.DivPrune")
    stages = (Stage.PROJECTED,)

    def select_projected(self, ctx):
        k = self.budget(ctx.num_tokens)
        dist = cosine_distance(ctx.features)
        order = max_min_greedy(dist, k)
        keep = torch.sort(order).values
        sub = dist[keep][:, keep] + torch.diag(torch.full((k,), float("inf"), device=dist.device))
        # a 0-d tensor on the features' device (float(...) to read it)
        return Selection(keep=keep, info={"min_pairwise_distance": sub.min() if k > 1 else None})

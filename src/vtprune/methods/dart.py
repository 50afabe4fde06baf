"""``dart`` — "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More" (Wen et al., EMNLP 2025, arXiv 2502.11494).

LLM stage, decoder layer K = 2. No attention map is needed:

1. *pivots*: the 4 visual and the 4 text tokens (text after the image) whose keys at layer K−1 have the
   largest L1 norm (all heads concatenated);
2. the visual pivots are kept; the rest of the budget is shared out over the 8 pivots, and each pivot
   in turn keeps the not-yet-kept visual tokens least cosine-similar to itself (hidden states entering
   layer K), i.e. the tokens that duplicate it least.

Differences from the paper / official code:

* Exact budget: the official code keeps ``pivots + 8 · (budget // 8)`` tokens (e.g. 132 for 128);
  we keep exactly ``keep``: the ``keep - 4`` non-pivot slots are split over the pivots as evenly as
  possible (visual pivots first, in decreasing key norm, then text pivots).
* Exact duplicates: a token identical (cosine ≥ ``1 - duplicate_eps``) to one already kept is passed
  over while other tokens remain (taken last, in the same order, if the budget needs them), so two
  identical tokens are never both kept while a distinct token is dropped. The official per-pivot
  top-k can keep both copies.
* Cosine similarity is computed on the hidden states entering layer K as they are; the official code
  applies the LLM's final RMSNorm first (its per-channel weight slightly changes cosines).
* Fewer than 4 text tokens after the image: as many text pivots as there are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ArgumentError, UnsupportedMethodError
from .base import Method, Selection, Stage, register


@register
class DART(Method):
    name = "dart"
    needs_budget = True
    stages = (Stage.LLM,)

    def __init__(self, keep: int | None = None, ratio: float | None = None,
                 layer: int = 2, pivot_visual: int = 4, pivot_text: int = 4,
                 duplicate_eps: float = 1e-6, seed: int = 0):
        super().__init__(keep=keep, ratio=ratio, seed=seed)
        if layer < 1:
            raise ArgumentError(f"dart: layer={layer!r} is not allowed; "
                                f"dart reads the keys of layer K-1, so layer must be ≥ 1.")
        if pivot_visual < 0 or pivot_text < 0 or pivot_visual + pivot_text == 0:
            raise ArgumentError(f"dart: pivot_visual={pivot_visual!r}, pivot_text={pivot_text!r} are not allowed; "
                                f"both must be ≥ 0 and at least one > 0.")
        self.llm_layers = (layer,)
        self.pivot_visual = pivot_visual
        self.pivot_text = pivot_text
        self.duplicate_eps = duplicate_eps

    def select_llm(self, ctx):
        v = len(ctx.visual)
        k = self.budget(v)
        keys = ctx.keys()  # (H_kv, L, hd)
        device = keys.device
        norms = keys.float().abs().sum(dim=(0, 2))  # (L,) L1 norm over all heads
        visual = ctx.visual.to(device)
        text = ctx.text_after.to(device)
        n_tp = min(self.pivot_text, len(text))
        vis_order = torch.sort(norms[visual], descending=True, stable=True).indices.tolist()  # into visual
        txt_piv = text[torch.sort(norms[text], descending=True, stable=True).indices[:n_tp]]

        hidden = ctx.hidden.to(device).float()
        xv = F.normalize(hidden[visual], dim=-1)  # (V, D)
        kept = [False] * v
        kept_rows = torch.zeros(k, xv.shape[1], device=device)
        n_kept = 0
        deferred: list[int] = []  # exact duplicates of kept tokens, in the order they were passed over
        is_deferred: set[int] = set()

        def duplicate(i: int) -> bool:
            return n_kept > 0 and float((kept_rows[:n_kept] @ xv[i]).max()) >= 1.0 - self.duplicate_eps

        def take(i: int) -> None:
            nonlocal n_kept
            kept[i] = True
            kept_rows[n_kept] = xv[i]
            n_kept += 1

        # visual pivots: largest key norm, skipping exact duplicates of pivots already taken
        vis_piv = []
        for i in vis_order:
            if len(vis_piv) >= min(self.pivot_visual, k):  # (vis_piv indexes ctx.visual)
                break
            if not duplicate(i):
                take(i)
                vis_piv.append(i)
        if not vis_piv and n_tp == 0:
            raise UnsupportedMethodError("Method 'dart' found no pivot token (no visual pivots and no text).")
        pivots = torch.cat([xv[vis_piv], F.normalize(hidden[txt_piv], dim=-1)])  # (P, D)
        sim = pivots @ xv.T  # (P, V)

        rest = k - n_kept
        p = pivots.shape[0]
        quota = [rest // p + (1 if j < rest % p else 0) for j in range(p)]
        orders = torch.sort(sim, dim=1, stable=True).indices.tolist()  # ascending similarity per pivot
        for j in range(p):
            need, cursor, order = quota[j], 0, orders[j]
            while need > 0 and cursor < v:
                i = order[cursor]
                cursor += 1
                if kept[i] or i in is_deferred:
                    continue
                if duplicate(i):
                    deferred.append(i)
                    is_deferred.add(i)
                    continue
                take(i)
                need -= 1
        # a pivot runs out only when every token is kept or an exact duplicate of a kept one
        for i in deferred:
            if n_kept >= k:
                break
            take(i)
        keep = torch.tensor([i for i in range(v) if kept[i]], dtype=torch.long)
        info = {"visual_pivots": len(vis_piv), "text_pivots": int(n_tp)}
        return Selection(keep=keep.to(ctx.visual.device), info=info)

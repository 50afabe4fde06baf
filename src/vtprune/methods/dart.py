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
from .base import Method, Selection, Stage, mask_indices, register, to_device


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
        visual = to_device(ctx.visual, device)
        text = to_device(ctx.text_after, device)
        n_tp = min(self.pivot_text, len(text))
        n_vp = min(self.pivot_visual, k)
        if n_vp == 0 and n_tp == 0:  # (the first visual pivot is always found when there is one to find)
            raise UnsupportedMethodError("Method 'dart' found no pivot token (no visual pivots and no text).")
        vis_order = torch.sort(norms[visual], descending=True, stable=True).indices  # into visual
        txt_piv = text[torch.sort(norms[text], descending=True, stable=True).indices[:n_tp]]

        hidden = ctx.hidden.to(device).float()
        xv = F.normalize(hidden[visual], dim=-1)  # (V, D)
        # Everything below is tensor work of fixed shapes, one step per kept token; nothing is read back.
        # blocked: kept, or an exact duplicate (cosine ≥ 1 - eps) of a kept token — never taken in a pass.
        # Each step records its token, whether it took it, and where in the order it was found.
        blocked = torch.zeros(v, dtype=torch.bool, device=device)
        threshold = 1.0 - self.duplicate_eps
        n_b = k - min(n_vp, 1)  # pass steps: the non-pivot slots, ≤ k - 1 when there is a visual pivot
        toks = torch.zeros(n_vp + n_b, dtype=torch.long, device=device)
        took = torch.zeros(n_vp + n_b, dtype=torch.bool, device=device)
        found = torch.zeros(n_vp + n_b, dtype=torch.long, device=device)

        def step(s: int, order: torch.Tensor, active: torch.Tensor | bool) -> torch.Tensor:
            """Take the first token of ``order`` not blocked, where ``active`` holds and one is left."""
            is_blocked, pos = blocked.index_select(0, order).min(dim=0)  # the first free one, if any
            tok = order.index_select(0, pos.view(1))
            act = ~is_blocked & active
            dup = (xv @ xv.index_select(0, tok).squeeze(0) >= threshold).index_fill_(0, tok, True)
            blocked.logical_or_(dup & act)
            toks[s:s + 1] = tok
            took[s] = act
            found[s] = pos
            return tok

        # visual pivots: largest key norm, skipping exact duplicates of pivots already taken
        vis_piv = [step(s, vis_order, True) for s in range(n_vp)]
        n_vis = took[:n_vp].sum()
        valid = torch.cat([took[:n_vp], torch.ones(n_tp, dtype=torch.bool, device=device)])  # pivots that exist
        vis_rows = xv[torch.cat(vis_piv)] if vis_piv else xv[:0]
        pivots = torch.cat([vis_rows, F.normalize(hidden[txt_piv], dim=-1)])  # (P, D)
        sim = pivots @ xv.T  # (P, V)
        p = pivots.shape[0]

        # the non-pivot slots, split over the pivots that exist as evenly as possible, in pivot order
        rest, n_piv = k - n_vis, n_vis + n_tp
        rank = torch.cumsum(valid, 0) - 1
        quota = torch.where(valid, rest // n_piv + (rank < rest % n_piv).long(), 0)
        steps = torch.arange(n_b, device=device)
        pivot_of = torch.searchsorted(torch.cumsum(quota, 0), steps, right=True)  # = p once the quotas are used up
        active = pivot_of < p
        pivot_of = pivot_of.clamp(max=p - 1)
        orders = torch.sort(sim, dim=1, stable=True).indices  # ascending similarity per pivot
        by_step = orders.index_select(0, pivot_of)  # (steps, V): the order each step walks
        for s in range(n_b):
            step(n_vp + s, by_step[s], active[s])
        # how far each pivot's cursor walked its order: past its last take, or to the end if it ran out
        t_b, f_b = took[n_vp:], found[n_vp:]
        walked = torch.where(t_b, f_b + 1, torch.where(active, v, 0))
        cursor = torch.zeros(p, dtype=torch.long, device=device).scatter_reduce_(0, pivot_of, walked, "amax")
        kept = torch.zeros(v, dtype=torch.long, device=device).scatter_add_(0, toks, took.long()) > 0
        # tokens a cursor walked past without taking them were exact duplicates of kept ones: they are taken
        # last, in the order they were passed over (pivot by pivot, then along the pivot's order), if needed
        positions = torch.arange(v, device=device)
        where = torch.empty_like(orders).scatter_(1, orders, positions.expand(p, v))  # position in each order
        passed = (where < cursor[:, None]) & ~kept
        first_pass = torch.where(passed, torch.arange(p, device=device)[:, None] * v + where, p * v).amin(0)
        by_pass = torch.sort(first_pass, stable=True).indices
        extra = torch.zeros(v, dtype=torch.bool, device=device).scatter_(
            0, by_pass, positions < k - kept.sum()) & (first_pass < p * v)
        keep = mask_indices(kept | extra, k)
        info = {"visual_pivots": n_vis, "text_pivots": n_tp}
        return Selection(keep=keep, info=info)

"""``dart`` — "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More" (Wen et al., EMNLP 2025, arXiv 2502.11494).

LLM stage, decoder layer K = 2. No attention map is needed:

1. *pivots*: the 4 visual and the 4 text tokens (text after the image) whose keys at layer K−1 have the
   largest L1 norm (all heads concatenated, after RoPE);
2. the visual pivots are kept; each pivot in turn keeps the not-yet-kept visual tokens least
   cosine-similar to itself, i.e. the tokens that duplicate it least. Similarities are taken on the
   hidden states entering layer K.

Defaults as the official code (``ZichenWen1/DART``, ``llava/model/language_model/modeling_llama_self.py``,
``DART.get_retained_image_token``, last upstream commit 5a19452, read from the fork xqy1111111/DART;
tests/fixtures/parity/dart.json), each with the corrected behaviour one argument away:

* ``budget_rule="official"``: every pivot keeps ``keep // 8`` tokens (``max_num_trunction // (pivots)``),
  so ``4 + 8 · (keep // 8)`` tokens are kept (132 for keep=128, 4 for keep=5), at most all of them.
  ``budget_rule="exact"`` keeps exactly ``keep``: the ``keep - 4`` non-pivot slots are split over the
  pivots as evenly as possible (the first pivots in processing order get one more).
* ``pivot_order="set"``: the pivots are processed in the order in which the official code's Python
  ``set`` of their sequence positions iterates (CPython's hash table order of small ints, emulated
  here with tensor ops), which depends on where the image sits in the prompt. As each pivot takes
  tokens the next ones cannot, the order changes the result. ``pivot_order="norm"`` processes them
  as ranked: visual pivots by decreasing key norm, then text pivots.
* ``similarity="final_norm"``: the official code applies the LLM's final norm (RMSNorm with its
  per-channel weight) to the hidden states before the cosine similarities; ``similarity="raw"`` uses
  the hidden states as they are.
* ``duplicate_eps=None``: no special treatment of exact duplicates (as the official top-k). With a
  value, a token identical (cosine ≥ ``1 - duplicate_eps``) to one already kept is passed over while
  other tokens remain (taken last, if the budget needs them), so two identical tokens are never both
  kept while a distinct token is dropped.

Positions stay the original ones (the official code sets ``position_ids = keep_indexs``).

Remaining differences from the official code:

* Fewer than 4 text tokens after the image: as many text pivots as there are (the official top-k fails).
* ``keep`` above ``V - 4``: the official top-k would fail; we keep at most all visual tokens.
* The official code computes the norms and similarities in the model's dtype (fp16); we compute them in
  fp32 from the model's tensors, which can only reorder near-ties.
* LLaVA-NeXT with the model's layout: the official code treats every token of the image span,
  newline tokens included, as a candidate; here newline tokens are kept and never candidates, so the
  candidates, the budget's reference and (through the positions) the pivots' set order can differ.
  Its ``retain_token_num_for_llava_next`` is our ``keep``.
* Qwen2-VL / Qwen2.5-VL: the authors' Qwen code is not ported separately; the same selection runs on
  the Qwen adapters' contexts.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import ArgumentError, UnsupportedMethodError
from .base import Method, Selection, Stage, mask_indices, register_method, to_device

def python_set_order(values: torch.Tensor) -> torch.Tensor:
    """The order in which the official code's ``list(set(values.tolist()))`` yields the pivots' sequence
    positions ``values`` (as indices into ``values``): the interpreter's own ``set`` on the ≤ 8 positions
    read back, which is CPython's hash-table order by construction. A position given twice (a visual
    pivot that was not found repeats one that was; it takes no tokens) follows the distinct ones."""
    host = values.tolist()  # sync: the ≤ 8 pivot positions, for CPython's set order (once per stage)
    first = {}
    for i, v in enumerate(host):  # host: the ≤ 8 Python ints read back above
        first.setdefault(v, i)
    order = [first[v] for v in set(host)]  # host: as above
    order += sorted(set(range(len(host))) - set(order))
    return torch.tensor(order, dtype=torch.long, device=values.device)  # host: ≤ 8 Python ints


@register_method
class DART(Method):
    name = "dart"
    needs_budget = True
    stages = (Stage.LLM,)
    official_code = ("ZichenWen1/DART@5a19452fc173017191c247848673e0bde755695a "
                     "llava/model/language_model/modeling_llama_self.py::DART.get_retained_image_token")

    def __init__(self, keep: int | None = None, ratio: float | None = None,
                 layer: int = 2, pivot_visual: int = 4, pivot_text: int = 4,
                 budget_rule: Literal["official", "exact"] = "official",
                 pivot_order: Literal["set", "norm"] = "set",
                 similarity: Literal["final_norm", "raw"] = "final_norm",
                 duplicate_eps: float | None = None, seed: int = 0):
        super().__init__(keep=keep, ratio=ratio, seed=seed)
        if layer < 1:
            raise ArgumentError(f"dart: layer={layer!r} is not allowed; "
                                f"dart reads the keys of layer K-1, so layer must be ≥ 1.")
        if pivot_visual < 0 or pivot_text < 0 or pivot_visual + pivot_text == 0:
            raise ArgumentError(f"dart: pivot_visual={pivot_visual!r}, pivot_text={pivot_text!r} are not allowed; "
                                f"both must be ≥ 0 and at least one > 0.")
        if duplicate_eps is not None and not 0.0 <= duplicate_eps < 1.0:
            raise ArgumentError(f"dart: duplicate_eps={duplicate_eps!r} is not allowed; give None or a value in [0, 1).")
        self.llm_layers = (layer,)
        self.pivot_visual = pivot_visual
        self.pivot_text = pivot_text
        self.budget_rule = budget_rule
        self.pivot_order = pivot_order
        self.similarity = similarity
        self.duplicate_eps = duplicate_eps

    def kept_count(self, k: int, visual: int, n_vp: int, n_tp: int) -> int:
        """Visual tokens kept for a budget of ``k``: exactly ``k``, or the official
        ``n_vp + (n_vp + n_tp) · (k // (pivot_visual + pivot_text))`` (at most ``visual``)."""
        if self.budget_rule == "exact":
            return k
        return min(visual, n_vp + (n_vp + n_tp) * (k // (self.pivot_visual + self.pivot_text)))

    def select_llm(self, ctx):
        v = len(ctx.visual)
        keys = ctx.keys()  # (H_kv, L, hd)
        device = keys.device
        norms = keys.float().abs().sum(dim=(0, 2))  # (L,) L1 norm over all heads
        visual = to_device(ctx.visual, device)
        text = to_device(ctx.text_after, device)
        n_tp = min(self.pivot_text, len(text))
        n_vp = min(self.pivot_visual, v if self.budget_rule == "official" else self.budget(v))
        k = self.kept_count(self.budget(v), v, n_vp, n_tp)
        if n_vp == 0 and n_tp == 0:  # (the first visual pivot is always found when there is one to find)
            raise UnsupportedMethodError("Method 'dart' found no pivot token (no visual pivots and no text).")
        vis_order = torch.sort(norms[visual], descending=True, stable=True).indices  # into visual
        txt_piv = text[torch.sort(norms[text], descending=True, stable=True).indices[:n_tp]]

        hidden = ctx.hidden.to(device)
        hidden = (ctx.final_norm(hidden) if self.similarity == "final_norm" else hidden).float()
        xv = F.normalize(hidden[visual], dim=-1)  # (V, D)
        # Everything below is tensor work of fixed shapes, one step per kept token; nothing is read back.
        # blocked: kept, or an exact duplicate (cosine ≥ 1 - eps) of a kept token — never taken in a pass.
        # Each step records its token, whether it took it, and where in the order it was found.
        blocked = torch.zeros(v, dtype=torch.bool, device=device)
        threshold = None if self.duplicate_eps is None else 1.0 - self.duplicate_eps
        n_b = k - min(n_vp, 1)  # pass steps: the non-pivot slots, ≤ k - 1 when there is a visual pivot
        toks = torch.zeros(n_vp + n_b, dtype=torch.long, device=device)
        took = torch.zeros(n_vp + n_b, dtype=torch.bool, device=device)
        found = torch.zeros(n_vp + n_b, dtype=torch.long, device=device)

        def step(s: int, order: torch.Tensor, active: torch.Tensor | bool) -> torch.Tensor:
            """Take the first token of ``order`` not blocked, where ``active`` holds and one is left."""
            is_blocked, pos = blocked.index_select(0, order).min(dim=0)  # the first free one, if any
            tok = order.index_select(0, pos.view(1))
            act = ~is_blocked & active
            if threshold is None:
                dup = torch.zeros_like(blocked).index_fill_(0, tok, True)
            else:
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

        # the order the pivots take their shares in, and each pivot's share of the non-pivot slots
        if self.pivot_order == "set":
            positions = torch.cat([visual[torch.cat(vis_piv)] if vis_piv else visual[:0], txt_piv])
            process = python_set_order(positions)
        else:
            process = torch.arange(p, device=device)
        valid_seq = valid[process]
        if self.budget_rule == "official":
            quota_seq = torch.where(valid_seq, self.budget(v) // (self.pivot_visual + self.pivot_text), 0)
        else:
            rest, n_piv = k - n_vis, n_vis + n_tp
            rank = torch.cumsum(valid_seq, 0) - 1
            quota_seq = torch.where(valid_seq, rest // n_piv + (rank < rest % n_piv).long(), 0)
        steps = torch.arange(n_b, device=device)
        slot_of_step = torch.searchsorted(torch.cumsum(quota_seq, 0), steps, right=True)  # = p once used up
        active = slot_of_step < p
        pivot_of = process[slot_of_step.clamp(max=p - 1)]
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

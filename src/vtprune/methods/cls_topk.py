"""``cls_topk`` — FasterVLM: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning:
Make VLM Inference Faster" (Zhang et al., arXiv 2412.01818v1).

Keeps the K patches with the largest head-averaged [CLS]→patch attention at the vision feature layer
(the layer LLaVA takes its features from, ``hidden_states[-2]``), before the projector.
Deviation: Qwen2.5-VL / Qwen3-VL towers have no [CLS] token; there we rank merged 2×2 tokens by the
mean attention they receive from all patches at the last vision block, pooled over each 2×2 group
[decision: the paper covers CLS towers only].
On LLaVA-NeXT the ranking runs over all crops of an image at once (each crop scored by its own CLS).
"""
from __future__ import annotations

from .base import Method, Selection, Stage, register_method, sorted_topk


@register_method
class ClsTopK(Method):
    name = "cls_topk"
    needs_budget = True
    stages = (Stage.VISION,)

    def select_vision(self, ctx):
        k = self.budget(ctx.num_tokens)
        if "cls_attention" not in ctx.capabilities:
            scores = ctx.received_attention
        else:
            scores = ctx.cls_attention[:, : ctx.num_tokens].mean(0)
        return Selection(keep=sorted_topk(scores, k), info={})

"""``fastv`` — "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for
Large Vision-Language Models" (Chen et al., ECCV 2024, arXiv 2403.06764).

At decoder layer K the visual tokens least attended by the **last** query token in layer K−1
(head mean) are dropped; layers K.. see only the kept ones. Defaults: K = 2.
Deviations: the paper keeps layers 0..K−1's KV cache at full length; we compact it to the kept
tokens after the prefill (every layer then holds the same tokens, as in our other in-LLM methods),
so decoding attends to fewer tokens in the first K layers too. The budget is given as keep=N visual
tokens (or ratio) rather than the paper's drop ratio R (keep = round((1 − R)·N), as the official code).
The official code averages the heads of the attention in the model's dtype (fp16); we average in fp32,
which can only reorder near-ties. Selection, layer and positions (original) are otherwise the official
code's (tests/fixtures/parity/fastv.json).
"""
from __future__ import annotations

import torch

from ..errors import ArgumentError
from .base import Method, Selection, Stage, register_method, sorted_topk, to_device


@register_method
class FastV(Method):
    name = "fastv"
    needs_budget = True
    stages = (Stage.LLM,)
    official_code = ("pkunlp-icler/FastV@d1659729b5bf1be225e99ee15783deeea80f63b1 "
                     "src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py::LlamaModel.forward")

    def __init__(self, keep: int | None = None, ratio: float | None = None, layer: int = 2, seed: int = 0):
        super().__init__(keep=keep, ratio=ratio, seed=seed)
        if layer < 1:
            raise ArgumentError(f"fastv: layer={layer!r} is not allowed; "
                                f"fastv reads the attention of layer K-1, so layer must be ≥ 1.")
        self.llm_layers = (layer,)

    def select_llm(self, ctx):
        k = self.budget(len(ctx.visual))
        rows = ctx.visual.new_full((1,), ctx.last)  # built where ctx.visual lives, not copied from the host
        attention = ctx.attention(rows).mean(0)[0]  # (L,) head mean
        return Selection(keep=sorted_topk(attention[to_device(ctx.visual, attention.device)], k))

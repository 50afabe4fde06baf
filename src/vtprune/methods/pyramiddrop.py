"""``pyramiddrop`` — "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction" (Xing et al., CVPR 2025, arXiv 2410.17247).

LLM stage, several layers. The decoder is split into stages ending at layers 8, 16 and 24 (LLaVA's
32-layer LLM); at the end of each stage the visual tokens are ranked by the attention the last
instruction token pays to them (head mean) and only the top fraction λ of them continues (default
λ = 0.5 per stage, so 1 → ½ → ¼ → ⅛ of the visual tokens).

Defaults as the official code (``Cooperx521/PyramidDrop``, ``llava/model/modeling_llama_pdrop.py``,
``LlamaModel.pdrop_rank_drop``; tests/fixtures/parity/pyramiddrop.json):

* ``rank_with="layer"``: the attention that ranks the tokens before layer K is computed with layer
  K's own input norm, q/k projections and RoPE on the hidden states entering layer K
  (``ctx.layer_attention``), as the official code does with ``self.layers[rank_layer]``.
  ``rank_with="previous_layer"`` reads the attention layer K−1 computed (``ctx.attention``), which
  needs no extra projection.
* stage ``s`` keeps ``int(V · λ^(s+1))`` of the ``V`` visual tokens that entered the LLM (the
  official ``int(image_tokens · image_token_ratio_list[s+1])``, at least 1).
* positions are renumbered contiguously after each drop (``default_positions``), as the official code
  does (``position_ids = arange(len)``).

Budgets:

* no budget (default): the paper's per-stage ratio ``lam`` (0.5);
* ``keep=N`` / ``ratio=r`` (our addition): ``N`` (or ``r·V``) visual tokens remain after the **last**
  stage; the per-stage ratio is the geometric one ``λ = (N / V)^(1/stages)``, and stage ``s`` keeps
  ``round(V · λ^(s+1))`` (the last exactly ``N``). The layer-averaged equivalent count is what the
  papers' "192 / 128 / 64 tokens" tables use; to match such a setting pass
  ``lam=PyramidDrop.lam_for_average(avg, visual=V, num_layers=32)`` instead.

Remaining differences from the official code:

* The official code casts the softmax probabilities to the model's dtype (fp16) before the head
  mean; we average them in fp32, which can only reorder near-ties.
* ``lam``: the official code takes a list of per-stage ratios; we take one λ and use its powers
  (``λ^(s+1)`` may differ in the last bit from a typed-in list, e.g. 0.3³ vs 0.027).
* LLaVA-NeXT with the model's layout: the official code ranks every token of the image span, newline
  tokens included; here newline tokens are kept and never candidates.
* Qwen: the authors published LLaVA code only; the same ranking runs on the Qwen adapters' contexts
  (``layer_attention`` uses the layer's own q/k norms and multimodal RoPE).
* Layers are given by ``layers`` (default (8, 16, 24)); smaller decoders need their own.
"""
from __future__ import annotations

from typing import Literal

import torch

from ..errors import ArgumentError, BudgetError
from .base import Method, Selection, Stage, register_method, sorted_topk, to_device


@register_method
class PyramidDrop(Method):
    name = "pyramiddrop"
    stages = (Stage.LLM,)
    default_positions = "contiguous"
    official_code = ("Cooperx521/PyramidDrop@6444f304aee4b7edcb022839fb9e8cd07859704a "
                     "llava/model/modeling_llama_pdrop.py::LlamaModel.pdrop_rank_drop")

    def __init__(self, keep: int | None = None, ratio: float | None = None,
                 lam: float | None = None, layers: tuple[int, ...] = (8, 16, 24),
                 rank_with: Literal["layer", "previous_layer"] = "layer", seed: int = 0):
        super().__init__(keep=keep, ratio=ratio, seed=seed)
        if lam is not None and (keep is not None or ratio is not None):
            raise BudgetError("Give either the per-stage ratio lam or a final budget (keep=N / ratio=r), not both.")
        if lam is None and keep is None and ratio is None:
            lam = 0.5
        if lam is not None and not 0.0 < lam < 1.0:
            raise BudgetError(f"lam must lie strictly between 0 and 1, got {lam}.")
        layers = tuple(layers)
        if not layers or any(l < 1 for l in layers) or list(layers) != sorted(set(layers)):
            raise ArgumentError(f"pyramiddrop: layers={layers!r} is not allowed; "
                                f"give increasing decoder layers ≥ 1, e.g. layers=(8, 16, 24).")
        self.lam = lam
        self.llm_layers = layers
        self.rank_with = rank_with

    def stage_counts(self, visual: int) -> list[int]:
        """Visual tokens kept after each stage, for ``visual`` tokens entering the LLM."""
        s = len(self.llm_layers)
        if self.lam is not None:
            return [max(1, int(visual * self.lam ** (i + 1))) for i in range(s)]
        final = self.budget(visual)
        lam = (final / visual) ** (1.0 / s)
        counts = [max(final, int(round(visual * lam ** (i + 1)))) for i in range(s - 1)] + [final]
        return counts

    @staticmethod
    def lam_for_average(average: float, visual: int = 576, num_layers: int = 32,
                        layers: tuple[int, ...] = (8, 16, 24)) -> float:
        """The per-stage ratio λ whose layer-averaged visual token count equals ``average``."""
        bounds = [0, *layers, num_layers]
        spans = [b - a for a, b in zip(bounds[:-1], bounds[1:])]

        def avg(lam):
            return sum(span * visual * lam ** i for i, span in enumerate(spans)) / num_layers

        if not avg(0.0) < average < visual:
            raise BudgetError(f"No per-stage ratio gives a layer average of {average} visual tokens.")
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if avg(mid) < average else (lo, mid)
        return (lo + hi) / 2

    def select_llm(self, ctx):
        n = len(ctx.visual)
        target = min(self.stage_counts(ctx.original_visual)[ctx.stage_index], n)
        info = {"stage": ctx.stage_index, "kept": target}
        if target >= n:
            return Selection(keep=torch.arange(n, device=ctx.visual.device), info=info)
        rows = ctx.visual.new_full((1,), ctx.last)  # built where ctx.visual lives, not copied from the host
        rows_of = ctx.layer_attention if self.rank_with == "layer" else ctx.attention
        attention = rows_of(rows).float().mean(0)[0]  # (L,) head mean of the last token's row
        # keep stays on the attention's device (the pipeline moves it where it needs it)
        return Selection(keep=sorted_topk(attention[to_device(ctx.visual, attention.device)], target), info=info)

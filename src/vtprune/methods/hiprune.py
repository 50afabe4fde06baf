"""``hiprune`` — "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in
Vision-Language Models" (Liu et al., arXiv 2508.00553).

Vision stage, per crop. Of each crop's budget ``b``:

* *anchors*: the ``round(b · α / 5)`` patches with the largest global attention (mean over heads and
  over all query tokens, [CLS] included) at the middle "object" layer (default: layer 9 of CLIP ViT-L,
  1-based as in the paper, i.e. ``ctx.vision_attention(8)``);
* *buffers*: the 4 neighbours of every anchor (below);
* *fill tokens* (the paper's "register" tokens; in vtprune "register" means OccamToken's test-time
  register): the patches with the largest global attention at the feature layer
  (``ctx.received_attention``) among the rest, filling the budget exactly.

Defaults as the official code (``Danielement321/HiPrune``, ``LLaVA/llava/model/llava_arch.py``,
``encode_images``; tests/fixtures/parity/hiprune.json): α = 0.1, object layer 9 for CLIP (the paper
uses 16 for Qwen2.5-VL's tower), and

* ``neighbours="official"``: the buffers are the indices ``i ± 1`` and ``i ± side`` clamped to
  ``0 .. n-1``, as the official code computes them (it hard-codes 24 and 575, CLIP-336's grid; we use
  the crop's own grid). Left/right neighbours wrap across rows (the last patch of the previous row,
  the first of the next), and an anchor in the top/bottom row adds patch 0 / n-1.
  ``neighbours="grid"`` takes true up/down/left/right grid neighbours instead (nothing off the grid).
* ``crop_budget="equal"``: every crop gets ``keep // crops`` tokens (the official
  ``int(RETENTION / B)``; LLaVA-NeXT keeps up to ``crops - 1`` tokens fewer than ``keep``).
  ``crop_budget="proportional"`` splits ``keep`` exactly, in proportion to the crops' token counts.

A tower with fewer than 24 blocks (the demo model's) gets the paper's relative depth,
``max(1, round(depth · 9 / 24))``; an ``object_layer`` beyond the tower's depth is refused by
``apply()``. Positions: the kept tokens are renumbered contiguously (``default_positions``), as in the
official LLaVA code where the pruned features simply fill the image span.

Remaining differences from the official code:

* If anchors and buffers alone exceed a (tiny) budget, they are taken anchor by anchor (each anchor
  followed by its neighbours) until the budget is met; the official code fails there (a negative
  top-k).
* The official code marks the anchors and buffers by subtracting 1 from their feature-layer attention
  before its top-k; we exclude them outright (the same unless an attention value exceeds 1 − ε).
* LLaVA-NeXT: each crop must hold its full grid (use ``layout='flat'``): with the model's unpadded
  layout the candidates' grid cells are not known to the method. The official code (its
  ``mm_patch_merge_type`` is forced to ``'spatial'``) also keeps every crop's full grid, without
  newline tokens; the order of the sub-crops' tokens in the sequence is the pipeline's.
* Qwen2.5-VL / Qwen3-VL: the authors' Qwen2.5-VL code is not ported; the adapter provides no
  inner-layer vision attention, so the anchors cannot be found and the method raises
  ``UnsupportedMethodError`` (fill tokens alone would not be HiPrune).
"""
from __future__ import annotations

from typing import Literal

import torch

from ..errors import ArgumentError, UnsupportedMethodError
from .base import Method, Selection, Stage, register_method, split_budget


PAPER_OBJECT_LAYER, PAPER_DEPTH = 9, 24  # CLIP ViT-L/14's 9th of 24 blocks


def grid_neighbours(cells: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(n, 4) row-major indices of the up/down/left/right neighbours of ``cells``; -1 off the grid."""
    r, c = cells // cols, cells % cols
    up = torch.where(r > 0, cells - cols, -1)
    down = torch.where(r < rows - 1, cells + cols, -1)
    left = torch.where(c > 0, cells - 1, -1)
    right = torch.where(c < cols - 1, cells + 1, -1)
    return torch.stack([up, down, left, right], dim=1)


def official_neighbours(cells: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(n, 4) the official code's neighbours ``cells ∓ cols``, ``cells ∓ 1``, clamped to the grid's
    index range: left/right wrap across rows, and off the top/bottom they land on the first/last cell."""
    return torch.stack([cells - cols, cells + cols, cells - 1, cells + 1], dim=1).clamp(0, rows * cols - 1)


_QWEN_REASON = "the anchors need a middle vision layer's attention, which the Qwen adapter does not record"


@register_method
class HiPrune(Method):
    name = "hiprune"
    needs_budget = True
    stages = (Stage.VISION,)
    needs_full_grid = True
    #: the Qwen adapter does not provide ``vision_attention`` (yet)
    needs = frozenset({"vision_attention"})
    need_reasons = {"vision_attention": _QWEN_REASON}
    default_positions = "contiguous"
    official_code = "Danielement321/HiPrune@6e83a1240874e99a25df34f54221a29bb24b7bc2 LLaVA/llava/model/llava_arch.py::encode_images"

    def __init__(self, keep: int | None = None, ratio: float | None = None,
                 alpha: float = 0.1, object_layer: int | None = None,
                 neighbours: Literal["official", "grid"] = "official",
                 crop_budget: Literal["equal", "proportional"] = "equal", seed: int = 0):
        super().__init__(keep=keep, ratio=ratio, seed=seed)
        if not 0.0 <= alpha <= 1.0:
            raise ArgumentError(f"hiprune: alpha={alpha!r} is not allowed; alpha lies in [0, 1].")
        if object_layer is not None and object_layer < 1:
            raise ArgumentError(f"hiprune: object_layer={object_layer!r} is not allowed; "
                                f"it is 1-based (the paper's layer 9 is object_layer=9).")
        self.alpha = alpha
        self.neighbours = neighbours
        self.crop_budget = crop_budget
        self.requested_object_layer = object_layer
        self.object_layer = object_layer or PAPER_OBJECT_LAYER
        self.attention_layers = (self.object_layer - 1,)

    def check_model(self, adapter) -> None:
        depth = adapter.vision_depth
        if self.requested_object_layer is None:  # the paper's relative depth on a shallower tower
            self.object_layer = PAPER_OBJECT_LAYER if depth >= PAPER_DEPTH else max(1, round(depth * 9 / 24))
            self.attention_layers = (self.object_layer - 1,)
        if self.object_layer > depth:
            raise ArgumentError(f"hiprune: object_layer={self.object_layer} is not allowed; this model's vision tower "
                                f"has {adapter.vision_depth} blocks, so choose object_layer in 1..{adapter.vision_depth}.")

    def _object_attention(self, ctx) -> torch.Tensor:
        try:
            att = ctx.vision_attention(self.object_layer - 1)
        except UnsupportedMethodError as err:
            raise UnsupportedMethodError(
                f"Method 'hiprune' needs the attention of vision layer {self.object_layer} to find its anchor "
                f"tokens, which the {ctx.family} adapter does not provide ({err})") from None
        return att.unsqueeze(0) if att.dim() == 3 else att  # (crops, H, Q, K)

    def select_vision(self, ctx):
        self.check_family(ctx.family)
        n = ctx.num_tokens
        total = self.budget(n)
        sizes = [sl.stop - sl.start for sl in ctx.crop_slices]
        for (rows, cols), size in zip(ctx.grids, sizes):
            if size != rows * cols:
                raise UnsupportedMethodError(
                    "Method 'hiprune' needs each crop's full patch grid to find neighbours; this crop holds "
                    f"{size} of its {rows}×{cols} patches (pass layout='flat' to apply() on AnyRes models).")
        obj = self._object_attention(ctx)
        if obj.shape[0] != len(ctx.crop_slices):
            raise ValueError(f"vision_attention returned {obj.shape[0]} crops for {len(ctx.crop_slices)} crop slices.")
        deep = ctx.received_attention.float()
        device = ctx.features.device
        keeps, counts = [], []
        equal = self.crop_budget == "equal" and total >= len(sizes)  # (a budget below one per crop: split)
        budgets = [total // len(sizes)] * len(sizes) if equal else split_budget(total, sizes)
        for k, ((rows, cols), sl, budget) in enumerate(zip(ctx.grids, ctx.crop_slices, budgets)):
            size = sl.stop - sl.start
            if budget == 0:
                continue
            if budget >= size:
                keeps.append(torch.arange(sl.start, sl.stop, device=device))
                counts.append(torch.zeros(3, dtype=torch.long, device=device))
                counts[-1][2] = size  # a fill from a Python int: nothing read back
                continue
            glob = obj[k].float().mean(0).mean(0)  # (K,) mean over heads and queries
            offset = glob.shape[0] - size - ctx.extra  # 1 where the tower has a [CLS] token first
            if offset not in (0, 1):
                raise ValueError(f"vision_attention has {glob.shape[0]} keys for a crop of {size} patches.")
            glob = glob[offset:offset + size].to(device)
            n_anchor = int(round(budget * self.alpha / 5))
            chosen = torch.zeros(size, dtype=torch.bool, device=device)
            n_anchors = n_buffers = torch.zeros((), dtype=torch.long, device=device)
            if n_anchor > 0:
                order = torch.sort(glob, descending=True, stable=True).indices[:n_anchor]
                nbrs = (official_neighbours if self.neighbours == "official" else grid_neighbours)(order, rows, cols)
                seq = torch.cat([order[:, None], nbrs], dim=1).flatten()  # anchor, its 4 neighbours, ...
                is_anchor = torch.arange(seq.numel(), device=device) % 5 == 0
                # first occurrence of each cell on the grid, in anchor order, at most the budget
                cells, pos = torch.sort(seq, stable=True)
                new_cell = torch.ones_like(cells, dtype=torch.bool)
                new_cell[1:] = cells[1:] != cells[:-1]
                first = torch.zeros_like(new_cell).scatter_(0, pos, new_cell) & (seq >= 0)
                taken = first & (torch.cumsum(first, 0) <= budget)
                hit = torch.zeros(size + 1, dtype=torch.bool, device=device)  # the last slot: cells not taken
                chosen = hit.index_fill_(0, torch.where(taken, seq, size), True)[:size]
                n_anchors, n_buffers = (taken & is_anchor).sum(), (taken & ~is_anchor).sum()
            # fill tokens: the rest of the budget by deep attention, after the anchors and buffers
            by_score = torch.sort(deep[sl], descending=True, stable=True).indices
            ranked = by_score[torch.sort((~chosen[by_score]).to(torch.uint8), stable=True).indices]
            keeps.append(torch.sort(ranked[:budget]).values + sl.start)
            counts.append(torch.stack([n_anchors, n_buffers, budget - n_anchors - n_buffers]))
        keep = torch.sort(torch.cat(keeps)).values
        # (crops with a budget, 3) tensor: anchors, buffers, fill tokens of each crop
        return Selection(keep=keep, info={"anchors_buffers_fill": torch.stack(counts)})

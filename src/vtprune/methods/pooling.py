"""``pooling``: average-pool each crop's patch grid down to the budget (vision stage).

VTC-Bench (ACL 2026) reports this plain downsampling as a strong baseline. The pooled token of each
window takes the place (and the position) of the window's centre patch.
Deviation: a budget that is not a product r×c of a grid close to the crop's aspect ratio is rounded
down to the nearest such product, so the kept count can be slightly below ``keep``
(``info['pooled_grid']`` says which grid was used).
On Qwen2.5-VL / Qwen3-VL the pooling runs on the merger's outputs (the projected stage) [decision]:
the 2×2 merger takes four patch features, so averaged vision features cannot pass through it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UnsupportedMethodError
from ..models import families
from .base import Method, Selection, Stage, register_method, split_budget


def pooled_grid(rows: int, cols: int, budget: int) -> tuple[int, int]:
    """The largest r×c ≤ budget with r/c close to rows/cols, r ≤ rows, c ≤ cols."""
    r = max(1, min(rows, round(math.sqrt(budget * rows / cols))))
    c = max(1, min(cols, budget // r))
    while r * c > budget and r > 1:
        r -= 1
        c = max(1, min(cols, budget // r))
    return r, c


@register_method
class Pooling(Method):
    name = "pooling"
    needs_budget = True
    stages = (Stage.VISION,)
    needs_full_grid = True

    @classmethod
    def stages_for(cls, family: str) -> tuple[Stage, ...]:
        merges_vision = "vision_merge" in families.get(family).capabilities  # pooled vision features pass the projector
        return (Stage.VISION,) if merges_vision else (Stage.PROJECTED,)

    def resolve(self, family: str, num_layers: int) -> None:
        super().resolve(family, num_layers)
        self.stages = self.stages_for(family)

    def select_vision(self, ctx):
        total = self.budget(ctx.num_tokens)
        sizes = [sl.stop - sl.start for sl in ctx.crop_slices]
        keeps, values, grids = [], [], []
        for (rows, cols), sl, budget in zip(ctx.grids, ctx.crop_slices, split_budget(total, sizes)):
            if sl.stop - sl.start != rows * cols:
                raise UnsupportedMethodError(
                    "pooling needs each crop's full patch grid; on LLaVA-NeXT apply it with layout='flat'.")
            if budget == 0:
                continue
            r, c = pooled_grid(rows, cols, budget)
            grids.append((r, c))
            grid = ctx.features[sl].T.reshape(1, -1, rows, cols)
            values.append(F.adaptive_avg_pool2d(grid.float(), (r, c)).to(grid.dtype).reshape(-1, r * c).T)
            device = ctx.features.device  # built there: a host-built index would be copied (and waited for)
            centre_r = ((torch.arange(r, device=device) + 0.5) * rows / r).floor().long().clamp(max=rows - 1)
            centre_c = ((torch.arange(c, device=device) + 0.5) * cols / c).floor().long().clamp(max=cols - 1)
            keeps.append(sl.start + (centre_r[:, None] * cols + centre_c[None, :]).flatten())
        return Selection(keep=torch.cat(keeps), values=torch.cat(values), info={"pooled_grid": grids})

    select_projected = select_vision

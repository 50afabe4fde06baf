"""``random``: a seeded uniform random subset of each image's visual tokens (vision stage).

The floor every method must beat. Per LLaVA-NeXT image the subset is drawn over all crops at once.
Every image draws from a generator seeded with ``seed`` alone, so an image keeps the same tokens
whatever else is in its batch (images with equal token counts keep the same positions).
"""
from __future__ import annotations

import torch

from .base import Method, Selection, Stage, register_method, to_device


@register_method
class RandomPrune(Method):
    name = "random"
    needs_budget = True
    stages = (Stage.VISION,)

    def select_vision(self, ctx):
        k = self.budget(ctx.num_tokens)
        g = self.generator()  # never the batch index: a sample's selection must not depend on its batch
        keep = torch.randperm(ctx.num_tokens, generator=g)[:k]  # on the host: the same draw on every device
        return Selection(keep=to_device(torch.sort(keep).values, ctx.features.device))

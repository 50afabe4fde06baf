"""Parity runner for ``hiprune`` (fixture: tests/fixtures/parity/hiprune.json).

Each crop is ``inputs.make(**crop)``; its attention's heads 0-7 play the object layer, heads 8-15 the
feature layer (the fixture's ``produced_by`` says the same of the official run)."""
from __future__ import annotations

import torch

from vtprune.methods.base import ImageContext
from vtprune.methods.hiprune import HiPrune

from .inputs import make


def run(case: dict) -> dict:
    crops = [make(**c) for c in case["crops"]]
    n = crops[0]["features"].shape[0] - 1
    side = int(n ** 0.5)
    shallow = torch.stack([c["attention"][:8] for c in crops])  # (C, H, 1+n, 1+n)
    deep = torch.stack([c["attention"][8:] for c in crops])
    received = deep.mean(1).mean(1)[:, 1:].flatten()
    ctx = ImageContext(features=torch.cat([c["features"][1:] for c in crops]), grids=[(side, side)] * len(crops),
                       crop_slices=[slice(i * n, (i + 1) * n) for i in range(len(crops))], family="llava",
                       image_index=0, extra=0,
                       providers={"received_attention": lambda: received, "vision_attention": lambda layer: shallow})
    keep = HiPrune(**case["args"]).select_vision(ctx).keep
    return {"keep": keep, "count": keep.numel()}

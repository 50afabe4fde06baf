"""Parity runner for ``divprune``: the projected tokens of ``case["crops"]`` crops (one ``make`` per crop,
seeds ``seed, seed+1, ...``) form one image; vtprune's default DivPrune selects among them."""
from __future__ import annotations

import torch

from vtprune.methods import make_method
from vtprune.methods.base import ImageContext

from . import inputs


def image_tokens(case) -> tuple[torch.Tensor, list[slice]]:
    crops = case.get("crops", 1)
    parts = [inputs.make(**{**case["inputs"], "seed": case["inputs"]["seed"] + c})["projected"] for c in range(crops)]
    n = parts[0].shape[0]
    return torch.cat(parts), [slice(c * n, (c + 1) * n) for c in range(crops)]


def run(case) -> dict:
    features, slices = image_tokens(case)
    side = int(round((slices[0].stop - slices[0].start) ** 0.5))
    ctx = ImageContext(features=features, grids=[(side, side)] * len(slices), crop_slices=slices,
                       family="llava" if len(slices) == 1 else "llava_next", image_index=0)
    selection = make_method("divprune", **case["args"]).select_projected(ctx)
    return {"keep": selection.keep.tolist(), "count": selection.keep.numel()}

"""Parity runner for ``vispruner``: the fixture's crops through vtprune's default VisPruner.

Per crop ``t = inputs.make(**crop)`` (LLaVA-NeXT cases list their crops under ``"crops"``, base image
first): the candidates are ``t["features"][1:]``, the [CLS] attention ``t["attention"][:, 0, 1:]``;
``"cls_less"`` cases (family qwen2_5_vl) rank by the attention each patch receives instead, head mean
then query mean over the patch block ``t["attention"][:, 1:, 1:]`` as the Qwen adapter computes it.
"""
from __future__ import annotations

import torch

from parity import inputs
from vtprune.methods import make_method
from vtprune.methods.base import ImageContext


def context(case: dict) -> ImageContext:
    crops = [inputs.make(**spec) for spec in case.get("crops", [case["inputs"]])]
    features = torch.cat([t["features"][1:] for t in crops])
    sizes = [t["features"].shape[0] - 1 for t in crops]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    slices = [slice(s, s + n) for s, n in zip(starts, sizes)]
    side = int(sizes[0] ** 0.5)
    if case.get("cls_less"):
        received = torch.cat([t["attention"][:, 1:, 1:].mean(0).mean(0) for t in crops])
        providers = {"received_attention": lambda: received}
    else:
        cls = torch.cat([t["attention"][:, 0, 1:] for t in crops], dim=-1)
        providers = {"cls_attention": lambda: cls}
    return ImageContext(features=features, grids=[(side, side)] * len(crops), crop_slices=slices,
                        family=case["family"], image_index=0, providers=providers)


def run(case: dict) -> dict:
    ctx = context(case)
    sel = make_method("vispruner", **case["args"]).select_vision(ctx)
    keep = sel.keep
    per_crop = [int(((keep >= sl.start) & (keep < sl.stop)).sum()) for sl in ctx.crop_slices]
    return {"keep": keep.tolist(), "count": keep.numel(), "per_crop": per_crop}

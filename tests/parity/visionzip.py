"""Parity runner for ``visionzip``: vtprune's default on the fixture's seeded crops.

A case holds one crop (``inputs``, LLaVA-1.5) or several (``crops``, LLaVA-NeXT: base image + four);
the ImageContext is built as the LLaVA adapters build it: candidates = each crop's patches (CLS
dropped) in crop order, CLS attention = the full softmax row's patch columns, keys = the feature
layer's keys at the patches. ``count`` is what reaches the LLM: kept patches plus each crop's
forwarded [CLS].
"""
from __future__ import annotations

import math

import torch

from vtprune.methods.base import ImageContext
from vtprune.methods.visionzip import VisionZip

from . import inputs


def _crops(case: dict) -> list[dict[str, torch.Tensor]]:
    if "inputs" in case:
        return [inputs.make(**case["inputs"])]
    crops = [inputs.make(**spec) for spec in case["crops"]]
    for crop, want in zip(crops, case["checksums"]):
        got = inputs.checksum(crop)
        assert all(math.isclose(got[k], v, rel_tol=1e-6) for k, v in want.items()), "input generator drifted"
    return crops


def context(crops: list[dict[str, torch.Tensor]], family: str) -> ImageContext:
    n = crops[0]["features"].shape[0] - 1
    side = math.isqrt(n)
    providers = {
        "cls_attention": lambda: torch.cat([c["attention"][:, 0, 1:] for c in crops], dim=1),
        "received_attention": lambda: torch.cat([c["attention"].mean(0).mean(0)[1:] for c in crops]),
        "keys": lambda: torch.cat([c["keys"][:, 1:] for c in crops], dim=1),
    }
    return ImageContext(features=torch.cat([c["features"][1:] for c in crops]), grids=[(side, side)] * len(crops),
                        crop_slices=[slice(k * n, (k + 1) * n) for k in range(len(crops))], family=family,
                        image_index=0, providers=providers)


def run(case: dict) -> dict:
    crops = _crops(case)
    method = VisionZip(**case["args"])
    sel = method.select_vision(context(crops, case["family"]))
    cls_tokens = len(crops) if method.forwards_cls else 0
    return {"keep": sel.keep, "values": sel.values, "count": sel.keep.numel() + cls_tokens}

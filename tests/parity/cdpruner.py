"""Parity runner for ``cdpruner``: ``case["crops"]`` crops (one ``make`` per crop, seeds ``seed, seed+1, ...``)
form one image. The CLIP embeddings the official relevance compares are given, as in the fixture: the
image embeddings are each crop's ``features[1:]``, the text embeddings the first ``text_segments`` rows of
crop 0's ``text`` cut to the image embeddings' width. They stand in for the loaded CLIP checkpoint
(``CDPruner.clip``); everything after the embeddings is vtprune's default path."""
from __future__ import annotations

import torch

from vtprune.methods import make_method
from vtprune.methods.base import ImageContext

from . import inputs


class GivenClipEmbeddings:
    """Stands for the loaded ``ClipTextRelevance``: returns fixed image and text embeddings."""

    def __init__(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor):
        self.image_embeds, self.text_embeds = image_embeds, text_embeds

    def embeddings(self, vision_features, instruction_ids):
        assert vision_features.shape[0] == self.image_embeds.shape[0]
        return self.image_embeds, self.text_embeds


def run(case) -> dict:
    made = [inputs.make(**{**case["inputs"], "seed": case["inputs"]["seed"] + c}) for c in range(case["crops"])]
    projected = torch.cat([x["projected"] for x in made])
    image_embeds = torch.cat([x["features"][1:] for x in made])
    text_embeds = made[0]["text"][:case["text_segments"], :image_embeds.shape[-1]]
    n = made[0]["projected"].shape[0]
    side = int(round(n ** 0.5))
    slices = [slice(c * n, (c + 1) * n) for c in range(case["crops"])]
    ctx = ImageContext(features=projected, grids=[(side, side)] * len(slices), crop_slices=slices,
                       family="llava" if len(slices) == 1 else "llava_next", image_index=0,
                       providers={"vision_features": lambda: image_embeds, "text_embeddings": lambda: made[0]["text"],
                                  "instruction_ids": lambda: torch.tensor([1, 2, 3])})
    method = make_method("cdpruner", **case["args"])
    method.clip = GivenClipEmbeddings(image_embeds, text_embeds)
    selection = method.select_projected(ctx)
    assert selection.info["relevance"] == "clip_text"
    return {"keep": selection.keep.tolist(), "count": selection.keep.numel()}

"""Adapter for ``Qwen3VLForConditionalGeneration``: as Qwen2.5-VL (merged 2×2 units, M-RoPE), without
window attention, plus DeepStack: the features the tower injects into the first decoder layers are
sliced with the same keep mask as the main image tokens."""
from __future__ import annotations

import torch

from .base import register_adapter
from .qwen2_5_vl import Qwen25VLAdapter


@register_adapter
class Qwen3VLAdapter(Qwen25VLAdapter):
    family = "qwen3_vl"

    def unit_order(self, grid: torch.Tensor) -> torch.Tensor:
        return torch.arange(int((grid.prod(-1) // self.merge ** 2).sum()))

    def _deepstack(self, out, image: int, keep: torch.Tensor):
        return [torch.split(feat, self._split)[image][keep] for feat in out.deepstack_features]

    def mm_encoder_outputs(self, images):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        layers = len(images[0].deepstack) if images and images[0].deepstack else 0
        return {"image": BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(im.embeds for im in images),
            deepstack_features=[tuple(im.deepstack[k] for im in images) for k in range(layers)])}

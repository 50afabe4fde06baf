"""vLLM's Qwen3-VL with vtprune pruning (images; videos are not accepted by this variant).

Select it with ``hf_overrides={"architectures": ["VTPruneQwen3VLForConditionalGeneration"],
"vtprune_method": "cls_topk", "vtprune_ratio": 0.25}``. As Qwen2.5-VL (merged 2×2 units in raster
order, (t, h, w) M-RoPE positions kept), without window attention, plus DeepStack: the features the
tower injects into the first decoder layers are sliced with the same keep mask as the main tokens,
as in ``vtprune.models.qwen3_vl``.
"""
from __future__ import annotations

from vllm.model_executor.models.qwen3_vl import (Qwen3VLDummyInputsBuilder, Qwen3VLForConditionalGeneration,
                                                 Qwen3VLMultiModalProcessor, Qwen3VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .vllm_plugin import SPEC_FIELD
from .vllm_qwen2_5_vl import QwenPruneInfoMixin, QwenPruneModelMixin, QwenPruneProcessorMixin

FAMILY = "qwen3_vl"


class VTPruneQwen3VLProcessingInfo(QwenPruneInfoMixin, Qwen3VLProcessingInfo):
    vtprune_family = FAMILY


class VTPruneQwen3VLMultiModalProcessor(QwenPruneProcessorMixin, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(VTPruneQwen3VLMultiModalProcessor, info=VTPruneQwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class VTPruneQwen3VLForConditionalGeneration(QwenPruneModelMixin, Qwen3VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "model"):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune_setup(FAMILY)

    def embed_multimodal(self, **kwargs: object):
        out = self.vtprune_embed(kwargs.pop(SPEC_FIELD, None), kwargs, main_dim=self.visual_dim)
        return None if out is None else tuple(out)

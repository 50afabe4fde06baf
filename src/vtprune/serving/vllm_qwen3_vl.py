"""vLLM's Qwen3-VL with vtprune pruning (images; videos are not accepted by this variant).

Select it with ``hf_overrides={"architectures": ["VTPruneQwen3VLForConditionalGeneration"],
"vtprune_method": "cls_topk", "vtprune_ratio": 0.25}``. As Qwen2.5-VL (merged 2×2 units in raster
order, (t, h, w) M-RoPE positions kept), without window attention, plus DeepStack: the features the
tower injects into the first decoder layers are sliced with the same keep mask as the main tokens,
as in ``vtprune.models.qwen3_vl``.
"""
from __future__ import annotations

import torch

from vllm.model_executor.models.qwen3_vl import (Qwen3VLDummyInputsBuilder, Qwen3VLForConditionalGeneration,
                                                 Qwen3VLMultiModalProcessor, Qwen3VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .vllm_plugin import SPEC_FIELD, attach_positions, check_count, method_for, records
from .vllm_qwen2_5_vl import (QwenPruneInfoMixin, QwenPruneModelMixin, QwenPruneProcessorMixin, QwenTowerRun,
                              qwen_select, unit_features)

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
        spec_field = kwargs.pop(SPEC_FIELD, None)
        mm = self._parse_and_validate_multimodal_inputs(**kwargs)
        if not mm:
            return None
        if "video" in mm:
            raise ValueError("vtprune's Qwen3-VL variant takes images only.")
        image_input = mm["image"]
        grid = image_input["image_grid_thw"]
        if image_input["type"] == "image_embeds":
            return self.vtprune_passthrough(self._process_image_input(image_input), grid)
        counts = [self.vtprune_units(g) for g in grid.tolist()]
        rows_ = records(spec_field, len(counts))
        chosen = [method_for(r, self.vtprune_server, self.vtprune_host) for r in rows_]
        watch = any(m is not None for m, _, _ in chosen)
        if watch and self.use_data_parallel:
            raise ValueError("vtprune: pruning with mm_encoder_tp_mode='data' is not supported.")
        run = QwenTowerRun(self.visual, image_input["pixel_values"], grid.tolist(), watch)
        merge2 = self.vtprune_merge ** 2
        last = len(self.visual.blocks) - 1
        main_dim = self.visual_dim
        out, first = [], 0
        for (n, rows, cols), (method, kept, _) in zip(counts, chosen):
            full = run.merged[first:first + n]  # main features, then the DeepStack levels
            merged, deepstack = full[:, :main_dim], full[:, main_dim:]
            tower_idx = run.reverse[first:first + n]
            providers = {
                "received_attention": (lambda first=first, n=n, t=tower_idx: run.received(first, n, merge2)[t - first]),
                "hidden": (lambda layer, t=tower_idx: unit_features(run.blocks[layer], t, merge2)),
            }
            keep, embeds = qwen_select(method, FAMILY, 0, n, rows, cols, merged, providers,
                                       lambda t=tower_idx: unit_features(run.blocks[last], t, merge2))
            if method is not None:
                check_count(method, keep.numel(), kept)
            embeds = torch.cat([embeds, deepstack[keep]], dim=1)
            out.append(attach_positions(embeds, self.vtprune_rel(keep, rows, cols)))
            first += n
        return tuple(out)

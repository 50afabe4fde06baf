"""vLLM's LLaVA-NeXT (AnyRes crops, CLIP tower) with vtprune pruning.

Select it with ``hf_overrides={"architectures": ["VTPruneLlavaNextForConditionalGeneration"],
"vtprune_method": "visionzip", "vtprune_ratio": 0.25}``. The layout is the model's own (base image, then
the crops unpadded to the image's aspect ratio with one newline token per row), as
``vtprune.models.llava_next`` with ``layout="model"``: candidates are the patches present in it (all
crops of an image at once), newline tokens are never pruned, kept units keep their original 1-D
positions. (``layout="flat"`` of the HF path has no vLLM counterpart.)
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import BatchFeature

from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModalPruning
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (LlavaNextForConditionalGeneration, LlavaNextImageEmbeddingInputs,
                                                   LlavaNextMultiModalProcessor, LlavaNextProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..models.llava_next import candidate_columns, layout_units, unit_plan, unit_table
from ..models.stages import append_extras
from .vllm_llava import ClipLlavaPruneMixin
from .vllm_plugin import (SPEC_FIELD, Host, ImageSlot, PlaceholderCountMixin, PruneSpec, attach_positions,
                          check_count, image_record, strip_request_keys)

FAMILY = "llava_next"


class VTPruneLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        return super().get_hf_processor(**strip_request_keys(kwargs))

    def vtprune_spec(self, kwargs: Mapping[str, object] | None = None) -> PruneSpec:
        return PruneSpec.from_config(self.get_hf_config()).with_request(kwargs or {})

    def vtprune_host(self) -> Host:
        return Host.of(FAMILY, self.get_hf_config())

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}  # unpruned: requests may turn pruning off

    def vtprune_record(self, spec: PruneSpec, image_size) -> list[int]:
        return anyres_record(self, spec, image_size, unit_table)


def anyres_record(info, spec: PruneSpec, image_size, unit_table_of) -> list[int]:
    """The front end's record of one AnyRes image (``info``: the processing info; ``unit_table_of(config,
    image_size) -> (table, crops)``)."""
    config = info.get_hf_config()
    side = config.vision_config.image_size // config.vision_config.patch_size
    table, crops = unit_table_of(config, image_size)
    _, cols = candidate_columns(table, crops, side * side)
    newlines = int((table < 0).sum())
    return image_record(spec, info.vtprune_host(), [(side, side)] * crops, [len(c) for c in cols], newlines)


class AnyresRecordsMixin:
    """Attaches every image's prune record to the HF processor's output (LLaVA-NeXT and OneVision)."""

    def _apply_hf_processor_main(self, mm_items, hf_kwargs) -> BatchFeature:
        processed_data = super()._apply_hf_processor_main(mm_items, strip_request_keys(hf_kwargs))
        spec = self.info.vtprune_spec(hf_kwargs)
        rows = []
        if processed_data.get("pixel_values") is not None:
            rows += [self.info.vtprune_record(spec, s) for s in torch.as_tensor(processed_data["image_sizes"]).tolist()]
        if processed_data.get("image_embeds") is not None:
            rows += [PruneSpec(None).record(len(e), len(e)) for e in processed_data["image_embeds"]]
        if rows:
            processed_data[SPEC_FIELD] = torch.tensor(rows, dtype=torch.long)
        return processed_data


class VTPruneLlavaNextMultiModalProcessor(AnyresRecordsMixin, PlaceholderCountMixin, LlavaNextMultiModalProcessor):
    pass


class AnyresPruneMixin:
    """The AnyRes image path both LLaVA-NeXT and LLaVA-OneVision variants serve: per image its unit table
    (``unit_table_of(config, image_size) -> (table, crops)``), the tower runs, the selection, the
    layout's kept units with newline tokens, registers / [CLS] at the last unit's position."""

    def vtprune_embed_anyres(self, image_input, spec_field, unit_table_of) -> list[torch.Tensor]:
        pixel_values = image_input["pixel_values"]
        sizes = torch.as_tensor(image_input["image_sizes"]).tolist()
        n = self.vtprune_side ** 2
        layouts = []
        for s in sizes:
            table, crops = unit_table_of(self.config, s)
            layouts.append((crops, unit_plan(table, crops, n)))
        per_image = [p[:crops] for p, (crops, _) in zip(pixel_values, layouts)]
        chosen, placement = self.vtprune_tower_runs(spec_field, [len(p) for p in per_image], torch.cat(per_image))
        out = []
        for (crops, plan), (method, kept, _), (run, rows) in zip(layouts, chosen, placement):
            device = run.hidden_state(0).device
            table = plan.table
            ctx, keep, embeds = self.vtprune_select(method, run, rows, [c.to(device) for c in plan.cols])
            keep_units, ordered = layout_units(plan, keep, embeds, self.image_newline)
            with_extras = append_extras(ordered, ctx, method, self.multi_modal_projector)  # per crop, at the last unit
            extras = len(with_extras) - len(ordered)
            if method is not None:
                check_count(method, len(keep_units) + extras, kept)
            keep_units = torch.cat([keep_units, torch.full((extras,), len(table) - 1, dtype=keep_units.dtype)])
            out.append(attach_positions(with_extras, keep_units.to(with_extras.device)[:, None].expand(-1, 3)))
        return out


@MULTIMODAL_REGISTRY.register_processor(VTPruneLlavaNextMultiModalProcessor, info=VTPruneLlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VTPruneLlavaNextForConditionalGeneration(AnyresPruneMixin, ClipLlavaPruneMixin, LlavaNextForConditionalGeneration,
                                               SupportsMRoPE, SupportsMultiModalPruning):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune_setup(FAMILY, vllm_config.model_config.model)

    def vtprune_image_slot(self, mm_feature) -> ImageSlot:
        size = mm_feature.data["image_sizes"].data.tolist()
        table, _ = unit_table(self.config, size)
        units = len(table)
        return ImageSlot(mm_feature.mm_position.offset, mm_feature.mm_position.length,
                         torch.arange(units).expand(3, units), units)

    def embed_multimodal(self, **kwargs: object):
        spec_field = kwargs.pop(SPEC_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if isinstance(image_input, LlavaNextImageEmbeddingInputs):
            return self.vtprune_passthrough(image_input["data"])
        return self.vtprune_embed_anyres(image_input, spec_field, unit_table)

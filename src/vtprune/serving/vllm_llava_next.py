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
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModalPruning
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (LlavaNextForConditionalGeneration, LlavaNextImageEmbeddingInputs,
                                                   LlavaNextMultiModalProcessor, LlavaNextProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .vllm_llava import ClipLlavaPruneMixin
from .vllm_plugin import (SPEC_FIELD, Host, ImageSlot, PlaceholderCountMixin, PruneSpec, attach_positions,
                          check_count, image_record, select_and_project, strip_request_keys)

FAMILY = "llava_next"


def unit_table(config, image_size) -> tuple[torch.Tensor, int]:
    """For each unit of the image's layout in vLLM's ``spatial_unpad`` packing: the crop-major patch
    id it shows, or -1 for a newline token; and the number of crops (base image included)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    n = side * side
    h, w = (int(x) for x in image_size)
    nph, npw = get_anyres_image_grid_shape((h, w), config.image_grid_pinpoints, config.vision_config.image_size)
    crops = 1 + nph * npw
    ids = torch.arange(crops * n, dtype=torch.float64).view(crops, n, 1)
    base = ids[0]
    if crops > 1:
        other = ids[1:].view(nph, npw, side, side, 1)
        other = other.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
        other = unpad_image(other, (h, w))
        other = torch.cat([other, torch.full((*other.shape[:-1], 1), -1.0, dtype=other.dtype)], dim=-1)
        other = other.flatten(1, 2).transpose(0, 1)
        table = torch.cat([base, other])
    else:
        table = torch.cat([base, torch.full((1, 1), -1.0, dtype=base.dtype)])
    return table[:, 0].round().long(), crops


def candidates_of(table: torch.Tensor, crops: int, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Present patch ids in crop-major order, and each crop's patch columns."""
    present = torch.sort(table[table >= 0]).values
    cols = [present[(present >= k * n) & (present < (k + 1) * n)] - k * n for k in range(crops)]
    return present, cols


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
        config = self.get_hf_config()
        side = config.vision_config.image_size // config.vision_config.patch_size
        table, crops = unit_table(config, image_size)
        _, cols = candidates_of(table, crops, side * side)
        newlines = int((table < 0).sum())
        return image_record(spec, self.vtprune_host(), [(side, side)] * crops, [len(c) for c in cols], newlines)


class VTPruneLlavaNextMultiModalProcessor(PlaceholderCountMixin, LlavaNextMultiModalProcessor):
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


@MULTIMODAL_REGISTRY.register_processor(VTPruneLlavaNextMultiModalProcessor, info=VTPruneLlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VTPruneLlavaNextForConditionalGeneration(ClipLlavaPruneMixin, LlavaNextForConditionalGeneration, SupportsMRoPE,
                                               SupportsMultiModalPruning):
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
        pixel_values = image_input["pixel_values"]
        sizes = torch.as_tensor(image_input["image_sizes"]).tolist()
        n = self.vtprune_side ** 2
        layouts = []
        for s in sizes:
            table, crops = unit_table(self.config, s)
            present, cols = candidates_of(table, crops, n)
            layouts.append((table, crops, present, cols))
        per_image = [p[:crops] for p, (_, crops, _, _) in zip(pixel_values, layouts)]
        chosen, placement = self.vtprune_tower_runs(spec_field, [len(p) for p in per_image], torch.cat(per_image))
        out = []
        for (table, crops, present, cols), (method, kept, _), (run, rows) in zip(layouts, chosen, placement):
            device = run.hidden[0].device
            ctx = self.vtprune_context(run, rows, [c.to(device) for c in cols])
            keep, embeds = select_and_project(method, ctx, self.multi_modal_projector)
            keep = keep.cpu()
            kept_patches = present[keep]
            unit_is_kept = (table < 0) | torch.isin(table, kept_patches)
            keep_units = torch.nonzero(unit_is_kept).flatten()
            registers = self.vtprune_registers(run, rows, method)  # one per crop (+ [CLS]), at the last unit
            if method is not None:
                check_count(method, len(keep_units) + len(registers), kept)
            rank = torch.full((crops * n,), -1, dtype=torch.long)
            rank[kept_patches] = torch.arange(len(kept_patches))
            kept_table = table[keep_units]
            newline = self.image_newline.to(embeds.dtype)
            gather = rank[kept_table.clamp(min=0)].clamp(min=0).to(embeds.device)
            ordered = torch.where((kept_table < 0).to(embeds.device).unsqueeze(1),
                                  newline.expand(len(kept_table), -1), embeds[gather])
            keep_units = torch.cat([keep_units, torch.full((len(registers),), len(table) - 1, dtype=keep_units.dtype)])
            ordered = torch.cat([ordered, registers.to(ordered.dtype)])
            out.append(attach_positions(ordered, keep_units.to(embeds.device)[:, None].expand(-1, 3)))
        return out

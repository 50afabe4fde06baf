"""vLLM's LLaVA-OneVision (AnyRes crops, SigLIP tower) with vtprune pruning, for images.

Select it with ``hf_overrides={"architectures": ["VTPruneLlavaOnevisionForConditionalGeneration"],
"vtprune_method": "divprune", "vtprune_ratio": 0.25}``. The layout is the model's own, as
``vtprune.models.llava_onevision`` with ``layout="model"``: base view, then the crops unpadded to the
image's aspect ratio with one newline token per row (a single-view image ends with one newline token);
candidates are the patches present in it, newline tokens are never pruned, kept units keep their
original 1-D positions. SigLIP has no [CLS]: every patch of the feature layer is a candidate.

Not served: videos (the architecture declares images only, so vLLM refuses video inputs; serve them
with vLLM's own ``LlavaOnevisionForConditionalGeneration``), and images whose crops OneVision
down-samples (``anyres_max_N``): a request error, pruning on or off (serve such images with vLLM's own
architecture, or resize them below the limit).
vLLM's OneVision gives every image of a multi-image prompt all its crops (transformers: the base view
only), and so does this variant.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import SiglipVisionConfig

from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModalPruning
from vllm.model_executor.models.llava_onevision import (LlavaOnevisionDummyInputsBuilder,
                                                        LlavaOnevisionForConditionalGeneration,
                                                        LlavaOnevisionImageEmbeddingInputs,
                                                        LlavaOnevisionMultiModalProcessor,
                                                        LlavaOnevisionProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..errors import InputError
from ..models.llava_onevision import unit_table
from ..models.stages import ClipTowerShape, feature_index
from .vllm_llava import ClipLlavaPruneMixin
from .vllm_llava_next import AnyresPruneMixin, AnyresRecordsMixin, anyres_record
from .vllm_plugin import SPEC_FIELD, Host, ImageSlot, PlaceholderCountMixin, PruneSpec, strip_request_keys

FAMILY = "llava_onevision"


def check_siglip_onevision(config) -> None:
    if not isinstance(config.vision_config, SiglipVisionConfig):
        raise ValueError("vtprune's vLLM LLaVA-OneVision supports SigLIP vision towers, not "
                         f"{type(config.vision_config).__name__}.")
    if config.vision_feature_select_strategy != "full":
        raise ValueError("vtprune's vLLM LLaVA-OneVision needs vision_feature_select_strategy='full' (SigLIP "
                         "has no [CLS] to drop).")
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError("vtprune supports a single vision_feature_layer; this config concatenates several "
                         f"({config.vision_feature_layer}).")


class VTPruneLlavaOnevisionProcessingInfo(LlavaOnevisionProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        return super().get_hf_processor(**strip_request_keys(kwargs))

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}  # videos: vLLM's own architecture

    def vtprune_spec(self, kwargs: Mapping[str, object] | None = None) -> PruneSpec:
        return PruneSpec.from_config(self.get_hf_config()).with_request(kwargs or {})

    def vtprune_host(self) -> Host:
        return Host.of(FAMILY, self.get_hf_config())

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}  # unpruned: requests may turn pruning off

    def vtprune_record(self, spec: PruneSpec, image_size) -> list[int]:
        try:
            return anyres_record(self, spec, image_size, unit_table)
        except InputError as exc:  # a request error, before the engine sees the image
            raise ValueError(f"vtprune: {exc}") from exc


class VTPruneLlavaOnevisionMultiModalProcessor(AnyresRecordsMixin, PlaceholderCountMixin,
                                              LlavaOnevisionMultiModalProcessor):
    pass


class SiglipOnevisionPruneMixin(ClipLlavaPruneMixin):
    """The LLaVA variants' model side (1-D RoPE, tower runs, selection) on a SigLIP tower: no [CLS], every
    patch of the feature layer a candidate."""

    def vtprune_setup(self, family: str, model_dir: str | None = None) -> None:
        config = self.config
        check_siglip_onevision(config)
        self.vtprune_model_dir = model_dir  # where a shipped vtprune_registers.json is looked for
        self.vtprune_server = PruneSpec.from_config(config)
        self.vtprune_host = Host.of(family, config)
        self.vtprune_image_token_id = config.image_token_index
        vc = config.vision_config
        self.vtprune_side = vc.image_size // vc.patch_size
        self.vtprune_shape = ClipTowerShape(num_layers=vc.num_hidden_layers,
                                            feature_index=feature_index(config.vision_feature_layer, vc.num_hidden_layers),
                                            patches=self.vtprune_side ** 2, patch_offset=0, drops_cls=False)


@MULTIMODAL_REGISTRY.register_processor(VTPruneLlavaOnevisionMultiModalProcessor,
                                        info=VTPruneLlavaOnevisionProcessingInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class VTPruneLlavaOnevisionForConditionalGeneration(AnyresPruneMixin, SiglipOnevisionPruneMixin, LlavaOnevisionForConditionalGeneration,
                                                    SupportsMRoPE, SupportsMultiModalPruning):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune_setup(FAMILY, vllm_config.model_config.model)

    def vtprune_image_slot(self, mm_feature) -> ImageSlot:
        size = mm_feature.data["image_sizes"].data.tolist()
        units = len(unit_table(self.config, size)[0])
        return ImageSlot(mm_feature.mm_position.offset, mm_feature.mm_position.length,
                         torch.arange(units).expand(3, units), units)

    def embed_multimodal(self, **kwargs: object):
        if kwargs.get("pixel_values_videos") is not None:
            raise ValueError("vtprune's vLLM LLaVA-OneVision takes images only.")
        spec_field = kwargs.pop(SPEC_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if isinstance(image_input, LlavaOnevisionImageEmbeddingInputs):
            return self.vtprune_passthrough(image_input["data"])
        return self.vtprune_embed_anyres(image_input, spec_field, unit_table)

"""vLLM's LLaVA-1.5 (``LlavaForConditionalGeneration``, CLIP tower) with vtprune pruning.

Select it with ``hf_overrides={"architectures": ["VTPruneLlavaForConditionalGeneration"],
"vtprune_method": "cls_topk", "vtprune_keep": 64}``. Candidates are the feature layer's patch tokens
(CLS dropped, ``vision_feature_select_strategy="default"``), as in ``vtprune.models.llava``.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import BatchFeature, CLIPVisionConfig

from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModalPruning
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaImageEmbeddingInputs, LlavaMultiModalProcessor,
                                              LlavaProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..models.stages import ClipTowerShape, append_extras, clip_context, feature_index, select_and_project, watched_blocks
from .vllm_plugin import (SPEC_FIELD, ClipTowerRun, Host, ImageSlot, PlaceholderCountMixin, PruneSpec,
                          PrunedPositionsMixin, attach_positions, check_count, chosen_methods, image_record,
                          register_of, strip_request_keys)

FAMILY = "llava"


def check_clip_llava(config) -> None:
    if not isinstance(config.vision_config, CLIPVisionConfig):
        raise ValueError(f"vtprune's vLLM LLaVA supports CLIP vision towers, not {type(config.vision_config).__name__}.")
    if config.vision_feature_select_strategy != "default":
        raise ValueError("vtprune's vLLM LLaVA needs vision_feature_select_strategy='default' (CLS dropped).")
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError("vtprune supports a single vision_feature_layer; this config concatenates several "
                         f"({config.vision_feature_layer}).")


class VTPruneLlavaProcessingInfo(LlavaProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        return super().get_hf_processor(**strip_request_keys(kwargs))

    def vtprune_spec(self, kwargs: Mapping[str, object] | None = None) -> PruneSpec:
        return PruneSpec.from_config(self.get_hf_config()).with_request(kwargs or {})

    def grid(self) -> tuple[int, int]:
        vc = self.get_hf_config().vision_config
        side = vc.image_size // vc.patch_size
        return side, side

    def vtprune_host(self) -> Host:
        return Host.of(FAMILY, self.get_hf_config())

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        rows, cols = self.grid()
        return {"image": rows * cols}  # unpruned: requests may turn pruning off or ask for more tokens


class VTPruneLlavaMultiModalProcessor(PlaceholderCountMixin, LlavaMultiModalProcessor):
    def _apply_hf_processor_main(self, mm_items, hf_kwargs) -> BatchFeature:
        processed_data = super()._apply_hf_processor_main(mm_items, strip_request_keys(hf_kwargs))
        spec = self.info.vtprune_spec(hf_kwargs)
        grid = self.info.grid()
        rows = []
        if processed_data.get("pixel_values") is not None:
            host = self.info.vtprune_host()
            rows += [image_record(spec, host, [grid]) for _ in range(len(processed_data["pixel_values"]))]
        if processed_data.get("image_embeds") is not None:  # embeddings are passed through unpruned
            rows += [PruneSpec(None).record(len(e), len(e)) for e in processed_data["image_embeds"]]
        if rows:
            processed_data[SPEC_FIELD] = torch.tensor(rows, dtype=torch.long)
        return processed_data


class ClipLlavaPruneMixin(PrunedPositionsMixin):
    """Model side shared by the LLaVA and LLaVA-NeXT variants (CLIP tower, 1-D RoPE)."""
    vtprune_one_d = True

    def vtprune_setup(self, family: str, model_dir: str | None = None) -> None:
        config = self.config
        self.vtprune_model_dir = model_dir  # where a shipped vtprune_registers.json is looked for
        check_clip_llava(config)
        self.vtprune_server = PruneSpec.from_config(config)
        self.vtprune_host = Host.of(family, config)
        self.vtprune_image_token_id = config.image_token_index
        vc = config.vision_config
        self.vtprune_side = vc.image_size // vc.patch_size
        self.vtprune_shape = ClipTowerShape(num_layers=vc.num_hidden_layers,
                                            feature_index=feature_index(config.vision_feature_layer, vc.num_hidden_layers),
                                            patches=self.vtprune_side ** 2)  # CLIP: [CLS] first, dropped

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if positions.dim() == 2:  # M-RoPE bookkeeping rows; the language model is 1-D
            positions = positions[0]
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    @staticmethod
    def vtprune_passthrough(embeds_per_image) -> list[torch.Tensor]:
        """Image embeddings given by the request: unpruned, positions in order."""
        return [attach_positions(e, torch.arange(e.shape[0], device=e.device)[:, None].expand(-1, 3))
                for e in embeds_per_image]

    def vtprune_tower_runs(self, spec_field, crops_per_image: list[int], pixel_values: torch.Tensor):
        """The methods chosen for the images (``crops_per_image`` rows of ``pixel_values`` each), and per
        image (its tower run, its crops' rows in that run). Images whose methods run the tower alike (the
        same test-time register, or none) share one run that keeps what their methods read."""
        chosen = chosen_methods(spec_field, len(crops_per_image), self.vtprune_server, self.vtprune_host)
        starts = torch.tensor([0, *crops_per_image]).cumsum(0).tolist()
        groups: dict = {}
        for i, (method, _, _) in enumerate(chosen):
            groups.setdefault(register_of(method, self.vtprune_model_dir), []).append(i)
        placement = [None] * len(chosen)
        for register, images in groups.items():
            rows = [list(range(starts[i], starts[i + 1])) for i in images]
            watch = set().union(*[watched_blocks(chosen[i][0], self.vtprune_shape) for i in images])
            run = ClipTowerRun(self.vision_tower, pixel_values[[r for rs in rows for r in rs]], watch, register)
            first = 0
            for i, rs in zip(images, rows):
                placement[i] = (run, list(range(first, first + len(rs))))
                first += len(rs)
        return chosen, placement

    def vtprune_context(self, run: ClipTowerRun, crops: list[int], cols: list[torch.Tensor] | None = None):
        """The ImageContext of an image over ``crops`` of the run (patch columns ``cols``, all by default),
        built as on the HF path (``vtprune.models.stages.clip_context``)."""
        return clip_context(run, self.vtprune_shape, crops, cols, family=self.vtprune_host.family, image_index=0,
                            extra=0 if run.register is None else 1,
                            grids=[(self.vtprune_side, self.vtprune_side)] * len(crops))

    def vtprune_select(self, method, run: ClipTowerRun, crops: list[int], cols: list[torch.Tensor] | None = None):
        """The image's context, its kept candidates and their LLM inputs (``append_extras`` adds the
        registers and [CLS] tokens)."""
        ctx = self.vtprune_context(run, crops, cols)
        keep, embeds, _ = select_and_project(ctx, method, self.multi_modal_projector)
        return ctx, keep, embeds


@MULTIMODAL_REGISTRY.register_processor(VTPruneLlavaMultiModalProcessor, info=VTPruneLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VTPruneLlavaForConditionalGeneration(ClipLlavaPruneMixin, LlavaForConditionalGeneration, SupportsMRoPE,
                                           SupportsMultiModalPruning):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune_setup(FAMILY, vllm_config.model_config.model)

    # -- positions ------------------------------------------------------------------------------
    def vtprune_image_slot(self, mm_feature) -> ImageSlot:
        n = self.vtprune_side ** 2
        rel = torch.arange(n).expand(3, n)
        return ImageSlot(mm_feature.mm_position.offset, mm_feature.mm_position.length, rel, n)

    # -- vision side ----------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        spec_field = kwargs.pop(SPEC_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            return self.vtprune_passthrough(image_input["data"])
        pixel_values = image_input["pixel_values"]
        chosen, placement = self.vtprune_tower_runs(spec_field, [1] * len(pixel_values), pixel_values)
        n = self.vtprune_side ** 2
        out = []
        for (method, kept, _), (run, crops) in zip(chosen, placement):
            ctx, keep, embeds = self.vtprune_select(method, run, crops)
            embeds = append_extras(embeds, ctx, method, self.multi_modal_projector)
            extras = len(embeds) - len(keep)  # registers / [CLS] at the image's last position, as on HF
            rel = torch.cat([keep, torch.full((extras,), n - 1, device=keep.device, dtype=keep.dtype)])
            if method is not None:
                check_count(method, len(rel), kept)
            out.append(attach_positions(embeds, rel[:, None].expand(-1, 3)))
        return out

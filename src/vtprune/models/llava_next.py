"""Adapter for ``LlavaNextForConditionalGeneration`` (AnyRes crops).

Two layouts of an image's tokens in the LLM:
- ``layout="model"`` (default): the model's own — base image, then the crops unpadded to the image's
  aspect ratio with one newline token per row. Newline tokens are never pruned.
- ``layout="flat"``: base image then each crop's full grid in row-major crop order, no unpadding and
  no newline tokens (the convention behind the papers' 2880-token budgets).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from .base import EncodedImage, register_adapter
from .families import Family, FlopsInfo, TinySpec, register_family
from .llava import CLIP_VISION_CLASSES, ClipTower, LlavaAdapter, clip_vision, extra_cls, llama_text


@dataclass(frozen=True)
class UnitPlan:
    """The units of one image size: ``table`` (per unit, the crop-major patch id it shows, -1 =
    newline), ``present`` (the patch ids shown, ascending: the candidates), ``crop_cols`` (per crop, its
    patch indices among them), ``cells`` (per unit: crop, row, col; -1 for newlines) and ``placeholders``
    (the tokens the processor puts in input_ids: the model layout's units). Shared by every call: never
    modified in place."""

    table: torch.Tensor
    present: torch.Tensor
    placeholders: int
    crop_cols: list[torch.Tensor]
    cells: torch.Tensor


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"

    def __init__(self, model, layout: str = "model"):
        if layout not in ("model", "flat"):
            raise InputError(f"layout must be 'model' or 'flat', got {layout!r}.")
        super().__init__(model, layout)
        self._plans: dict[tuple[tuple[int, int], int], UnitPlan] = {}  # per (image size, crops)

    def crops_per_image(self, inputs: dict) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        if inputs.get("image_sizes") is None:
            raise InputError("LLaVA-NeXT needs image_sizes; pass the processor's output unchanged.")
        return [image_size_to_num_patches(tuple(s), self.config.image_grid_pinpoints, self.config.vision_config.image_size)
                for s in inputs["image_sizes"].tolist()]

    def num_images(self, inputs: dict) -> int:
        return inputs["pixel_values"].shape[0]

    def unit_table(self, image_size, crops: int) -> torch.Tensor:
        """For each unit of the model layout: the crop-major patch id it shows, or -1 (newline).
        Computed by running the model's own packing on patch ids."""
        n = self.grid_side ** 2
        ids = torch.arange(crops * n, dtype=torch.float32).view(crops, n, 1)
        packed, _ = self.model.model.pack_image_features(
            [ids], torch.as_tensor([image_size]), self.config.vision_feature_select_strategy,
            image_newline=torch.tensor([-1.0]))
        return packed[0][:, 0].round().long() if isinstance(packed, (list, tuple)) else packed[:, 0].round().long()

    def unit_plan(self, image_size: tuple[int, int], crops: int) -> UnitPlan:
        """The units of an image of ``image_size`` in this adapter's layout. The same for every image of
        that size, so computed once per size (running the model's packing cost ~0.5 ms a call on a CPU)."""
        key = (tuple(image_size), crops)
        if key not in self._plans:
            if len(self._plans) >= 256:  # AnyRes sizes vary per image: bound the cache
                self._plans.clear()
            side, n = self.grid_side, self.grid_side ** 2
            model_table = self.unit_table(key[0], crops)
            table = model_table if self.layout == "model" else torch.arange(crops * n)
            present = torch.sort(table[table >= 0]).values  # candidates in crop-major order
            patch = table.clamp(min=0)
            cells = torch.stack([patch // n, (patch % n) // side, patch % side], 1)
            cells[table < 0] = -1
            self._plans[key] = UnitPlan(
                table=table, present=present, placeholders=len(model_table), cells=cells,
                crop_cols=[present[(present >= k * n) & (present < (k + 1) * n)] - k * n for k in range(crops)])
        return self._plans[key]

    def expected_tokens(self, inputs: dict) -> list[int]:
        return [self.unit_plan(tuple(s), c).placeholders
                for s, c in zip(inputs["image_sizes"].tolist(), self.crops_per_image(inputs))]

    def encode_images(self, inputs, method, instructions, timer):
        pixel_values = inputs["pixel_values"]
        self.check_inputs(pixel_values)
        crops = self.crops_per_image(inputs)
        flat_pixels = torch.cat([pixel_values[i, :c] for i, c in enumerate(crops)]) if pixel_values.dim() == 5 else pixel_values
        hidden_states, recs = self.run_tower(flat_pixels, method)
        extra = method.extra_tokens if method is not None else 0
        extra_units = extra + extra_cls(method)  # per crop: registers, then the forwarded [CLS]
        side, n = self.grid_side, self.grid_side ** 2
        images, first = [], 0
        for i, (size, c) in enumerate(zip(inputs["image_sizes"].tolist(), crops)):
            rows = list(range(first, first + c))
            first += c
            plan = self.unit_plan(tuple(size), c)
            table, present = plan.table, plan.present
            ctx = self.crop_context(hidden_states, recs, rows, i, extra, [(side, side)] * c, keep_cols=plan.crop_cols)
            keep, embeds, info = self.select_and_project(ctx, method, timer, instructions[i])
            kept_patches = present[keep.cpu()]  # sync: the unit table lives on the CPU
            # unit order: the layout's; kept units are newlines plus kept patches. rank[1 + patch id]: the
            # patch's row in `embeds` (-1: pruned); rank[0] = -2 marks newline tokens (table -1)
            rank = torch.full((c * n + 1,), -1, dtype=torch.long)
            rank[0] = -2
            rank[kept_patches + 1] = torch.arange(len(kept_patches))
            unit_rank = rank[table + 1]
            keep_units = torch.nonzero(unit_rank != -1).flatten()
            kept_rank = unit_rank[keep_units]
            # embeddings in unit order: newlines from the model's parameter, patches from `embeds`
            newline = self.model.model.image_newline.to(embeds.dtype)
            ordered = torch.where((kept_rank < 0).unsqueeze(1).to(embeds.device), newline.expand(len(kept_rank), -1),
                                  embeds[kept_rank.clamp(min=0).to(embeds.device)])
            n_units = len(table)
            extras = torch.arange(n_units, n_units + c * extra_units)  # registers / [CLS] of every crop
            keep_units = torch.cat([keep_units, extras])
            ordered = torch.cat([ordered, embeds[len(kept_patches):]])
            cells = torch.cat([plan.cells, torch.full((c * extra_units, 3), -1)]) if extra_units else plan.cells
            images.append(EncodedImage(embeds=ordered, keep=keep_units, n_units=n_units, n_extra=c * extra_units,
                                       candidates=len(present), protected=extras,
                                       info=info, unit_cells=cells))
        return images


# -- tiny test model ------------------------------------------------------------------------------
def _tiny_config():
    from transformers import LlavaNextConfig

    from ..tiny import IMAGE_TOKEN

    return LlavaNextConfig(vision_config=clip_vision(28), text_config=llama_text(), image_token_id=IMAGE_TOKEN,
                           image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]], vision_feature_layer=-2,
                           vision_feature_select_strategy="default")


def _next_tokens(model, size) -> int:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    gh, gw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    grid = torch.zeros(1, gh * side, gw * side)
    rows, cols = unpad_image(grid, size).shape[1:]
    return side * side + rows * (cols + 1)


def _tiny_inputs(model, samples):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    side = cfg.vision_config.image_size
    n_max = max(image_size_to_num_patches(s.size, cfg.image_grid_pinpoints, side) for s in samples)
    rows, pixels = [], []
    for s in samples:
        g = torch.Generator().manual_seed(s.image_seed)
        n = image_size_to_num_patches(s.size, cfg.image_grid_pinpoints, side)
        crops = torch.zeros(n_max, 3, side, side)
        crops[:n] = torch.randn(n, 3, side, side, generator=g)
        pixels.append(crops)
        rows.append(s.before + [cfg.image_token_id] * _next_tokens(model, s.size) + s.after)
    return rows, torch.stack(pixels), {"image_sizes": torch.tensor([list(s.size) for s in samples])}


FAMILY = register_family(Family(
    name="llava_next",
    display_name="LLaVA-NeXT",
    hf_classes=("LlavaNextForConditionalGeneration",),
    adapter=LlavaNextAdapter,
    model_types=("llava_next",),
    input_keys=("pixel_values", "image_sizes"),
    has_cls=True,
    vision_merge=True,
    vision_attention=True,
    fixed_grid=False,  # the model layout unpads the crops; layout="flat" keeps every crop's full grid
    anyres=True,
    merge_factor=1,
    layouts=("model", "flat"),
    full_grid_layout="flat",
    tower_group="clip",  # LLaVA-1.5's CLIP tower
    register_tower=ClipTower,
    vision_classes=CLIP_VISION_CLASSES,
    extract_adapter=LlavaAdapter,  # the base view through LLaVA-1.5's single-crop path, no AnyRes crops
    flops=FlopsInfo(tower="clip", mlp_mats=2, default_crops=5),  # 672×672: base view + 2×2 crops
    #: OccamToken's paper settings on LLaVA-NeXT: λ1 = 0.045, stage-II layer 11
    defaults={"occamtoken": {"lambda1": 0.045, "layer": 11}},
    tiny=TinySpec(config=_tiny_config, inputs=_tiny_inputs, image_size=(56, 56)),
    vllm=("VTPruneLlavaNextForConditionalGeneration", "vtprune.serving.vllm_llava_next"),
))

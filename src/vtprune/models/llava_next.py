"""Adapter for ``LlavaNextForConditionalGeneration`` (AnyRes crops).

Two layouts of an image's tokens in the LLM:
- ``layout="model"`` (default): the model's own — base image, then the crops unpadded to the image's
  aspect ratio with one newline token per row. Newline tokens are never pruned.
- ``layout="flat"``: base image then each crop's full grid in row-major crop order, no unpadding and
  no newline tokens (the convention behind the papers' 2880-token budgets).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..errors import InputError
from .base import EncodedImage, unit_kind_table
from .families import Family, FlopsInfo, TinySpec, register_family
from .llava import CLIP_VISION_CLASSES, ClipTower, LlavaAdapter, clip_vision, llama_text
from .stages import append_extras, forwarded_cls, select_and_project


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"

    def __init__(self, model, layout: str = "model"):
        if layout not in ("model", "flat"):
            raise InputError(f"layout must be 'model' or 'flat', got {layout!r}.")
        super().__init__(model, layout)
        # one unit table and plan per image size, made once per apply() (read-only: callers never modify them)
        self.unit_table = functools.lru_cache(maxsize=64)(self.unit_table)
        self.image_plan = functools.lru_cache(maxsize=64)(self.image_plan)
        self.crops_of_size = functools.lru_cache(maxsize=64)(self.crops_of_size)

    def crops_per_image(self, inputs: dict) -> list[int]:
        if inputs.get("image_sizes") is None:
            raise InputError("LLaVA-NeXT needs image_sizes; pass the processor's output unchanged.")
        return [self.crops_of_size(s) for s in self.host_rows(inputs["image_sizes"])]

    def crops_of_size(self, image_size: tuple[int, int]) -> int:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return image_size_to_num_patches(image_size, self.config.image_grid_pinpoints,
                                         self.config.vision_config.image_size)

    def num_images(self, inputs: dict) -> int:
        return inputs["pixel_values"].shape[0]

    def unit_table(self, image_size, crops: int) -> torch.Tensor:
        """For each unit of the model layout: the crop-major patch id it shows, or -1 (newline)."""
        return unit_table(self.config, image_size)[0]

    def expected_tokens(self, inputs: dict) -> list[int]:
        crops = self.crops_per_image(inputs)
        return [len(self.unit_table(s, c)) for s, c in zip(self.host_rows(inputs["image_sizes"]), crops)]

    def encode_images(self, inputs, method, instructions, timer):
        pixel_values = inputs["pixel_values"]
        self.check_inputs(pixel_values)
        crops = self.crops_per_image(inputs)
        flat_pixels = torch.cat([pixel_values[i, :c] for i, c in enumerate(crops)]) if pixel_values.dim() == 5 else pixel_values
        tower = self.run_tower(flat_pixels, method)
        extra = method.extra_tokens if method is not None else 0
        extra_units = extra + forwarded_cls(method)  # per crop: registers, then the forwarded [CLS]
        side = self.grid_side
        images, first = [], 0
        for i, (size, c) in enumerate(zip(self.host_rows(inputs["image_sizes"]), crops)):
            rows = list(range(first, first + c))
            first += c
            plan, cells, extras, kinds = self.image_plan(size, c, extra_units)
            ctx = self.crop_context(tower, rows, i, extra, [(side, side)] * c, keep_cols=plan.cols)
            keep, embeds, info = select_and_project(ctx, method, self.project, timer=timer, instruction=instructions[i])
            keep_units, ordered = layout_units(plan, keep, embeds, self.model.model.image_newline)
            ordered = append_extras(ordered, ctx, method, self.project)
            images.append(EncodedImage(embeds=ordered, keep=torch.cat([keep_units, extras]), n_units=len(plan.table),
                                       n_extra=len(extras), candidates=len(plan.present), protected=extras,
                                       info=info, unit_cells=cells, unit_kind=kinds))
        return images

    def image_plan(self, image_size: tuple[int, int], crops: int,
                   extra_units: int) -> tuple[UnitPlan, torch.Tensor, torch.Tensor, torch.Tensor]:
        """An image size's unit plan in this adapter's layout, the (crop, row, col) of every unit
        followed by ``extra_units`` per crop (-1), those extras' unit indices and every unit's kind."""
        n, side = self.grid_side ** 2, self.grid_side
        table = torch.arange(crops * n) if self.layout == "flat" else self.unit_table(image_size, crops)
        plan = unit_plan(table, crops, n)
        patch = table.clamp(min=0)
        cells = torch.stack([patch // n, (patch % n) // side, patch % side], 1)
        cells[table < 0] = -1
        extras = torch.arange(len(table), len(table) + crops * extra_units)  # registers / [CLS] of every crop
        return (plan, torch.cat([cells, torch.full((len(extras), 3), -1)]), extras,
                unit_kind_table(table < 0, len(extras)))


# -- the model layout, shared with the vLLM variant ------------------------------------------------
def unit_table(config, image_size) -> tuple[torch.Tensor, int]:
    """For each unit of an image's model layout (base view, then the crops unpadded to the image's aspect
    ratio with one newline token per row): the crop-major patch id it shows, or -1 for a newline token;
    and the number of crops (base view included). From the config alone: the packing of the model's
    ``pack_image_features`` (and vLLM's), run on patch ids."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

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


def candidate_columns(table: torch.Tensor, crops: int, patches: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The patch ids present in ``table`` in crop-major order (the candidates), and each crop's patch columns."""
    present = torch.sort(table[table >= 0]).values
    cols = [present[(present >= k * patches) & (present < (k + 1) * patches)] - k * patches for k in range(crops)]
    return present, cols


@dataclass(frozen=True)
class UnitPlan:
    """One image size's layout, on the host (read-only; made once per size).

    table             per unit: the crop-major patch id it shows, or -1 for a newline token
    present, cols     the candidates (patch ids present, ascending) and each crop's patch columns
    candidate_unit    the unit showing each candidate
    newline_unit      the units of the newline tokens"""

    table: torch.Tensor
    present: torch.Tensor
    cols: list[torch.Tensor]
    candidate_unit: torch.Tensor
    newline_unit: torch.Tensor


def unit_plan(table: torch.Tensor, crops: int, patches: int) -> UnitPlan:
    present, cols = candidate_columns(table, crops, patches)
    by_id = torch.argsort(table)  # the newline units (-1) first, then the units of ``present`` in its order
    newlines = len(table) - len(present)
    return UnitPlan(table=table, present=present, cols=cols, candidate_unit=by_id[newlines:],
                    newline_unit=torch.sort(by_id[:newlines]).values)


def layout_units(plan: UnitPlan, keep: torch.Tensor, embeds: torch.Tensor,
                 newline: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept units in the layout's order (newline tokens always kept, candidates where ``keep`` —
    ascending indices into ``plan.present`` — holds them) and their LLM inputs: the kept candidates'
    rows of ``embeds`` (in ``keep`` order) or the newline parameter."""
    units = torch.cat([plan.candidate_unit[keep.cpu()], plan.newline_unit])  # sync: the plan lives on the CPU
    keep_units, order = torch.sort(units)
    rows = torch.cat([embeds, newline.to(embeds.dtype).expand(len(plan.newline_unit), -1)])
    return keep_units, rows[order.to(embeds.device)]


# -- tiny test model ------------------------------------------------------------------------------
def _tiny_config():
    from transformers import LlavaNextConfig

    from ..tiny import IMAGE_TOKEN

    return LlavaNextConfig(vision_config=clip_vision(28), text_config=llama_text(), image_token_id=IMAGE_TOKEN,
                           image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]], vision_feature_layer=-2,
                           vision_feature_select_strategy="default")


def _tiny_inputs(model, samples):
    return anyres_tiny_inputs(model, samples, lambda size, crops: len(unit_table(model.config, size)[0]))


def anyres_tiny_inputs(model, samples, placeholders):
    """AnyRes processor-shaped inputs (crops padded to the batch's most, ``image_sizes``) for
    ``vtprune.tiny``; ``placeholders(size, crops)``: the image tokens an image of ``size`` takes."""
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
        rows.append(s.before + [cfg.image_token_id] * placeholders(tuple(s.size), n) + s.after)
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

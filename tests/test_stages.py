"""The stage code both paths share (``vtprune.models.stages`` and the families' shared helpers).

The HF adapters and the vLLM variants call the same functions; these tests pin what those functions
promise on their own: the LLaVA-NeXT unit table computed from the config is the model's own packing,
and the selection checks refuse what a method may not return. (tests_vllm/test_stage_contexts.py builds
the same ImageContext from vLLM's tower and from transformers' and compares them provider by provider.)
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tiny_models import model_of
from vtprune.errors import InputError
from vtprune.methods.base import ImageContext, Selection, Stage
from vtprune.models.llava_next import layout_units, unit_plan, unit_table
from vtprune.models.stages import run_selection, select_and_project

#: (height, width): square, wide, tall, tiny, odd sizes beyond the pinpoints (the tiny model's crops are 28 px)
SIZES = [(28, 28), (56, 56), (28, 56), (56, 28), (20, 50), (50, 20), (37, 41), (100, 30), (13, 90), (90, 90)]


def packed_by_the_model(model, image_size, crops: int) -> torch.Tensor:
    """Patch ids (crop-major) through the model's own ``pack_image_features``; -1 marks a newline token."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    ids = torch.arange(crops * side * side, dtype=torch.float32).view(crops, side * side, 1)
    packed, _ = model.model.pack_image_features([ids], torch.as_tensor([image_size]),
                                                model.config.vision_feature_select_strategy,
                                                image_newline=torch.tensor([-1.0]))
    packed = packed[0] if isinstance(packed, (list, tuple)) else packed
    return packed[:, 0].round().long()


@pytest.mark.parametrize("size", SIZES)
def test_llava_next_unit_table_is_the_models_packing(size):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model = model_of("llava_next")
    cfg = model.config
    table, crops = unit_table(cfg, size)
    assert crops == image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    assert torch.equal(table, packed_by_the_model(model, size, crops))


#: (height, width) for the tiny OneVision (56 px crops, up to 2×2): square, wide, tall, small, odd sizes
ONEVISION_SIZES = [(56, 56), (112, 112), (56, 112), (112, 56), (84, 140), (140, 84), (30, 200), (200, 30), (41, 37)]


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_1"])  # _1: the 2×2 crops are down-sampled
@pytest.mark.parametrize("size", ONEVISION_SIZES)
def test_onevision_unit_table_is_the_models_packing(size, aspect):
    """The config-only table (the vLLM variant's) equals the adapter's, which runs the model's own
    packing; both refuse the sizes whose crops the model down-samples."""
    from vtprune.models.llava_onevision import LlavaOnevisionAdapter
    from vtprune.models.llava_onevision import unit_table as onevision_table

    model = model_of("llava_onevision")
    original = model.config.vision_aspect_ratio
    model.config.vision_aspect_ratio = aspect
    try:
        adapter = LlavaOnevisionAdapter(model)
        crops = adapter.crops_per_image({"pixel_values": torch.zeros(1), "image_sizes": torch.tensor([size])})[0]
        try:
            want = adapter.unit_table(size, crops)
        except InputError:
            with pytest.raises(InputError, match="down-samples"):
                onevision_table(model.config, size)
            return
        table, got_crops = onevision_table(model.config, size)
        assert got_crops == crops and torch.equal(table, want)
    finally:
        model.config.vision_aspect_ratio = original


def test_layout_units_puts_kept_patches_and_newlines_in_layout_order():
    table = torch.tensor([0, 1, 2, 3, 5, 4, -1, 7, 6, -1])  # 2 crops of 4 patches, a permuted second crop
    plan = unit_plan(table, 2, 4)
    assert plan.present.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert [c.tolist() for c in plan.cols] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert plan.candidate_unit.tolist() == [0, 1, 2, 3, 5, 4, 8, 7] and plan.newline_unit.tolist() == [6, 9]
    keep = torch.tensor([1, 4, 6])  # patches 1, 4 and 6
    embeds = torch.tensor([[1.0], [4.0], [6.0]])
    units, ordered = layout_units(plan, keep, embeds, torch.tensor([-1.0]))
    assert units.tolist() == [1, 5, 6, 8, 9]  # patch 1, patch 4, newline, patch 6, newline
    assert ordered[:, 0].tolist() == [1.0, 4.0, -1.0, 6.0, -1.0]
    units, ordered = layout_units(plan, torch.tensor([5, 7]), torch.tensor([[5.0], [7.0]]), torch.tensor([-1.0]))
    assert units.tolist() == [4, 6, 7, 9] and ordered[:, 0].tolist() == [5.0, -1.0, 7.0, -1.0]


# -- selection checks --------------------------------------------------------------------------------
class Fixed:
    """A method that returns a fixed selection at one stage."""

    name = "fixed"
    forwards_cls = False

    def __init__(self, stage: Stage, keep, values=None):
        self.stages = (stage,)
        self.selection = Selection(keep=torch.as_tensor(keep, dtype=torch.long), values=values)

    def select_vision(self, ctx):
        return self.selection

    select_projected = select_vision


def context(family: str, n: int = 6, extra: int = 0) -> ImageContext:
    return ImageContext(features=torch.randn(n, 4), grids=[(2, 3)], crop_slices=[slice(0, n)], family=family,
                        image_index=0, extra=extra)


@pytest.mark.parametrize("stage", [Stage.VISION, Stage.PROJECTED])
def test_indices_outside_the_candidates_are_refused(stage):
    with pytest.raises(InputError, match="outside the 6 candidates"):
        run_selection(Fixed(stage, [0, 6]), stage, context("llava"))
    with pytest.raises(InputError, match="outside the 6 candidates"):
        run_selection(Fixed(stage, [-1, 2]), stage, context("llava"))
    assert run_selection(Fixed(stage, [0, 5]), stage, context("llava")).keep.tolist() == [0, 5]


def test_an_empty_keep_is_refused_unless_registers_reach_the_llm():
    with pytest.raises(InputError, match="kept no token"):
        run_selection(Fixed(Stage.VISION, []), Stage.VISION, context("llava"))
    assert run_selection(Fixed(Stage.VISION, []), Stage.VISION, context("llava", extra=1)).keep.numel() == 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_merged_vision_features_are_refused_on_a_merger_tower(family):
    merging = Fixed(Stage.VISION, [0, 1], values=torch.zeros(2, 4))
    with pytest.raises(InputError, match="merges vision features"):
        run_selection(merging, Stage.VISION, context(family))
    assert run_selection(merging, Stage.VISION, context("llava")).values is not None  # a projector that takes them
    projected = Fixed(Stage.PROJECTED, [0, 1], values=torch.zeros(2, 4))
    assert run_selection(projected, Stage.PROJECTED, context(family)).values is not None


def test_select_and_project_runs_each_stage_once():
    project = torch.nn.Linear(4, 3)
    ctx = context("llava")
    keep, embeds, _ = select_and_project(ctx, Fixed(Stage.VISION, [1, 4]), project)
    assert keep.tolist() == [1, 4] and torch.equal(embeds, project(ctx.features[[1, 4]]))
    keep, embeds, _ = select_and_project(ctx, Fixed(Stage.PROJECTED, [0, 2]), project)
    assert keep.tolist() == [0, 2] and torch.equal(embeds, project(ctx.features)[[0, 2]])
    given = torch.randn(6, 3)  # the candidates' LLM inputs when they are not project(features)
    keep, embeds, _ = select_and_project(ctx, Fixed(Stage.VISION, [3]), project, projected=given)
    assert torch.equal(embeds, given[[3]])
    keep, embeds, _ = select_and_project(ctx, None, project)
    assert keep.tolist() == list(range(6)) and torch.equal(embeds, project(ctx.features))
    both = SimpleNamespace(name="both", stages=(Stage.VISION, Stage.PROJECTED), forwards_cls=False)
    with pytest.raises(Exception, match="not both"):
        select_and_project(ctx, both, project)

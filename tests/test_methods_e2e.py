"""Every registered method, end to end on each family's tiny model: generate() runs and the stats
match the budget (or the method refuses the family clearly)."""
import pytest
import torch

import vtprune
from vtprune.errors import UnsupportedMethodError
from vtprune.methods import Stage, method_class
from vtprune.tiny import FAMILIES, Sample, make_inputs, tiny_model

FIXED_BUDGET = ["random", "pooling", "cls_topk", "visionzip", "vispruner", "hiprune", "divprune", "cdpruner",
                "fastv", "dart", "pyramiddrop", "sparsevlm"]
_MODELS = {}


def model_of(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


def inputs_for(model, family):
    size = (112, 112) if family.startswith("qwen") else (56, 56)
    return make_inputs(model, [Sample([1, 7, 8], [9, 10, 11, 12], 0, size), Sample([1, 7], [9, 13, 14], 2, size)])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", FIXED_BUDGET)
def test_method_runs_and_meets_its_budget(family, name):
    cls = method_class(name)
    model = model_of(family)
    layout = "flat" if cls.needs_full_grid and family == "llava_next" else "model"
    kwargs = {"keep": 6}
    if name == "pyramiddrop":
        kwargs["layers"] = (1, 2, 3)
    if name == "sparsevlm":  # an exact final budget (the default follows the paper's layer-averaged table)
        kwargs.update(layers=(1, 2, 3), schedule=None, recycled_count="within")
    if name == "hiprune":  # the official keep // crops per crop is tested in test_baselines_unit / test_parity
        kwargs["crop_budget"] = "proportional"
    expected = 4 + 8 * (6 // 8) if name == "dart" else 6  # DART's official budget: 4 pivots + 8 · (keep // 8)
    if family in cls.unsupported:
        with pytest.raises(UnsupportedMethodError):
            vtprune.apply(model, name, **kwargs)
        return
    inputs = inputs_for(model, family)
    with vtprune.pruned(model, name, layout=layout, **kwargs) as handle:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    stats = handle.stats[0]
    if Stage.LLM in cls.stages:
        final = [max(stages.items())[1] for _, stages in sorted(stats.llm_stages.items())]
        assert final == [expected, expected]
        layers = model.config.text_config.num_hidden_layers
        averaged = stats.layer_averaged(layers)
        assert all(expected < a < n for a, n in zip(averaged, stats.tokens_entering_llm))
    elif handle.method.forwards_cls:  # VisionZip: the budget holds each crop's [CLS], counted as an extra token
        assert [im.after_pre_llm + im.registers for im in stats.images] == [6, 6]
        assert all(im.registers >= 1 for im in stats.images)
    else:
        assert stats.patches_entering_llm == [6, 6]
    # every visual token that reached the LLM is counted: patches, registers, LLaVA-NeXT newline tokens
    assert stats.tokens_entering_llm == [im.after_pre_llm + im.registers + im.newlines for im in stats.images]
    if family == "llava_next" and layout == "model" and Stage.LLM not in cls.stages:
        assert all(im.newlines > 0 for im in stats.images)
        assert stats.tokens_entering_llm == [6 + im.newlines for im in stats.images]


def test_later_llm_stages_see_the_count_that_entered_the_llm():
    """``original_visual`` is the number of visual tokens that entered the LLM at every stage, not the
    count left by the previous stage (SparseVLM's final budget and schedules are fractions of it)."""
    from vtprune.methods.base import Method, Selection, Stage
    from vtprune.tiny import Sample, make_inputs, tiny_model

    seen = []

    class Halves(Method):
        name = "test_halves"
        stages = (Stage.LLM,)
        llm_layers = (1, 2)

        def select_llm(self, ctx):
            seen.append((ctx.stage_index, ctx.original_visual, len(ctx.visual)))
            return Selection(keep=torch.arange(len(ctx.visual) // 2))

    model = tiny_model("llava")
    inputs = make_inputs(model, [Sample([1, 7, 8], [9, 10, 11], 0, (56, 56))])
    with vtprune.pruned(model, Halves()), torch.no_grad():
        model(**inputs)
    (_, first_original, entered), (_, second_original, second_visual) = seen
    assert first_original == entered == second_original and second_visual == entered // 2


def test_sparsevlm_reaches_its_budget_in_an_early_stage_without_error():
    from vtprune.tiny import Sample, make_inputs, tiny_model

    model = tiny_model("llava")
    inputs = make_inputs(model, [Sample([1, 7, 8], [9, 10, 11], 0, (56, 56))])
    with vtprune.pruned(model, "sparsevlm", keep=4, layers=(1, 2), scale=0.0, schedule=None,
                        recycled_count="within") as handle, torch.no_grad():
        model(**inputs)
    assert handle.last.images[0].after_pre_llm > 4
    stages = handle.last.llm_stages[0]  # {layer: visual tokens kept from it on}
    assert sorted(stages) == [1, 2] and stages[2] <= 4


def test_cdpruner_clip_text_end_to_end(tmp_path):
    """relevance='clip_text' through the pipeline: the text tower is loaded once by apply, the pipeline hands
    the method each image's instruction ids, the CLIP relevance runs (stats say so) and the budget holds."""
    from tiny_models import tiny_clip_checkpoint

    path = tiny_clip_checkpoint(tmp_path, vision_hidden=32)
    model = model_of("llava")
    inputs = inputs_for(model, "llava")
    method = method_class("cdpruner")(keep=6, text_encoder=str(path), tokenizer=str(path))
    seen = []
    with vtprune.pruned(model, method) as handle:
        bound = handle.method
        original = bound.clip.embeddings
        bound.clip.embeddings = lambda features, ids: seen.append(ids.tolist()) or original(features, ids)
        loaded = bound.clip
        assert loaded is not None
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    assert bound.clip is loaded  # loaded once
    assert method.clip is None  # by the bound copy: the configured method is unchanged
    assert seen == [[9, 10, 11, 12], [9, 13, 14]]  # each image's instruction ids reach the CLIP text tower
    stats = handle.stats[0]
    assert stats.patches_entering_llm == [6, 6]
    assert [im.info["relevance"] for im in stats.images] == ["clip_text", "clip_text"]


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_visionzip_hands_the_llm_each_crops_cls_token(family):
    """As the official code does, every crop's [CLS] (feature layer, projected) reaches the LLM, after the
    image's kept patches, inside the budget."""
    import contextlib

    from vtprune.methods import make_method
    from vtprune.models.base import adapter_for

    model = model_of(family)
    inputs = inputs_for(model, family)
    image_inputs = {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}
    adapter = adapter_for(model, **({"layout": "flat"} if family == "llava_next" else {}))
    method = make_method("visionzip", keep=8)
    with torch.no_grad():
        images = adapter.encode_images(image_inputs, method, [None, None], lambda: contextlib.nullcontext())
        pixels = image_inputs["pixel_values"]
        crops = adapter.crops_per_image(image_inputs) if family == "llava_next" else [1, 1]
        flat = torch.cat([pixels[i, :c] for i, c in enumerate(crops)]) if pixels.dim() == 5 else pixels
        states = model.model.vision_tower(flat, output_hidden_states=True).hidden_states[adapter.feature_layer]
        cls = adapter.project(states[:, 0])
    first = 0
    for im, c in zip(images, crops):
        assert im.n_extra == c and len(im.keep) == 8 and im.embeds.shape[0] == 8
        torch.testing.assert_close(im.embeds[-c:], cls[first:first + c])
        first += c


def test_sparsevlm_default_counts_per_layer_follow_the_official_rule():
    """The official v1.5 count at each stage: ``min(table, V - 1)`` by score plus the merged tokens."""
    from vtprune.methods.sparsevlm import paper_fractions
    from vtprune.tiny import Sample, make_inputs, tiny_model

    model = tiny_model("llava")
    inputs = make_inputs(model, [Sample([1, 7, 8], [9, 10, 11], 0, (56, 56))])
    with vtprune.pruned(model, "sparsevlm", keep=8, layers=(1, 2, 3)) as handle, torch.no_grad():
        model(**inputs)
    entered = handle.last.images[0].after_pre_llm
    expected, v = {}, entered
    for layer, fraction in zip((1, 2, 3), paper_fractions(8 * 576 / entered)):
        kept = min(max(1, round(fraction * entered)), v - 1)
        recycled = int((v - kept) * 0.3) + 1
        v = expected[layer] = kept + int(recycled / 10) + 1
    assert handle.last.llm_stages[0] == expected

"""OccamToken against an independent reference: no vtprune scoring code.

The reference is an *eager* copy of the same tiny model. Stage I (CLIP towers): the test appends the
register itself (a zero token before the pre-norm), redirects the register neurons itself (each listed
MLP channel: the register takes the patches' maximum, the patches get 0), reads the feature block's
attention from ``output_attentions`` and thresholds the CLS row against the register column.
Stage II (every family): the test takes what entered the LLM in the pruned run, runs the eager
decoder on it, and scores the text rows after the image against the register, as the paper defines
it: s2(v) = max over text rows, s2(r) = mean over text rows. Both are compared with the library's
kept sets and score ratios; the neurons are active in every run.
"""
import pytest
import torch

import vtprune
from vtprune.tiny import FAMILIES, Sample, make_inputs, tiny_model

_MODELS = {}


def models(family):
    """(the model vtprune prunes (SDPA), its eager twin with the same weights)."""
    if family not in _MODELS:
        _MODELS[family] = (tiny_model(family), tiny_model(family, attn_implementation="eager"))
    return _MODELS[family]


def inputs_of(family):
    model = models(family)[0]
    size = {"llava": (56, 56), "llava_next": (28, 56)}.get(family, (112, 112))
    return make_inputs(model, [Sample([1, 7, 8], [9, 10, 11, 12, 13], 0, size)])


def threshold_between(ratios: torch.Tensor) -> float:
    """A λ halfway between the two middle ratios: about half survive, and no ratio sits on the edge
    (the pruned model runs SDPA, the reference eager: equal within float error, not bit for bit)."""
    values = ratios.flatten().sort().values
    middle = len(values) // 2
    return float((values[middle - 1] + values[middle]) / 2)


# -- the reference stage I (CLIP towers) ---------------------------------------------------------------
def clip_pixels(family, inputs):
    """The crops the CLIP tower sees for the single sample (LLaVA-NeXT: base + grid crops)."""
    pixels = inputs["pixel_values"]
    if family == "llava":
        return pixels
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = models(family)[0].config
    n = image_size_to_num_patches(tuple(inputs["image_sizes"][0].tolist()), cfg.image_grid_pinpoints,
                                  cfg.vision_config.image_size)
    return pixels[0, :n]


def mlp_inputs(tower, pixels, layers):
    """{layer: (crops, S, I)} inputs of fc2 (the activations the neurons live in), no register."""
    seen, handles = {}, []
    for layer in layers:
        fc2 = tower.encoder.layers[layer].mlp.fc2
        handles.append(fc2.register_forward_pre_hook(lambda m, a, layer=layer: seen.__setitem__(layer, a[0])))
    try:
        with torch.no_grad():
            tower(pixels)
    finally:
        for h in handles:
            h.remove()
    return seen


def strongest_neurons(family, inputs, per_layer=4):
    """(layer, channel) pairs with the largest mean |activation| on this image in blocks 0 and 1."""
    tower = models(family)[1].model.vision_tower
    acts = mlp_inputs(tower, clip_pixels(family, inputs), [0, 1])
    return [(layer, int(k)) for layer, a in acts.items() for k in a.abs().mean((0, 1)).topk(per_layer).indices]


def reference_stage1(family, inputs, neurons):
    """Per crop, (s1(v) / s1(r) for every patch) computed on the eager twin with the test's register."""
    tower = models(family)[1].model.vision_tower
    vm = tower
    by_layer = {}
    for layer, k in neurons:
        by_layer.setdefault(layer, []).append(k)

    def append_register(module, args):
        x = args[0]
        return (torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], dim=1),)

    def redirect(channels):
        def hook(module, args):
            h = args[0].clone()
            for k in channels:  # positions: 0 = CLS, 1..S-2 = patches, S-1 = register
                h[:, -1, k] = h[:, 1:-1, k].amax(dim=1)
                h[:, 1:-1, k] = 0
            return (h,)
        return hook

    handles = [vm.pre_layrnorm.register_forward_pre_hook(append_register)]
    handles += [vm.encoder.layers[layer].mlp.fc2.register_forward_pre_hook(redirect(ks)) for layer, ks in by_layer.items()]
    try:
        with torch.no_grad():
            out = tower(clip_pixels(family, inputs), output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    feature_block = len(vm.encoder.layers) - 2  # vision_feature_layer = -2: the output of the last block but one
    cls_row = out.attentions[feature_block].mean(1)[:, 0]  # (crops, S) head-mean of the CLS query
    return cls_row[:, 1:-1] / cls_row[:, -1:]


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_stage1_equals_the_independent_reference(family):
    model = models(family)[0]
    inputs = inputs_of(family)
    neurons = strongest_neurons(family, inputs)
    ratios = reference_stage1(family, inputs, neurons)  # (crops, patches)
    lam = threshold_between(ratios[0])  # about half of crop 0 survives; other crops have their own register
    layout = {"layout": "flat"} if family == "llava_next" else {}
    with vtprune.pruned(model, "occamtoken", lambda1=lam, stage2=False, neurons=neurons, **layout) as handle:
        with torch.no_grad():
            model(**inputs)
    image = handle.last.images[0]
    side = int(ratios.shape[1] ** 0.5)
    expected = [(c, int(i) // side, int(i) % side) for c in range(ratios.shape[0])
                for i in torch.nonzero(ratios[c] >= lam).flatten()]
    assert torch.allclose(torch.as_tensor(image.info["stage1_ratios"]), ratios.flatten(), rtol=1e-4, atol=1e-6)
    assert image.entering_cells == expected
    assert 0 < len(expected) < ratios.numel()


def test_the_neurons_change_what_stage1_keeps():
    """The redirected neurons matter on this tower: without them the reference keeps another set, so
    the comparison above would catch a pipeline that ignores them."""
    inputs = inputs_of("llava")
    neurons = strongest_neurons("llava", inputs)
    with_neurons, without = reference_stage1("llava", inputs, neurons), reference_stage1("llava", inputs, [])
    lam = threshold_between(with_neurons[0])
    assert not torch.equal(with_neurons >= lam, without >= lam)


# -- the reference stage II (every family) --------------------------------------------------------------
def captured_llm_input(model, inputs, **occam):
    """Run the pruned model once; return (its handle's stats, what entered its language model, the
    compact input_ids)."""
    seen = {}
    lm = model.model.language_model
    h1 = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(lm=dict(kw)), with_kwargs=True)
    h2 = model.model.register_forward_pre_hook(lambda m, a, kw: seen.update(ids=kw.get("input_ids", a[0] if a else None)), with_kwargs=True)
    try:
        with vtprune.pruned(model, "occamtoken", **occam) as handle, torch.no_grad():
            model(**inputs)
    finally:
        h1.remove()
        h2.remove()
    return handle.last, seen["lm"], seen["ids"]


def reference_stage2_ratios(family, lm_input, ids, layer, registers_per_image):
    """s2(v) / s2(r) of each candidate visual column, from the eager twin's decoder attention."""
    reference = models(family)[1]
    kwargs = {k: v for k, v in lm_input.items() if k in ("inputs_embeds", "position_ids", "attention_mask",
                                                         "visual_pos_masks", "deepstack_visual_embeds")}
    with torch.no_grad():
        out = reference.model.language_model(**kwargs, output_attentions=True, use_cache=False)
    attention = out.attentions[layer][0].mean(0)  # (L, L) head-mean of the layer stage II reads
    visual = torch.nonzero(ids[0] == reference.config.image_token_id).flatten()
    registers, candidates = visual[-registers_per_image:], visual[:-registers_per_image]
    text = torch.arange(int(visual[-1]) + 1, ids.shape[1])  # every token after the image
    s2 = attention[text][:, candidates].amax(0)
    s2_register = attention[text][:, registers].mean()
    return s2 / s2_register


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stage1", [False, True], ids=["stage2-alone", "both-stages"])
def test_stage2_equals_the_independent_reference(family, stage1):
    model = models(family)[0]
    inputs = inputs_of(family)
    layer = 1
    occam = dict(layer=layer, lambda2=0.0, stage1=stage1,
                 neurons=[(0, 1), (0, 5), (1, 2), (1, 7)])  # active neurons (any tower accepts these)
    if stage1:
        occam["lambda1"] = 0.5
    if family == "llava_next":
        occam["layout"] = "flat"
    stats, lm_input, ids = captured_llm_input(model, inputs, **occam)  # λ2 = 0: every ratio recorded
    registers = stats.images[0].registers
    ratios = reference_stage2_ratios(family, lm_input, ids, layer, registers)
    recorded = torch.as_tensor(stats.llm_info[0][layer + 1]["stage2_ratios"])
    assert torch.allclose(recorded, ratios, rtol=1e-4, atol=1e-6)
    lam = threshold_between(ratios)
    with vtprune.pruned(model, "occamtoken", **dict(occam, lambda2=lam)) as handle, torch.no_grad():
        model(**inputs)
    assert handle.last.llm_stages[0][layer + 1] == int((ratios >= lam).sum())
    entering = handle.last.entering_columns[0]
    candidates = [c for c in entering[:len(entering) - registers]]
    expected = [c for c, keep in zip(candidates, (ratios >= lam).tolist()) if keep]
    assert handle.last.stage_columns[layer + 1][0][:len(expected)] == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_when_no_patch_beats_the_register_only_the_register_enters(family):
    """The paper's S1 = {v : s1(v) >= λ1·s1(r)} ∪ {r} may be the register alone; min_kept=N is our
    optional floor (the N best ratios)."""
    model = models(family)[0]
    inputs = inputs_of(family)
    layout = {"layout": "flat"} if family == "llava_next" else {}
    for min_kept, patches in ((0, 0), (2, 2)):
        with vtprune.pruned(model, "occamtoken", lambda1=1e6, layer=1, lambda2=0.0, min_kept=min_kept,
                            neurons=[(0, 1)], **layout) as handle, torch.no_grad():
            logits = model(**inputs).logits
        image = handle.last.images[0]
        assert image.after_pre_llm == patches and image.registers >= 1 and len(image.entering_cells) == patches
        assert torch.isfinite(logits).all()


def test_llava_next_follows_the_papers_accounting_by_default():
    """OccamToken on LLaVA-NeXT counts like the paper: base + crops without unpadding or newline
    tokens (5 crops of 2×2 patches here, as 5 × 576 = 2,880 there), and a budget fitted to K tokens
    (registers included, as Eq. 18 counts r) is what reaches past stage II; the model's own layout,
    newline tokens counted, is one argument away."""
    from vtprune.occamtoken.budget import calibrate_budget

    model = models("llava_next")[0]
    inputs = make_inputs(model, [Sample([1, 7, 8], [9, 10, 11, 12, 13], 0, (56, 56))])
    settings = dict(layer=1, lambda1=0.0, neurons=[(0, 1)])
    with vtprune.pruned(model, "occamtoken", lambda2=0.0, **settings) as handle, torch.no_grad():
        model(**inputs)
    image = handle.last.images[0]
    assert (image.candidates, image.newlines, image.registers) == (20, 0, 5)
    assert handle.last.tokens_entering_llm == [25]  # every visual token that reached the LLM
    fit = calibrate_budget(model, [inputs], target=12, **settings)
    with vtprune.pruned(model, "occamtoken", lambda2=fit.lam, **settings) as handle, torch.no_grad():
        model(**inputs)
    final = handle.last.llm_stages[0][2] + handle.last.images[0].registers
    assert final == fit.mean_kept == 12
    with vtprune.pruned(model, "occamtoken", layout="model", lambda2=0.0, **settings) as handle, torch.no_grad():
        model(**inputs)
    image = handle.last.images[0]
    assert image.newlines > 0 and handle.last.tokens_entering_llm == [image.after_pre_llm + image.newlines + 5]

"""OccamToken end to end on tiny models: exactness limits, batching, budget calibration."""
import warnings

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtprune
from vtprune.occamtoken import intervention
from vtprune.occamtoken.budget import calibrate_budget
from vtprune.occamtoken.neurons import RegisterNeurons
from vtprune.tiny import FAMILIES, Sample, make_inputs, tiny_model

NO_NEURONS = RegisterNeurons([], None, -1, "", [], "test: none", {}, {})
_MODELS = {}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def model_of(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


def samples(family, seeds=(0, 1)):
    size = (112, 112) if family.startswith("qwen") else (56, 56)
    texts = [([1, 7, 8], [9, 10, 11]), ([1, 7], [9, 12, 13, 14, 15])]
    return [Sample(texts[i % 2][0], texts[i % 2][1], s, size) for i, s in enumerate(seeds)]


def occam(**kw):
    return vtprune.make_method("occamtoken", neurons=NO_NEURONS, layer=1, **kw)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_lambda_zero_reproduces_the_model_with_a_register(family):
    """λ1 = 0 keeps every patch: the result equals the unmodified model fed the register-augmented
    features, with one extra placeholder per image at the image's last position (built by hand)."""
    model = model_of(family)
    inputs = make_inputs(model, samples(family, (0,)))
    ids = inputs["input_ids"][0]
    image_cols = torch.nonzero(ids == model.config.image_token_id).flatten()
    last = int(image_cols[-1])
    with torch.no_grad():
        if family == "llava":
            with intervention.test_time_register(model.model.vision_tower, NO_NEURONS):
                feats = model.model.get_image_features(inputs["pixel_values"]).pooler_output
            positions = torch.arange(len(ids))
            positions = torch.cat([positions[:last + 1], positions[last:last + 1], positions[last + 1:]]).unsqueeze(0)
        else:
            with intervention.test_time_register(model.model.visual, NO_NEURONS):
                feats = [model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output]
            full, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                                 image_grid_thw=inputs["image_grid_thw"])
            positions = torch.cat([full[..., :last + 1], full[..., last:last + 1], full[..., last + 1:]], dim=-1)
        new_ids = torch.cat([ids[:last + 1], ids[last:last + 1], ids[last + 1:]]).unsqueeze(0)
        reference = model(input_ids=new_ids, attention_mask=torch.ones_like(new_ids), position_ids=positions,
                          mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=tuple(feats))}).logits
        with vtprune.pruned(model, occam(lambda1=0.0, stage2=False)) as handle:
            pruned = model(**inputs).logits
    assert handle.last.images[0].after_pre_llm == len(image_cols)
    assert handle.last.images[0].registers == 1
    assert (pruned[0, -1] - reference[0, -1]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_lambda2_zero_equals_stage1_only(family):
    model = model_of(family)
    inputs = make_inputs(model, samples(family))
    outs = []
    for method in (occam(lambda1=1.0, lambda2=0.0), occam(lambda1=1.0, stage2=False)):
        with vtprune.pruned(model, method), torch.no_grad():
            outs.append((model(**inputs).logits[:, -1],
                         model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)))
    assert (outs[0][0] - outs[1][0]).abs().max() <= 1e-5
    assert torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_each_alone_with_adaptive_counts(family):
    model = model_of(family)
    batch_samples = samples(family, (0, 3))
    with vtprune.pruned(model, occam(lambda1=1.0, lambda2=1.0)) as handle, torch.no_grad():
        batch = make_inputs(model, batch_samples)
        together = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                  suppress_tokens=[0, 1, 2, 3, 4, 5, 6], output_logits=True,
                                  return_dict_in_generate=True)
        stats = handle.last
        for i, s in enumerate(batch_samples):
            alone = model.generate(**make_inputs(model, [s]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                                   suppress_tokens=[0, 1, 2, 3, 4, 5, 6],
                                   output_logits=True, return_dict_in_generate=True)
            assert torch.equal(together.sequences[i, -6:], alone.sequences[0, -6:])
            for step_b, step_a in zip(together.logits, alone.logits):
                assert (step_b[i] - step_a[0]).abs().max() <= 1e-4
    # stats: stage I and stage II counts are reported per image, the register is counted apart
    assert all(im.registers >= 1 for im in stats.images)
    assert all(im.info["stage1_kept"] == im.after_pre_llm for im in stats.images)
    assert set(stats.llm_stages) == {0, 1}


def test_stage1_count_adapts_to_the_image_and_falls_with_lambda():
    model = model_of("llava")
    counts = {}
    for lam in (0.5, 1.0, 2.0):
        with vtprune.pruned(model, occam(lambda1=lam, stage2=False)) as handle, torch.no_grad():
            model(**make_inputs(model, samples("llava", (0, 7))))
        counts[lam] = [im.after_pre_llm for im in handle.last.images]
    assert counts[0.5][0] >= counts[1.0][0] >= counts[2.0][0]
    assert counts[0.5][1] >= counts[1.0][1] >= counts[2.0][1]
    assert counts[0.5] != counts[2.0]


def test_budget_calibration_hits_the_target():
    model = model_of("llava")
    batches = [make_inputs(model, samples("llava", (s, s + 50))) for s in range(6)]
    fit = calibrate_budget(model, batches, target=9.0, lambda1=0.0, layer=1, neurons=NO_NEURONS)
    kept = []
    with vtprune.pruned(model, occam(lambda1=0.0, lambda2=fit.lam)) as handle, torch.no_grad():
        for b in batches:
            model(**b)
            kept += [stages[2] + im.registers for stages, im in zip(handle.last.llm_stages.values(), handle.last.images)]
    measured = sum(kept) / len(kept)
    assert measured == pytest.approx(fit.mean_kept)
    assert abs(measured - 9.0) <= 1.0


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
def test_fixed_budget_keeps_the_best_ratios_exactly(family):
    """keep=N ranks stage I by s1(v) / s1(r): it keeps exactly N, the same tokens as the adaptive rule
    with λ1 set to the N-th largest ratio of that image (a hand-built threshold)."""
    model = model_of(family)
    inputs = make_inputs(model, samples(family, (0,)))
    with vtprune.pruned(model, occam(lambda1=0.0, stage2=False)) as handle, torch.no_grad():
        model(**inputs)
    ratios = torch.as_tensor(handle.last.images[0].info["stage1_ratios"])
    keep = ratios.numel() // 3
    lambda1 = float(torch.sort(ratios, descending=True).values[keep - 1])
    assert int((ratios >= lambda1).sum()) == keep  # no tie at the cut, so both rules must agree
    outs = []
    for method in (occam(keep=keep, stage2=False), occam(lambda1=lambda1 * (1 - 1e-6), stage2=False)):
        with vtprune.pruned(model, method) as handle, torch.no_grad():
            outs.append((model(**inputs).logits[:, -1], handle.last.images[0]))
    (ranked, ranked_img), (thresholded, thresholded_img) = outs
    assert ranked_img.after_pre_llm == keep and ranked_img.registers >= 1
    assert thresholded_img.after_pre_llm == keep
    assert (ranked - thresholded).abs().max() <= 1e-5


def test_fixed_budget_needs_stage1():
    with pytest.raises(vtprune.errors.UnsupportedMethodError, match="stage1"):
        occam(keep=8, stage1=False)


# -- register neurons calibrated by the CLI reach apply() -------------------------------------------
def _llava_dir(tmp_path, seed=0):
    """A tiny LLaVA saved as a user's model directory (weights + image processor) and 4 images."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    model_dir = tmp_path / f"llava{seed}"
    tiny_model("llava", seed=seed).save_pretrained(model_dir)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(model_dir)
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (60, 64, 3), dtype=np.uint8)).save(img_dir / f"{i}.png")
    return model_dir, img_dir


def _calibrate_cli(model_dir, img_dir, *options):
    from vtprune.cli import main

    return main(["calibrate", "registers", "--model", str(model_dir), "--images", str(img_dir), "--quiet",
                 "--device", "cpu", "--num-images", "0", *options])


def _resolved_neurons(model):
    """apply(model, "occamtoken") as a user would, one forward, then the neurons the method used;
    plus the warnings raised on the way."""
    from transformers import LlavaForConditionalGeneration

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with vtprune.pruned(model, "occamtoken", layer=1) as handle, torch.no_grad():
            model(**make_inputs(model, samples("llava", (0,))))
            resolved = [handle.method.loaded_neurons]
    assert isinstance(model, LlavaForConditionalGeneration) and len(resolved) == 1
    return resolved[0], [str(w.message) for w in caught]


@pytest.mark.parametrize("options", [["--highest-layer", "0", "--threshold", "0.5"],
                                     ["--threshold", "0.5", "--top-k", "4"]])
def test_cli_calibration_with_any_settings_is_used_by_apply(tmp_path, monkeypatch, options):
    """Issue 17.1: `vtprune calibrate registers` with non-default settings, then apply(model,
    "occamtoken"): the method uses exactly the neurons the command wrote, and does not warn."""
    from transformers import LlavaForConditionalGeneration

    monkeypatch.setenv("VTPRUNE_CACHE", str(tmp_path / "cache"))
    model_dir, img_dir = _llava_dir(tmp_path)
    out = tmp_path / "neurons.json"
    assert _calibrate_cli(model_dir, img_dir, *options, "--out", str(out)) == 0
    written = RegisterNeurons.from_json(out)
    assert written.found
    cached = list((tmp_path / "cache" / "registers").glob("*.json"))
    assert len(cached) == 1 and RegisterNeurons.from_json(cached[0]) == written

    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    used, messages = _resolved_neurons(model)
    assert used == written
    assert not [m for m in messages if "calibrated" in m]


def test_a_newer_calibration_of_another_tower_is_never_used(tmp_path, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    monkeypatch.setenv("VTPRUNE_CACHE", str(tmp_path / "cache"))
    mine_dir, img_dir = _llava_dir(tmp_path, seed=0)
    other_dir, _ = _llava_dir(tmp_path, seed=1)
    assert _calibrate_cli(other_dir, img_dir, "--threshold", "0.5", "--out", str(tmp_path / "other.json")) == 0
    mine = LlavaForConditionalGeneration.from_pretrained(mine_dir).eval()
    used, messages = _resolved_neurons(mine)  # only the other tower is calibrated
    assert used.neurons == [] and any("calibrated" in m for m in messages)
    assert _calibrate_cli(mine_dir, img_dir, "--threshold", "0.5", "--highest-layer", "1",
                          "--out", str(tmp_path / "mine.json")) == 0
    assert _calibrate_cli(other_dir, img_dir, "--threshold", "0.4", "--top-k", "3") == 0  # newest, not mine
    used, messages = _resolved_neurons(LlavaForConditionalGeneration.from_pretrained(mine_dir).eval())
    assert used == RegisterNeurons.from_json(tmp_path / "mine.json") and used.found
    assert not [m for m in messages if "calibrated" in m]


def test_one_instance_takes_each_familys_defaults():
    """bind() resolves the family defaults on a copy: one configured instance bound to LLaVA, then to
    Qwen, gives LLaVA's λ1 and layer, then Qwen's, and stays unresolved itself."""
    from vtprune.methods.occamtoken import DEFAULT_LAMBDA1, OccamToken

    method = OccamToken()
    on_llava = method.bind("llava", 32)
    assert (on_llava.lambda1, on_llava.layer) == (DEFAULT_LAMBDA1["llava"], 11)
    on_qwen = method.bind("qwen2_5_vl", 28)
    assert (on_qwen.lambda1, on_qwen.layer) == (DEFAULT_LAMBDA1["qwen2_5_vl"], 10)
    assert (on_llava.lambda1, on_llava.layer) == (DEFAULT_LAMBDA1["llava"], 11)
    assert (method.lambda1, method.layer, method.llm_layers) == (None, None, ())
    chosen = OccamToken(lambda1=0.3, layer=4).bind("qwen3_vl", 36)
    assert (chosen.lambda1, chosen.layer) == (0.3, 4)

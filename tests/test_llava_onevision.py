"""LLaVA-OneVision: videos, image + video prompts, multi-image samples and down-sampled AnyRes images,
each checked against the unmodified model or a hand-built layer-by-layer reference (tests/reference.py)."""
import pytest
import torch

import vtprune
from reference import capture_language_model_inputs, reference_logits
from vtprune.errors import InputError
from vtprune.tiny import IMAGE_TOKEN, VIDEO_TOKEN, Sample, make_inputs, tiny_config, tiny_model

FRAMES = 3
_MODEL = {}


def model():
    if "m" not in _MODEL:
        _MODEL["m"] = tiny_model("llava_onevision")
    return _MODEL["m"]


def video_tokens(m, frames=FRAMES):
    side = -(-(m.config.vision_config.image_size // m.config.vision_config.patch_size) // 2)
    return frames * side * side + 1  # pooled cells of every frame, then one newline


def video_inputs(m, seed=0, with_image=False):
    """One sample: [image,] video, text; processor-shaped."""
    size = m.config.vision_config.image_size
    g = torch.Generator().manual_seed(seed)
    ids = [1, 7]
    inputs = {"pixel_values_videos": torch.randn(1, FRAMES, 3, size, size, generator=g)}
    if with_image:
        image = make_inputs(m, [Sample([], [], seed + 1, (56, 112))])
        ids += image["input_ids"][0].tolist() + [8]
        inputs.update(pixel_values=image["pixel_values"], image_sizes=image["image_sizes"])
    ids += [VIDEO_TOKEN] * video_tokens(m) + [9, 10, 11]
    inputs["input_ids"] = torch.tensor([ids])
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


def greedy(m, inputs, n=4):
    with torch.no_grad():
        out = m.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, suppress_tokens=[0, 1, 2, 3, 4, 5, 6])
    return out.sequences, torch.stack(out.logits, 1)


def visual_columns(inputs):
    ids = inputs["input_ids"][0]
    return torch.nonzero((ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)).flatten().tolist()


def assert_equals_reference(m, inputs, handle, seq, logits, prune_layer=None):
    stats = handle.stats[0]
    full = dict(inputs, input_ids=seq, attention_mask=torch.ones_like(seq))
    captured = capture_language_model_inputs(m, **full)
    prompt_len = inputs["input_ids"].shape[1]
    kept = stats.kept_columns[0] if prune_layer is not None else None
    ref, cols = reference_logits(m, captured, stats.entering_columns[0], kept, visual_columns(inputs), prompt_len,
                                 prune_layer, positions_mode=stats.positions)
    steps = [cols.index(prompt_len - 1 + t) for t in range(logits.shape[1])]
    assert (ref[steps] - logits[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("with_image", [False, True])
def test_keep_all_equals_the_unmodified_model_on_videos(with_image):
    m = model()
    inputs = video_inputs(m, with_image=with_image)
    plain_seq, plain = greedy(m, inputs)
    with vtprune.pruned(m, "keep_all", stage="vision") as handle:
        seq, logits = greedy(m, inputs)
    assert torch.equal(seq, plain_seq)
    assert (logits - plain).abs().max() <= 1e-4
    modalities = [im.info for im in handle.stats[0].images]
    assert len(modalities) == (2 if with_image else 1)


@pytest.mark.parametrize("name,kwargs", [("random", dict(keep=5, seed=3)), ("divprune", dict(keep=5)),
                                         ("vispruner", dict(keep=5)), ("cdpruner", dict(keep=5))])
@pytest.mark.parametrize("with_image", [False, True])
def test_vision_stage_methods_prune_video_frames_exactly(name, kwargs, with_image):
    """Pooled cells are pruned like image patches: the pruned run equals the model run on exactly the
    kept cells (its own pooled embeddings) at their original positions."""
    m = model()
    inputs = video_inputs(m, seed=1, with_image=with_image)
    with vtprune.pruned(m, name, **kwargs) as handle:
        seq, logits = greedy(m, inputs)
    stats = handle.stats[0]
    video = stats.images[-1]
    assert video.candidates == FRAMES * (video_tokens(m) - 1) // FRAMES
    assert video.after_pre_llm < video.candidates and video.newlines == 1
    assert_equals_reference(m, inputs, handle, seq, logits)


def test_in_llm_pruning_runs_over_image_and_video_tokens():
    m = model()
    inputs = video_inputs(m, seed=2, with_image=True)
    with vtprune.pruned(m, "fastv", keep=6, layer=2) as handle:
        seq, logits = greedy(m, inputs)
    kept = handle.stats[0].kept_columns[0]
    ids = inputs["input_ids"][0]
    assert any(ids[c] == VIDEO_TOKEN for c in kept) or any(ids[c] == IMAGE_TOKEN for c in kept)
    assert_equals_reference(m, inputs, handle, seq, logits, prune_layer=2)


def test_multi_image_samples_see_each_image_as_its_base_view():
    """With ``batch_num_images`` > 1 the model takes each image's base view plus one newline token."""
    m = model()
    side = m.config.vision_config.image_size
    n = (side // m.config.vision_config.patch_size) ** 2 + 1
    g = torch.Generator().manual_seed(5)
    ids = [1, 7] + [IMAGE_TOKEN] * n + [8] + [IMAGE_TOKEN] * n + [9, 10]
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
              "pixel_values": torch.randn(2, 3, 3, side, side, generator=g),
              "image_sizes": torch.tensor([[56, 112], [112, 56]]), "batch_num_images": torch.tensor([2])}
    plain_seq, plain = greedy(m, inputs)
    with vtprune.pruned(m, "keep_all", stage="vision"):
        seq, logits = greedy(m, inputs)
    assert torch.equal(seq, plain_seq) and (logits - plain).abs().max() <= 1e-4
    with vtprune.pruned(m, "random", keep=4, seed=0) as handle:
        seq, logits = greedy(m, inputs)
    assert [im.after_pre_llm for im in handle.stats[0].images] == [4, 4]
    assert_equals_reference(m, inputs, handle, seq, logits)


def test_down_sampled_images_are_refused_in_the_model_layout_and_run_flat():
    """``anyres_max_1`` makes the model interpolate the crops of a 2×2-crop image: refused in the model
    layout with a pointer to layout='flat' (nothing stays patched), exact in the flat layout."""
    import transformers

    cfg = tiny_config("llava_onevision")
    cfg.vision_aspect_ratio = "anyres_max_1"
    torch.manual_seed(0)
    m = transformers.LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    with pytest.raises(InputError, match="layout='flat'"):
        make_inputs(m, [Sample([1, 7], [9, 10], 0, (112, 112))])
    pixels = make_inputs(tiny_model("llava_onevision"), [Sample([1, 7], [9, 10], 0, (112, 112))])
    side = m.config.vision_config.image_size // m.config.vision_config.patch_size
    with torch.no_grad():  # the model's own count for this image
        features = [torch.zeros(5, side * side, 1)]
        packed, _ = m.model.pack_image_features(features, pixels["image_sizes"], image_newline=torch.zeros(1),
                                                 vision_aspect_ratio="anyres_max_1")
    ids = [1, 7] + [IMAGE_TOKEN] * packed[0].shape[0] + [9, 10]
    inputs = dict(pixels, input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    with torch.no_grad():
        plain = m(**inputs).logits
    with vtprune.pruned(m, "random", keep=4):
        with pytest.raises(InputError, match="layout='flat'"):
            m(**inputs)
    with torch.no_grad():
        assert torch.equal(m(**inputs).logits, plain)  # the refusal left nothing behind
    with vtprune.pruned(m, "random", keep=4, layout="flat") as handle:
        with torch.no_grad():
            m(**inputs)
    assert handle.stats[0].patches_entering_llm == [4]


def test_siglip_register_tower_appends_one_zero_token_without_cls():
    from vtprune.models.llava_onevision import SiglipTower
    from vtprune.occamtoken.towers import resolve_tower

    m = model()
    tower = resolve_tower(m)
    assert isinstance(tower, SiglipTower) and not tower.has_cls
    pixels = torch.randn(2, 3, 56, 56)
    handle = tower.append_register_hook()
    try:
        with torch.no_grad():
            out = tower.core(pixel_values=pixels, output_hidden_states=True)
    finally:
        handle.remove()
    n = (56 // 14) ** 2
    assert out.hidden_states[0].shape[1] == n + 1
    assert torch.equal(out.hidden_states[0][:, -1], torch.zeros_like(out.hidden_states[0][:, -1]))


def test_ocvtp_extraction_reads_every_siglip_patch_of_the_base_view():
    """OC-VTP's features of a OneVision image are the SigLIP block's outputs at all patches (no CLS to drop)."""
    from vtprune.ocvtp.extract import tower_tokens

    m = model()
    pixels = torch.randn(2, 3, 56, 56)
    tokens = tower_tokens(m, {"pixel_values": pixels}, 1)
    with torch.no_grad():
        states = m.model.vision_tower(pixels, output_hidden_states=True).hidden_states[1]
    assert len(tokens) == 2 and tokens[0].shape == (16, 32)
    torch.testing.assert_close(torch.stack(tokens), states)

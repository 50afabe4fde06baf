"""FLOPs / KV calculators: the papers' published figures, the exact count against torch's FLOP counter
on tiny real models, KV bytes per preset, and the presets themselves (built on the meta device)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vtprune.bench.flops import (
    add_cli,
    equivalent_visual_tokens,
    exact_flops,
    flops_stages,
    kv_cache_bytes,
    lm_shape,
    paper_flops,
    parse_schedule,
    run_cli,
    tokens_per_layer,
    vision_flops,
)
from vtprune.presets import UnknownPresetError, list_presets, load_config, load_preset_config, preset_dict

PRESETS = ("llava-1.5-7b", "llava-next-7b", "llava-onevision-qwen2-7b", "qwen2.5-vl-7b", "qwen3-vl-8b")


# ---------------------------------------------------------------------------- published figures


@pytest.mark.parametrize(
    "preset, visual, tflops",
    [
        ("llava-next-7b", 2880, 33.76),
        ("llava-next-7b", 160, 1.95),
        ("llava-1.5-7b", 576, 6.31),
        ("llava-1.5-7b", 64, 0.97),
    ],
)
def test_paper_flops_match_published_figures(preset, visual, tflops):
    assert paper_flops(load_preset_config(preset), visual, text_tokens=32) / 1e12 == pytest.approx(tflops, abs=0.01)


def test_exact_llm_flops_swiglu_figures():
    cfg = load_preset_config("llava-1.5-7b")
    # figures.md: three FFN matrices give 8.07 -> 1.25 TFLOPs (decoder layers only)
    for visual, tflops in ((576, 8.07), (64, 1.25)):
        f = exact_flops(cfg, visual, 32, lm_head_tokens=0, include_vision=False)
        assert f["llm"] / 1e12 == pytest.approx(tflops, abs=0.01)
        assert f["total"] == f["llm"]


def test_exact_components_add_up_and_vision_is_unpruned():
    cfg = load_preset_config("llava-1.5-7b")
    full, pruned = exact_flops(cfg, 576), exact_flops(cfg, 64, method_flops=1e9)
    parts = ("vision_tower", "projector", "llm_attention_proj", "llm_attention_scores", "llm_mlp", "lm_head", "method")
    assert pruned["total"] == pytest.approx(sum(pruned[k] for k in parts))
    assert pruned["vision_tower"] == full["vision_tower"] > 0  # the tower runs on all 577 tokens either way
    assert pruned["method"] == 1e9
    assert pruned["lm_head"] == 2 * 4096 * 32064  # last token only


def test_llava_next_tower_runs_five_crops():
    one = vision_flops(load_preset_config("llava-1.5-7b"), 576)
    five = vision_flops(load_preset_config("llava-next-7b"), 2880)
    assert five["vision_tower"] == pytest.approx(5 * one["vision_tower"])
    assert five["projector"] == pytest.approx(5 * one["projector"])


# ---------------------------------------------------------------------------- schedules


def test_fastv_schedule_breakdown():
    cfg = load_preset_config("llava-1.5-7b")
    sched = parse_schedule("2:64")
    assert sched == [(2, 64)]
    assert tokens_per_layer(32, 576, sched) == [576] * 2 + [64] * 30
    per_layer_full = paper_flops(cfg, 576) / 32
    per_layer_64 = paper_flops(cfg, 64) / 32
    assert paper_flops(cfg, 576, 32, sched) == pytest.approx(2 * per_layer_full + 30 * per_layer_64)
    stages = flops_stages(cfg, 576, 32, sched)
    assert [(s["first_layer"], s["last_layer"], s["visual_tokens"]) for s in stages] == [(0, 1, 576), (2, 31, 64)]
    assert sum(s["paper_flops"] for s in stages) == pytest.approx(paper_flops(cfg, 576, 32, sched))
    eq = equivalent_visual_tokens(cfg, 576, sched)
    assert eq["layer_average"] == 96.0
    assert paper_flops(cfg, 96) < paper_flops(cfg, 576, 32, sched) < paper_flops(cfg, 100)
    assert 96 < eq["flops_matched"] < 100


@pytest.mark.parametrize("bad", [[(32, 10)], [(2, 64), (2, 32)], [(2, 600)], [(2, 64), (5, 100)], [(-1, 5)]])
def test_bad_schedules_raise(bad):
    with pytest.raises(ValueError):
        tokens_per_layer(32, 576, bad)


def test_parse_schedule_rejects_garbage():
    with pytest.raises(ValueError, match="LAYER:TOKENS"):
        parse_schedule("2-64")


# ---------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize(
    "preset, bytes_per_token",
    [
        ("llava-1.5-7b", 2 * 32 * 32 * 128 * 2),  # Vicuna-7B: MHA
        ("llava-next-7b", 2 * 32 * 32 * 128 * 2),
        ("qwen2.5-vl-7b", 2 * 28 * 4 * 128 * 2),  # GQA 4 kv heads, head_dim 3584/28
        ("llava-onevision-qwen2-7b", 2 * 28 * 4 * 128 * 2),  # Qwen2-7B: the same shape
        ("qwen3-vl-8b", 2 * 36 * 8 * 128 * 2),  # GQA 8 kv heads, head_dim 128
    ],
)
def test_kv_cache_bytes_formula(preset, bytes_per_token):
    cfg = load_preset_config(preset)
    assert kv_cache_bytes(cfg, 1) == bytes_per_token
    assert kv_cache_bytes(cfg, 608, dtype_bytes=4) == 608 * 2 * bytes_per_token
    layers = lm_shape(cfg).layers
    assert kv_cache_bytes(cfg, [10] * layers) == 10 * bytes_per_token


def test_vicuna_fp16_is_half_a_mib_per_token():
    assert kv_cache_bytes(load_preset_config("llava-1.5-7b"), 1, dtype_bytes=2) == 512 * 1024


def test_kv_per_layer_length_checked():
    with pytest.raises(ValueError, match="32 decoder layers"):
        kv_cache_bytes(load_preset_config("llava-1.5-7b"), [1, 2, 3])


# ---------------------------------------------------------------------------- exact count vs torch


def _counted(model, **inputs):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs, logits_to_keep=1)
    return counter.get_total_flops(), counter.get_flop_counts()


def _module_flops(counts, suffix):
    return sum(sum(v.values()) for k, v in counts.items() if k.endswith(suffix))


def test_exact_flops_match_flop_counter_tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        text_config=LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=128, vocab_size=100, pad_token_id=0),
        vision_config=CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, image_size=56, patch_size=14),
        image_token_id=99,
        attn_implementation="eager",  # test only: every matmul visible to the counter
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    ids = torch.tensor([[1] + [99] * 16 + list(range(5, 12))])  # 16 image tokens (4x4 patches), 8 text
    total, counts = _counted(model, input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56))
    ours = exact_flops(cfg, visual_tokens=16, text_tokens=8)
    assert ours["total"] == pytest.approx(total, rel=0.01)
    assert ours["vision_tower"] == pytest.approx(_module_flops(counts, "model.vision_tower"), rel=0.01)
    assert ours["projector"] == pytest.approx(_module_flops(counts, "model.multi_modal_projector"), rel=0.01)
    assert ours["lm_head"] == pytest.approx(_module_flops(counts, ".lm_head"), rel=0.01)


def _tiny_qwen(family):
    import transformers

    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, vocab_size=100, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=99, video_token_id=98, vision_start_token_id=97, vision_end_token_id=96)
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                      window_size=112, out_hidden_size=64, fullatt_block_indexes=[1])
        cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, attn_implementation="eager", **ids)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16, spatial_merge_size=2,
                      out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        cfg = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, attn_implementation="eager", **ids)
        cls = transformers.Qwen3VLForConditionalGeneration
    return cfg, cls


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_exact_flops_match_flop_counter_tiny_qwen(family):
    cfg, cls = _tiny_qwen(family)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    grid = (1, 20, 12)  # 240 patches -> 60 merged tokens; Qwen2.5 windows of 4x4 merged: uneven edges
    vc = cfg.vision_config
    ids = torch.tensor([[1, 97] + [99] * 60 + [96] + list(range(5, 10))])  # 60 visual, 8 text
    pixels = torch.randn(240, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2)
    total, counts = _counted(model, input_ids=ids, mm_token_type_ids=(ids == 99).long(), pixel_values=pixels,
                             image_grid_thw=torch.tensor([grid]))
    ours = exact_flops(cfg, visual_tokens=60, text_tokens=8, image_grid=grid)
    assert ours["total"] == pytest.approx(total, rel=0.01)
    assert ours["vision_tower"] + ours["projector"] == pytest.approx(_module_flops(counts, "model.visual"), rel=0.01)
    # no grid given: the squarest grid for 60 tokens is 6x10 merged = 12x20 patches, same windows as 20x12
    assert exact_flops(cfg, 60, 8)["total"] == pytest.approx(total, rel=1e-9)
    # a thin strip holds the same patches in different windows: only window attention tells them apart
    strip = exact_flops(cfg, 60, 8, image_grid=(4, 60))["vision_tower"]
    assert (strip != ours["vision_tower"]) == (family == "qwen2_5_vl")


# ---------------------------------------------------------------------------- presets


def test_presets_listed():
    assert set(PRESETS) <= set(list_presets())


@pytest.mark.parametrize(
    "preset, cls_name, low, high",
    [
        ("llava-1.5-7b", "LlavaForConditionalGeneration", 7.0e9, 7.1e9),
        ("llava-next-7b", "LlavaNextForConditionalGeneration", 7.0e9, 7.1e9),
        ("llava-onevision-qwen2-7b", "LlavaOnevisionForConditionalGeneration", 7.95e9, 8.1e9),
        ("qwen2.5-vl-7b", "Qwen2_5_VLForConditionalGeneration", 8.2e9, 8.35e9),
        ("qwen3-vl-8b", "Qwen3VLForConditionalGeneration", 8.7e9, 8.85e9),
    ],
)
def test_presets_build_on_meta_with_plausible_size(preset, cls_name, low, high):
    import transformers

    cfg = load_preset_config(preset)
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert low <= n <= high, f"{preset}: {n / 1e9:.3f} B parameters"


def test_preset_dicts_rebuild_with_autoconfig():
    from transformers import AutoConfig

    for name in PRESETS:
        d = {k: v for k, v in preset_dict(name).items() if not k.startswith("_")}
        cfg = AutoConfig.for_model(**d)
        assert cfg.model_type == d["model_type"]


def test_preset_values():
    llava = load_preset_config("llava-1.5-7b")
    assert (llava.image_token_id, llava.text_config.vocab_size, llava.vision_feature_layer) == (32000, 32064, -2)
    assert llava.vision_config.image_size == 336 and llava.vision_config.patch_size == 14
    nxt = load_preset_config("llava-next-7b")
    assert [672, 672] in [list(p) for p in nxt.image_grid_pinpoints]
    ov = load_preset_config("llava-onevision-qwen2-7b")
    assert (ov.vision_config.num_hidden_layers, ov.vision_config.image_size, ov.vision_feature_select_strategy) == \
        (26, 384, "full")
    assert len(ov.image_grid_pinpoints) == 36 and ov.vision_aspect_ratio == "anyres_max_9"
    q25 = load_preset_config("qwen2.5-vl-7b")
    assert q25.vision_config.fullatt_block_indexes == [7, 15, 23, 31] and q25.vision_config.window_size == 112
    assert lm_shape(q25) == lm_shape(q25.text_config)
    assert (lm_shape(q25).heads, lm_shape(q25).kv_heads, lm_shape(q25).head_dim) == (28, 4, 128)
    q3 = load_preset_config("qwen3-vl-8b")
    assert q3.vision_config.deepstack_visual_indexes == [8, 16, 24] and q3.vision_config.out_hidden_size == 4096
    assert lm_shape(q3).layers == 36


def test_unknown_preset_lists_names_and_suggests():
    with pytest.raises(UnknownPresetError) as e:
        load_preset_config("llava-1.5-7bb")
    msg = str(e.value)
    assert "Did you mean 'llava-1.5-7b'" in msg
    for name in PRESETS:
        assert name in msg


def test_hub_id_and_local_dir(tmp_path):
    assert load_config("llava-hf/llava-1.5-7b-hf").model_type == "llava"
    (tmp_path / "config.json").write_text(json.dumps(preset_dict("qwen3-vl-8b")))
    cfg = load_config(tmp_path)
    assert cfg.model_type == "qwen3_vl" and cfg.text_config.num_hidden_layers == 36
    with pytest.raises(UnknownPresetError, match="no config.json"):
        load_config(tmp_path / "..")


# ---------------------------------------------------------------------------- CLI


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_table_and_json(tmp_path, capsys):
    out = tmp_path / "f.json"
    args = _parse(["flops", "--model", "llava-next-7b", "--visual", "2880,160", "--schedule", "2:160",
                   "--json", str(out)])
    assert run_cli(args) == 0
    text = capsys.readouterr().out
    assert "33.76" in text and "1.95" in text
    data = json.loads(out.read_text())
    assert [r["visual_tokens"] for r in data["rows"]] == [2880, 160, 2880]
    assert data["rows"][0]["kv_mib"] == pytest.approx(2912 * 0.5)
    assert data["equivalent_visual_tokens"]["layer_average"] == pytest.approx((2 * 2880 + 30 * 160) / 32)


def test_cli_unknown_model_is_an_error(capsys):
    assert run_cli(_parse(["flops", "--model", "lava-1.5-7b", "--visual", "576"])) == 2
    assert "llava-1.5-7b" in capsys.readouterr().err


def test_siglip_tower_counts_no_cls_token():
    """OneVision's SigLIP tower runs 729 patches per 384-px crop, no CLS token (a CLS would add 0.15 %)."""
    cfg = load_preset_config("llava-onevision-qwen2-7b")
    from vtprune.bench.flops import clip_tower_flops

    one, two = clip_tower_flops(cfg.vision_config, 1), clip_tower_flops(cfg.vision_config, 2)
    assert two == pytest.approx(2 * one)
    vc = cfg.vision_config
    d, m, n, layers = vc.hidden_size, vc.intermediate_size, 729, vc.num_hidden_layers
    per_layer = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d  # projections + MLP + QK^T and AV
    embed = 2 * n * 3 * vc.patch_size ** 2 * d
    assert one == pytest.approx(layers * per_layer + embed, rel=1e-6)

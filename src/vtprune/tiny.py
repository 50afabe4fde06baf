"""Tiny models of each supported family, built from configs with random weights, and inputs for them.

They run the real transformers code paths in a fraction of a second on a CPU; the tests and the
no-download examples use them. They answer nonsense: use them for mechanics, never for accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FAMILIES = ("llava", "llava_next", "qwen2_5_vl", "qwen3_vl")
IMAGE_TOKEN = 3
VIDEO_TOKEN = 4
VOCAB = 64


def _llama_text(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


def _clip_vision(image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=image_size, patch_size=14, projection_dim=32)


def tiny_config(family: str):
    """A small config of ``family`` (see FAMILIES)."""
    if family == "llava":
        from transformers import LlavaConfig

        return LlavaConfig(vision_config=_clip_vision(56), text_config=_llama_text(), image_token_id=IMAGE_TOKEN,
                           vision_feature_layer=-2, vision_feature_select_strategy="default")
    if family == "llava_next":
        from transformers import LlavaNextConfig

        return LlavaNextConfig(vision_config=_clip_vision(28), text_config=_llama_text(), image_token_id=IMAGE_TOKEN,
                               image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]], vision_feature_layer=-2,
                               vision_feature_select_strategy="default")
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(
            text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                             pad_token_id=0, bos_token_id=1, eos_token_id=2),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, window_size=56,
                               fullatt_block_indexes=[1], in_channels=3),
            image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=5, vision_end_token_id=6)
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig(
            text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=512,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                              "mrope_interleaved": True},
                             pad_token_id=0, bos_token_id=1, eos_token_id=2),
            vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                               num_position_embeddings=64, deepstack_visual_indexes=[0, 1], in_channels=3),
            image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=5, vision_end_token_id=6)
    raise ValueError(f"Unknown family {family!r}; choose one of {FAMILIES}.")


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "sdpa"):
    """A randomly initialised tiny model of ``family`` in eval mode, fp32."""
    from transformers import (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                              Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration)

    classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
               "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration}
    torch.manual_seed(seed)
    model = classes[family]._from_config(tiny_config(family), attn_implementation=attn_implementation)
    return model.eval()


@dataclass
class Sample:
    """One prompt: text ids before and after the image, and the image itself."""

    before: list[int]
    after: list[int]
    image_seed: int
    size: tuple[int, int] = (56, 56)  # image height, width in pixels (LLaVA-NeXT / Qwen)


def _qwen_pixels(config, size, seed):
    vc = config.vision_config
    patch, merge, tps = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
    h, w = size[0] // patch, size[1] // patch
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(h * w, vc.in_channels * tps * patch * patch, generator=g)
    return pixels, torch.tensor([1, h, w]), (h // merge) * (w // merge)


def _next_tokens(model, size) -> int:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    gh, gw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    grid = torch.zeros(1, gh * side, gw * side)
    rows, cols = unpad_image(grid, size).shape[1:]
    return side * side + rows * (cols + 1)


def make_inputs(model, samples: list[Sample], pad_token_id: int = 0) -> dict:
    """Left-padded model inputs for ``samples`` (one image each) in the format the HF processor emits."""
    from vtprune.models import family_of

    family = family_of(model)
    cfg = model.config
    rows, pixel_list, extra = [], [], {}
    if family == "llava":
        side = cfg.vision_config.image_size
        for s in samples:
            g = torch.Generator().manual_seed(s.image_seed)
            pixel_list.append(torch.randn(3, side, side, generator=g))
            rows.append(s.before + [cfg.image_token_id] * (side // cfg.vision_config.patch_size) ** 2 + s.after)
        pixel_values = torch.stack(pixel_list)
    elif family == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        side = cfg.vision_config.image_size
        n_max = max(image_size_to_num_patches(s.size, cfg.image_grid_pinpoints, side) for s in samples)
        for s in samples:
            g = torch.Generator().manual_seed(s.image_seed)
            n = image_size_to_num_patches(s.size, cfg.image_grid_pinpoints, side)
            crops = torch.zeros(n_max, 3, side, side)
            crops[:n] = torch.randn(n, 3, side, side, generator=g)
            pixel_list.append(crops)
            rows.append(s.before + [cfg.image_token_id] * _next_tokens(model, s.size) + s.after)
        pixel_values = torch.stack(pixel_list)
        extra["image_sizes"] = torch.tensor([list(s.size) for s in samples])
    else:
        grids = []
        for s in samples:
            pixels, thw, n = _qwen_pixels(cfg, s.size, s.image_seed)
            pixel_list.append(pixels)
            grids.append(thw)
            rows.append(s.before + [cfg.vision_start_token_id] + [cfg.image_token_id] * n
                        + [cfg.vision_end_token_id] + s.after)
        pixel_values = torch.cat(pixel_list)
        extra["image_grid_thw"] = torch.stack(grids)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r):] = torch.tensor(r)
        attention_mask[i, length - len(r):] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, **extra}
    if family in ("qwen2_5_vl", "qwen3_vl"):
        out["mm_token_type_ids"] = (input_ids == cfg.image_token_id).int()
    return out

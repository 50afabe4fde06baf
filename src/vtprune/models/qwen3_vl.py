"""Adapter for ``Qwen3VLForConditionalGeneration``: as Qwen2.5-VL (merged 2×2 units, M-RoPE), without
window attention, plus DeepStack: the features the tower injects into the first decoder layers are
sliced with the same keep mask as the main image tokens."""
from __future__ import annotations

import torch

from .families import Family, FlopsInfo, TinySpec, register_family
from .qwen2_5_vl import QWEN_INPUT_KEYS, QWEN_OCCAMTOKEN_DEFAULTS, Qwen25VLAdapter, QwenTower, tiny_inputs


class Qwen3VLAdapter(Qwen25VLAdapter):
    family = "qwen3_vl"

    def _compute_unit_order(self, grid: torch.Tensor) -> torch.Tensor:
        return torch.arange(sum(self.expected_tokens({"image_grid_thw": grid})))

    def _deepstack(self, out, image: int, keep: torch.Tensor):
        start = sum(self._split[:image])
        size = self._split[image]
        if len(keep) == size:  # every unit kept (keep: sorted, distinct): the image's rows as they are
            return [feat[start:start + size] for feat in out.deepstack_features]
        return [feat[start:start + size][keep] for feat in out.deepstack_features]

    def mm_encoder_outputs(self, images):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        layers = len(images[0].deepstack) if images and images[0].deepstack else 0
        return {"image": BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(im.embeds for im in images),
            deepstack_features=[tuple(im.deepstack[k] for im in images) for k in range(layers)])}

    def patch_decoder(self, current_layout):
        """DeepStack adds the tower's features at the image tokens' positions of the first decoder layers;
        after an in-LLM prune, the visual mask and features are carried onto the current layout."""
        lm = self.language_model
        if not hasattr(lm, "_deepstack_process"):
            return super().patch_decoder(current_layout)
        original = lm._deepstack_process

        def deepstack(hidden_states, visual_pos_masks, visual_embeds):
            layout = current_layout()
            if layout is not None and visual_pos_masks.shape[1] != hidden_states.shape[1]:
                rank = visual_pos_masks.flatten().long().cumsum(0).view_as(visual_pos_masks) - 1
                idx = layout.index.clamp(min=0).to(visual_pos_masks.device)
                new_mask = visual_pos_masks.gather(1, idx) & (layout.index >= 0).to(visual_pos_masks.device)
                picked = rank.gather(1, idx)[new_mask]
                return original(hidden_states, new_mask, visual_embeds[picked])
            return original(hidden_states, visual_pos_masks, visual_embeds)

        lm._deepstack_process = deepstack

        def restore():
            if "_deepstack_process" in lm.__dict__:
                del lm._deepstack_process

        return restore


def _tiny_config():
    from transformers import Qwen3VLConfig

    from ..tiny import IMAGE_TOKEN, VIDEO_TOKEN, VOCAB

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


FAMILY = register_family(Family(
    name="qwen3_vl",
    display_name="Qwen3-VL",
    hf_classes=("Qwen3VLForConditionalGeneration",),
    adapter=Qwen3VLAdapter,
    model_types=("qwen3_vl",),
    input_keys=QWEN_INPUT_KEYS,
    has_cls=False,
    vision_merge=False,
    vision_attention=False,
    fixed_grid=True,
    mrope=True,
    deepstack=True,
    merge_factor=2,
    tower_group="qwen3_vl",
    register_tower=QwenTower,
    vision_classes={"qwen3_vl_vision": ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionModel")},
    flops=FlopsInfo(tower="merger", mlp_mats=2),  # linear_fc1, linear_fc2; DeepStack mergers from the config
    defaults={"occamtoken": QWEN_OCCAMTOKEN_DEFAULTS},
    tiny=TinySpec(config=_tiny_config, inputs=tiny_inputs, image_size=(112, 112)),
    vllm=("VTPruneQwen3VLForConditionalGeneration", "vtprune.serving.vllm_qwen3_vl"),
))

"""Adapter for ``LlavaOnevisionForConditionalGeneration`` (SigLIP tower without CLS, AnyRes crops, videos).

Images are laid out like LLaVA-NeXT's (``layout="model"``: base view, then the crops unpadded to the
image's aspect ratio with one newline token per row; a single-view image ends with one newline token;
``layout="flat"``: base view then every crop's full grid, no newline tokens). The model down-samples
the unpadded crops bilinearly when they exceed ``vision_aspect_ratio`` ("anyres_max_9": nine crops'
worth of patches); a unit of such an image mixes several patches, so in the model layout those images
are refused with a pointer to ``layout="flat"``.

Videos: every frame goes through the tower alone; the model projects each frame's patches and pools them
2×2 (bilinear), then appends one newline token after the last frame. A video's units are its frames'
pooled cells, frame after frame. Vision-stage methods select among the pooled cells: their features are
the tower's features pooled the same way (the pooling is linear), and the kept cells' LLM inputs are the
model's own pooled embeddings, so keeping every cell reproduces the model exactly. Attention-based
providers of the tower are pooled likewise (``received_attention``); a cell has no single attention row,
so methods that read per-patch attention maps (``vision_attention``) run on images only.
"""
from __future__ import annotations

import math

import torch

from ..errors import InputError
from ..methods.base import ImageContext
from ..occamtoken.towers import redirect_activations
from .base import EncodedImage, host_ids
from .families import Family, FlopsInfo, TinySpec, register_family
from .llava import ClipTower, LlavaAdapter
from .llava_next import LlavaNextAdapter, anyres_tiny_inputs
from .llava_next import unit_table as next_unit_table
from .stages import append_extras, forwarded_cls, select_and_project

VIDEO_KEY = "pixel_values_videos"
#: key the adapter adds to a call's image inputs: per sample, the modality of each span in order
SPAN_MODALITIES = "span_modalities"


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"

    # -- structure ------------------------------------------------------------------------------
    @property
    def patch_offset(self) -> int:
        return 0  # SigLIP: no CLS token before the patches

    @property
    def video_token_id(self) -> int:
        return self.config.video_token_id

    @property
    def pooled_side(self) -> int:
        return -(-self.grid_side // 2)

    # -- inputs ---------------------------------------------------------------------------------
    def num_images(self, inputs: dict) -> int:
        return 0 if inputs.get("pixel_values") is None else inputs["pixel_values"].shape[0]

    def crops_of_size(self, image_size: tuple[int, int]) -> int:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        return image_size_to_num_patches(image_size, self.config.image_grid_pinpoints,
                                         self.config.vision_config.image_size)

    def crops_per_image(self, inputs: dict) -> list[int]:
        if inputs.get("pixel_values") is None:
            return []
        if inputs.get("image_sizes") is None:
            raise InputError("LLaVA-OneVision needs image_sizes; pass the processor's output unchanged.")
        per_sample = inputs.get("batch_num_images")
        sizes = self.host_rows(inputs["image_sizes"])
        # like the model: images of a multi-image sample are seen as their base view only
        if per_sample is None:
            single = [True] * len(sizes)
        else:
            counts = per_sample.tolist() if torch.is_tensor(per_sample) else list(per_sample)  # sync: when given
            single = [n == 1 for n in counts for _ in range(n)]
        return [self.crops_of_size(s) if one else 1 for s, one in zip(sizes, single)]

    def unit_table(self, image_size, crops: int) -> torch.Tensor:
        """For each unit of the model layout: the crop-major patch id it shows, or -1 (newline).
        Computed by running the model's own packing on patch ids."""
        n = self.grid_side ** 2
        ids = torch.arange(crops * n, dtype=torch.float32).view(crops, n, 1)
        packed, _ = self.model.model.pack_image_features(
            [ids], torch.as_tensor([image_size]), image_newline=torch.tensor([-1.0]),
            vision_aspect_ratio=self.config.vision_aspect_ratio)
        table = packed[0][:, 0]
        if self.layout == "model" and not torch.equal(table, table.round()):
            raise InputError(
                f"LLaVA-OneVision down-samples the crops of a {image_size[0]}×{image_size[1]} image "
                f"({self.config.vision_aspect_ratio}): its tokens mix several patches, so they cannot be pruned "
                f"patch by patch in the model's layout. Pass layout='flat' to apply() (every crop's full grid), "
                f"or resize the image below the limit.")
        return table.round().long()

    def video_frames(self, inputs: dict) -> list[int]:
        videos = inputs.get(VIDEO_KEY)
        return [] if videos is None else [videos.shape[1]] * videos.shape[0]

    def video_tokens(self, frames: int) -> int:
        return frames * self.pooled_side ** 2 + 1  # every frame's pooled cells, then one newline

    def expected_tokens(self, inputs: dict) -> list[int]:
        if inputs.get("pixel_values") is None:
            return []
        return super().expected_tokens(inputs)

    def image_spans(self, input_ids: torch.Tensor, inputs: dict) -> list[list[tuple[int, int]]]:
        """Image and video spans, per sample in position order. Records each span's modality in
        ``inputs[SPAN_MODALITIES]`` (the per-call input dict) for ``encode_images``."""
        ids = host_ids(input_ids)
        image_spans = self.placeholder_spans(ids, self.image_token_id, self.expected_tokens(inputs), "image")
        video_spans = self.placeholder_spans(ids, self.video_token_id,
                                             [self.video_tokens(f) for f in self.video_frames(inputs)], "video")
        spans, modalities = [], []
        for images, videos in zip(image_spans, video_spans):
            tagged = sorted([(s, "image") for s in images] + [(s, "video") for s in videos])
            spans.append([s for s, _ in tagged])
            modalities.append([m for _, m in tagged])
        inputs[SPAN_MODALITIES] = modalities
        return spans

    # -- vision side ----------------------------------------------------------------------------
    def encode_images(self, inputs, method, instructions, timer):
        modalities = inputs.get(SPAN_MODALITIES)
        if modalities is None:
            raise InputError("LLaVA-OneVision: image_spans() must run before encode_images().")
        order = [m for sample in modalities for m in sample]
        image_instr = [ins for ins, m in zip(instructions, order) if m == "image"]
        video_instr = [ins for ins, m in zip(instructions, order) if m == "video"]
        images = iter(super().encode_images(inputs, method, image_instr, timer) if image_instr else [])
        videos = iter(self.encode_videos(inputs, method, video_instr, timer) if video_instr else [])
        return [next(images) if m == "image" else next(videos) for m in order]

    def encode_videos(self, inputs, method, instructions, timer) -> list[EncodedImage]:
        pixels = inputs[VIDEO_KEY]
        self.check_inputs(pixels)
        num, frames = pixels.shape[:2]
        tower = self.run_tower(pixels.flatten(0, 1), method)
        extra = method.extra_tokens if method is not None else 0
        return [self.encode_video(tower, v, frames, extra, method, timer, instructions[v]) for v in range(num)]

    def pool(self, per_patch: torch.Tensor) -> torch.Tensor:
        """The model's 2×2 bilinear pooling of (frames, patches, C) per-patch values."""
        return self.model.model.apply_pooling(per_patch)

    def encode_video(self, tower, v, frames, extra, method, timer, instruction) -> EncodedImage:
        n, side = self.grid_side ** 2, self.pooled_side
        cells = side * side
        rows = list(range(v * frames, (v + 1) * frames))
        ctx = self.crop_context(tower, rows, v, extra, [(side, side)] * frames)
        per_frame = ctx.features.view(frames, n, -1)
        pooled_embeds = self.pool(self.project(per_frame)).flatten(0, 1)  # the model's own video features
        providers = {
            "received_attention": lambda: self.pool(ctx.received_attention.view(frames, n, 1)).flatten(),
            "hidden": lambda layer: self.pool(ctx.hidden(layer).view(frames, n, -1)).flatten(0, 1),
        }
        if extra:
            providers["register_received_attention"] = lambda: ctx.register_received_attention
            providers["register_features"] = lambda: ctx.register_features
        pooled = ImageContext(features=self.pool(per_frame).flatten(0, 1), grids=[(side, side)] * frames,
                              crop_slices=[slice(f * cells, (f + 1) * cells) for f in range(frames)],
                              family=self.family, image_index=v, extra=extra, providers=providers)
        keep, embeds, info = select_and_project(pooled, method, self.project, timer=timer, instruction=instruction,
                                                projected=pooled_embeds)
        newline_embed = self.model.model.image_newline.to(embeds.dtype)[None]
        embeds = append_extras(torch.cat([embeds, newline_embed]), pooled, method, self.project)
        total = frames * cells
        newline = torch.tensor([total])
        extras = torch.arange(total + 1, total + 1 + frames * (extra + forwarded_cls(method)))
        keep_units = torch.cat([keep.cpu(), newline, extras])  # sync: the units the method kept
        frame_of = torch.arange(total) // cells
        unit_cells = torch.stack([frame_of, (torch.arange(total) % cells) // side, torch.arange(total) % side], 1)
        unit_cells = torch.cat([unit_cells, torch.full((1 + len(extras), 3), -1)])
        return EncodedImage(embeds=embeds, keep=keep_units, n_units=total + 1, n_extra=len(extras), candidates=total,
                            protected=extras, info=info, unit_cells=unit_cells, modality="video")

    def mm_encoder_outputs(self, images: list[EncodedImage]) -> dict:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = {}
        stills = tuple(im.embeds for im in images if im.modality == "image")
        videos = [im.embeds for im in images if im.modality == "video"]
        if stills:
            out["image"] = BaseModelOutputWithPooling(pooler_output=stills)
        if videos:  # the model flattens (videos, tokens, D); one row holds every video's kept tokens
            out["video"] = BaseModelOutputWithPooling(pooler_output=torch.cat(videos)[None])
        return out


# -- the model layout from the config, shared with the vLLM variant ---------------------------------
def unit_table(config, image_size) -> tuple[torch.Tensor, int]:
    """For each unit of an image's model layout: the crop-major patch id it shows, or -1 (newline); and
    the number of crops. OneVision packs like LLaVA-NeXT unless the unpadded crops exceed its
    ``vision_aspect_ratio`` (``anyres_max_N``), where it down-samples them: InputError then (a
    down-sampled token mixes several patches, so it cannot be pruned patch by patch)."""
    table, crops = next_unit_table(config, image_size)
    if crops > 1:
        side = config.vision_config.image_size // config.vision_config.patch_size
        rows = int((table[side * side:] < 0).sum())  # one newline per row of the unpadded crops
        cols = (len(table) - side * side - rows) // rows
        max_crops = int(config.vision_aspect_ratio.strip("anyres_max_"))  # as the model parses it
        if math.sqrt(rows * cols / (max_crops * side ** 2)) > 1.1:
            raise InputError(
                f"LLaVA-OneVision down-samples the crops of a {image_size[0]}×{image_size[1]} image "
                f"({config.vision_aspect_ratio}): its tokens mix several patches, so they cannot be pruned "
                f"patch by patch in the model's layout. Resize the image below the limit (or, on the "
                f"transformers path, pass layout='flat').")
    return table, crops


class OnevisionBaseViewAdapter(LlavaAdapter):
    """One view per image through LLaVA-1.5's single-crop path, SigLIP's patch positions (OC-VTP
    feature extraction reads the base view only)."""

    family = "llava_onevision"

    @property
    def patch_offset(self) -> int:
        return 0


# -- test-time registers: the SigLIP tower --------------------------------------------------------
class SiglipTower(ClipTower):
    """``SiglipVisionModel``: embeddings → encoder.layers → post_layernorm, no CLS token, no pre-norm.
    With the register: (B, N + 1, D), the zero register token appended after the position embeddings
    (the analogue of the reference's CLIP placement, which appends it before CLIP's pre-norm)."""

    kind = "siglip"
    has_cls = False

    @classmethod
    def matches(cls, module) -> bool:
        return (all(hasattr(module, a) for a in ("embeddings", "encoder", "post_layernorm"))
                and not hasattr(module, "pre_layrnorm"))

    def identity_tensors(self):
        emb = self.core.embeddings
        ts = [emb.patch_embedding.weight, emb.position_embedding.weight,
              self.layers[0].mlp.fc1.weight, self.layers[-1].mlp.fc2.weight]
        ts += [blk.mlp.fc1.bias for blk in self.layers if blk.mlp.fc1.bias is not None]
        return ts

    def append_register_hook(self):
        def append(module, args, output):
            return torch.cat([output, output.new_zeros(output.shape[0], 1, output.shape[-1])], dim=1)

        return self.core.embeddings.register_forward_hook(append)

    def redirect(self, h, channels, mode):
        # positions: 0..S-2 = patches, S-1 = register
        return redirect_activations(h, channels, patch=slice(0, -1), register=slice(-1, None), mode=mode)

    def cls_attention(self, layer, hidden):
        raise InputError("SigLIP towers have no CLS token.")


# -- tiny test model ------------------------------------------------------------------------------
def _tiny_config():
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    from ..tiny import IMAGE_TOKEN, VIDEO_TOKEN, VOCAB

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=56, patch_size=14, vision_use_head=False)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                                video_token_id=VIDEO_TOKEN, image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
                                vision_feature_layer=-1, vision_feature_select_strategy="full",
                                vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)


def _tiny_inputs(model, samples):
    adapter = LlavaOnevisionAdapter(model)
    return anyres_tiny_inputs(model, samples, lambda size, crops: len(adapter.unit_table(size, crops)))


FAMILY = register_family(Family(
    name="llava_onevision",
    display_name="LLaVA-OneVision",
    hf_classes=("LlavaOnevisionForConditionalGeneration",),
    adapter=LlavaOnevisionAdapter,
    model_types=("llava_onevision",),
    input_keys=("pixel_values", "image_sizes", "batch_num_images", VIDEO_KEY, "image_sizes_videos"),
    pixel_keys=("pixel_values", VIDEO_KEY),
    has_cls=False,
    vision_merge=True,
    vision_attention=True,
    fixed_grid=False,  # the model layout unpads the crops; layout="flat" keeps every crop's full grid
    anyres=True,
    merge_factor=1,
    layouts=("model", "flat"),
    full_grid_layout="flat",
    tower_group="siglip",
    register_tower=SiglipTower,
    vision_classes={"siglip_vision_model": ("transformers", "SiglipVisionModel")},
    extract_adapter=OnevisionBaseViewAdapter,  # the base view, no AnyRes crops
    flops=FlopsInfo(tower="clip", mlp_mats=2, default_crops=10),  # 1152×1152 (3×3 crops) + base view
    #: OccamToken on OneVision (ours, unvalidated; no paper setting): the CLS-less mutual score with λ1 = 0.5
    #: as on the Qwens, stage-II layer 10 of Qwen2-7B's 28 as on Qwen2.5-VL-7B
    defaults={"occamtoken": {"lambda1": 0.5, "layer": 10}},
    tiny=TinySpec(config=_tiny_config, inputs=_tiny_inputs, image_size=(56, 112)),
    vllm=("VTPruneLlavaOnevisionForConditionalGeneration", "vtprune.serving.vllm_llava_onevision"),
))
